"""Memory plan accuracy: ``nexus plan``'s predicted peak against the measured one, per stage.

Runs the cases of ``tests/test_planner.py`` (three shapes, training and collection, each in
a fresh process through NEXUS's production code: ``tests/memory_probe.py``) and prints the
predicted and measured peak resident memory over the loaded process, with glibc's allocator
returning freed buffers at once (as the test measures) and, with ``--default-allocator``,
also as glibc behaves by default. Writes ``benchmarks/results/plan_accuracy.json``.

    python benchmarks/plan_accuracy.py                      # ~2 minutes on an idle 2-core machine
    python benchmarks/plan_accuracy.py --default-allocator  # twice the runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from memory_probe import CASES, SHAPES, compare, write_shape  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--default-allocator", action="store_true", help="also measure with glibc's defaults")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "plan_accuracy.json"))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nexus-plan-accuracy-") as tmp:
        models = {name: write_shape(name, Path(tmp)) for name in SHAPES}
        print("| shape | stage | batch x seq | checkpointing | predicted MB | measured MB | ratio |"
              + (" measured MB (glibc default) | ratio |" if args.default_allocator else ""))  # fmt: skip
        print("|---|---|---|---|---:|---:|---:|" + ("---:|---:|" if args.default_allocator else ""))
        for case in CASES:
            row = compare(case, models[case[0]])
            if args.default_allocator:
                default = compare(case, models[case[0]], fixed_allocator=False)
                row["measured_default_mb"], row["ratio_default"] = default["measured_mb"], default["ratio"]
            rows.append(row)
            line = (f"| {row['shape']} | {row['stage']} | {row['batch']} x {row['seq_len']} | "
                    f"{'on' if row['checkpointing'] else 'off'} | {row['predicted_mb']} | {row['measured_mb']} | "
                    f"{row['ratio']:.2f} |")  # fmt: skip
            if args.default_allocator:
                line += f" {row['measured_default_mb']} | {row['ratio_default']:.2f} |"
            print(line, flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst error {worst:.0%} (bar: 20%)")
    return 0 if worst <= 0.20 else 1


if __name__ == "__main__":
    sys.exit(main())
