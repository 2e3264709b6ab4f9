"""``nexus specialize``: the whole job (same as ``python jobs/specialize.py``)."""

from __future__ import annotations

ORDER = 5


def register(sub) -> None:
    from nexus.job.cli import add_job_arguments

    p = sub.add_parser(
        "specialize", help="run the whole pipeline from one YAML config (default: the built-in demo)"
    )
    add_job_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.job.cli import run_from_args

    return run_from_args(args)
