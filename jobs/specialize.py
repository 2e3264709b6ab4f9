#!/usr/bin/env python
"""NEXUS specialisation job: sample, collect, analyze, convert, train, evaluate (and export).

    python jobs/specialize.py                       # the built-in demo, on a local Ray instance
    python jobs/specialize.py --config jobs/configs/gpt-oss-20b.yaml
    ray job submit --working-dir . -- python jobs/specialize.py --config jobs/configs/gpt-oss-120b.yaml

The same as ``nexus specialize`` (same flags, same one-line errors). Under ``ray job submit`` Ray
sets RAY_ADDRESS and every stage runs on that cluster.
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the uploaded checkout: make the package
# importable from there even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["specialize", *sys.argv[1:]]))
