"""Argument helpers shared by the subcommands (not itself a command)."""

from __future__ import annotations

import argparse
import dataclasses

from nexus.errors import NexusError

ORDER = 10_000


def register(sub) -> None:  # not a command
    return None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="base model directory (or Hub name)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code from the model"
    )
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")


EXPERTS_HELP = (
    "how the frozen routed experts are held: auto (default: packed for MXFP4 checkpoints, else dequantized), "
    "packed (stay MXFP4 on the device, decoded on the fly) or dequantized (decoded once, on load)"
)


def add_experts_arg(p: argparse.ArgumentParser) -> None:
    # checked by nexus.loading.resolve_experts (one list of choices, and `nexus --help` stays light)
    p.add_argument("--experts", default="auto", help=EXPERTS_HELP)


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise NexusError(message)


def add_config_arguments(
    p: argparse.ArgumentParser, cls, help_text: dict[str, str], skip=frozenset(), required=()
) -> None:
    """One ``--flag`` per field of dataclass ``cls``, typed from its annotation.

    ``bool`` fields become ``--flag/--no-flag``; ``list`` fields take several values; ``int``
    and ``float`` fields (optional or not) are parsed as such; fields in ``required`` must
    be given.
    """
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"help": help_text.get(f.name, f.name.replace("_", " ")), "dest": f.name, "default": default}
        flag = "--" + f.name.replace("_", "-")
        if f.name in required:
            kwargs.pop("default")
            kwargs["required"] = True
        if typ == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typ.startswith("list"):
            p.add_argument(flag, nargs="+", **kwargs)
        else:
            convert = int if typ.startswith("int") else float if typ.startswith("float") else str
            p.add_argument(flag, type=convert, **kwargs)
