"""Command line of the job: ``python jobs/specialize.py [--config FILE] [--set k=v ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "demo.yaml"


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="job YAML (default: jobs/configs/demo.yaml, the built-in demo; without the repository checkout, built-in defaults)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value",
    )
    p.add_argument("--output", help="shortcut for --set output=DIR")
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="rerun this stage (and what depends on it)",
    )


def run_from_args(args) -> int:
    from nexus.job.config import load_config
    from nexus.job.run import run_job
    from nexus.stages.evaluate import format_table

    config = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    overrides = list(args.overrides) + ([f"output={args.output}"] if args.output else [])
    cfg = load_config(config, overrides)
    results = run_job(cfg, force=set(args.force))
    out = Path(cfg.output)
    print("\nstage      status")
    for r in results:
        print(f"{r.name:<10} {r.status}" + (f" ({r.seconds:.1f}s)" if r.status == "ran" else ""))
    evaluation = out / "evaluate" / "evaluation.json"
    if evaluation.is_file():
        import json

        print("\n" + format_table(json.loads(evaluation.read_text())))
    print(f"\nreport: {out / 'report.md'}\nadapter: {out / 'train' / 'adapter'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from nexus.errors import NexusError

    parser = argparse.ArgumentParser(
        prog="specialize", description="Run the NEXUS specialisation job end to end."
    )
    add_job_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("NEXUS_DEBUG") == "1"
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    try:
        return run_from_args(args)
    except NexusError as exc:
        if debug:
            raise
        print(f"specialize: error: {exc}", file=sys.stderr)
        return exc.exit_code
