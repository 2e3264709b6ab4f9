"""The ``nexus`` command line: one subcommand per stage, plus ``info``, ``families``, ``plan``,
``specialize`` (the whole job), ``demo-corpus`` and ``demo-model``.

Every subcommand's flags are generated from its config (a pydantic model: a stage's
:class:`~nexus.config.StageConfig`, or one of :mod:`nexus.commands`): ``batch_size`` is
``--batch-size``, a bool is ``--flag/--no-flag``, a list takes several values (``--corpus a b``
or ``--corpus a --corpus b``), a choice lists its values, ``none`` clears an optional value, and
the help text and default come from the field. argparse only converts text to types; the config
checks bounds, once. Errors are one line and exit status 2: a bad flag prints ``nexus COMMAND:
error: ...``, a :class:`~nexus.errors.NexusError` ``nexus: error: ...``; ``--debug`` shows the
traceback instead.

``nexus --help`` imports no stage: the command table below names each command's config and
function, and only the invoked command's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import types
import typing
from typing import Any, Literal, get_args, get_origin

from nexus import __version__
from nexus.stages import STAGES

#: command -> (one line of help, "module:Config", "module:function"; None: the stage's ``run``),
#: in ``nexus --help`` order
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "info": (
        "show the MoE structure NEXUS finds in a model",
        "nexus.commands:InfoConfig",
        "nexus.commands:info",
    ),
    "families": ("list supported MoE families", "nexus.commands:FamiliesConfig", "nexus.commands:families"),
    "plan": (
        "predict each stage's peak memory per worker from config.json, and whether it fits",
        "nexus.commands:PlanConfig",
        "nexus.commands:plan",
    ),
    "specialize": (
        "run the whole pipeline from one YAML config (default: the built-in demo)",
        "nexus.commands:SpecializeConfig",
        "nexus.job.run:specialize",
    ),
    **{s.name: (s.help, f"nexus.stages.{s.name}:{s.name.capitalize()}Config", None) for s in STAGES},
    "demo-corpus": (
        "write the built-in demo corpus (general/domain splits from the standard library)",
        "nexus.commands:DemoCorpusConfig",
        "nexus.commands:demo_corpus",
    ),
    "demo-model": (
        "pretrain the demo MoE base model (GPT-OSS architecture) on the demo corpus, on CPU",
        "nexus.commands:DemoModelConfig",
        "nexus.commands:demo_model",
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (like every other NEXUS error): no usage block.

    Subcommand parsers are made from the same class, so ``nexus collect --batch-size x``
    prints ``nexus collect: error: argument --batch-size: ...`` and exits with status 2.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# -- flags from a config ----------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(text: str, kind: type, nullable: bool, choices: tuple | None):
    if nullable and text.lower() == "none":
        return None
    if choices is not None and text not in choices:
        raise argparse.ArgumentTypeError(
            f"invalid choice {text!r} (choose from {', '.join(map(str, choices))})"
        )
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return text


def _shape(annotation: Any) -> tuple[str, type, bool, tuple | None]:
    """(``scalar``/``list``/``dict``/``bool``, element type, None allowed, choices) of a field's type."""
    nullable = False
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = get_args(annotation)
        nullable = type(None) in args
        # ``str | RouterStats``: the command line gives the first (text) form
        annotation = next(a for a in args if a is not type(None))
    origin = get_origin(annotation)
    if annotation is bool:
        return "bool", bool, nullable, None
    if origin is Literal:
        return "scalar", str, nullable, get_args(annotation)
    if origin is list:
        _, element, _, choices = _shape(get_args(annotation)[0])
        return "list", element, nullable, choices
    if origin is dict:
        return "dict", str, nullable, None
    return "scalar", annotation if annotation in (int, float) else str, nullable, None


def _help(field) -> str:
    text = (field.description or "").replace("%", "%%")
    if not field.is_required() and field.default not in (None, False) and field.default_factory is None:
        text += f" (default: {field.default})"
    return text


def add_config_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """One flag per field of ``config``: inputs first, then the stage's settings, then shared ones.

    Flags that are not given stay out of the namespace, so every default comes from the config.
    """
    from nexus.config import INPUT, SETTING, meta

    order = {INPUT: 0, SETTING: 1}
    fields = sorted(config.model_fields.items(), key=lambda kv: order.get(meta(kv[1])["kind"], 2))
    for name, field in fields:
        key = field.alias or name
        kind, element, nullable, choices = _shape(field.annotation)
        kwargs: dict = {"dest": key, "default": argparse.SUPPRESS, "help": _help(field)}
        if field.is_required():
            kwargs["required"] = True
        if kind == "bool":
            parser.add_argument(_flag(key), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        convert = lambda text, e=element, n=nullable, c=choices: _scalar(text, e, n, c)  # noqa: E731
        if kind in ("list", "dict"):
            parser.add_argument(
                _flag(key), nargs="+", action="extend", type=convert, metavar=_metavar(key, kind), **kwargs
            )
        else:
            parser.add_argument(_flag(key), type=convert, metavar=_metavar(key, kind, choices), **kwargs)


def _metavar(key: str, kind: str, choices: tuple | None = None) -> str:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return "NAME=PATH" if kind == "dict" else key.upper()


def config_from_args(parser: argparse.ArgumentParser, config: type, args: argparse.Namespace):
    """The config from parsed flags; a value the config refuses is a one-line parser error."""
    from pydantic import ValidationError

    from nexus.config import validation_message

    names = {f.alias or n for n, f in config.model_fields.items()}
    values = {k: v for k, v in vars(args).items() if k in names}
    try:
        return config.model_validate(values)
    except ValidationError as exc:
        parser.error(validation_message(exc, lambda key: f"argument {_flag(key)}"))


# -- the command ----------------------------------------------------------------------------------


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``nexus`` parser; only ``command``'s subparser gets its flags (and imports its module)."""
    parser = _Parser(
        prog="nexus",
        description="Specialise Mixture-of-Experts models with a trainable shared expert per MoE layer.",
    )
    parser.add_argument("--version", action="version", version=f"nexus {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, config_ref, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name == command:
            config = _load(config_ref)
            p.description = (config.__doc__ or help_text).strip()
            add_config_arguments(p, config)
            p.set_defaults(_config=config, _parser=p)
    return parser


def _run_stage(name: str, cfg) -> int:
    module = importlib.import_module(f"nexus.stages.{name}")
    result = module.run(cfg)
    for line in module.summary_lines(result, cfg):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("NEXUS_DEBUG") == "1"
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand that got them, like its other errors
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    cfg = config_from_args(args._parser, args._config, args)
    from nexus.errors import NexusError

    _, _, function = COMMANDS[args.command]
    try:
        if function is None:
            return _run_stage(args.command, cfg)
        return int(_load(function)(cfg) or 0)
    except NexusError as exc:
        if debug:
            raise
        print(f"nexus: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nexus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
