"""The ``nexus`` command line.

Each subcommand lives in its own module under :mod:`nexus.commands` and exposes
``register(subparsers)``; this file only discovers them, parses, and turns
:class:`~nexus.errors.NexusError` into one line on stderr and exit status 2 (a full
traceback with ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from nexus import __version__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (like every other NEXUS error): no usage block.

    Subcommand parsers are made from the same class, so ``nexus collect --batch-size 0``
    prints ``nexus collect: error: argument --batch-size: ...`` and exits with status 2.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    import nexus.commands as commands

    parser = _Parser(
        prog="nexus",
        description="Specialise Mixture-of-Experts models with a trainable shared expert per MoE layer.",
    )
    parser.add_argument("--version", action="version", version=f"nexus {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [
        importlib.import_module(f"nexus.commands.{m.name}") for m in pkgutil.iter_modules(commands.__path__)
    ]
    for module in sorted(modules, key=lambda m: getattr(m, "ORDER", 100)):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("NEXUS_DEBUG") == "1"
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    from nexus.errors import NexusError

    try:
        result = args.func(args)
    except NexusError as exc:
        if debug:
            raise
        print(f"nexus: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nexus: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
