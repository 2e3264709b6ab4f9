"""CPU matmul kernel caches keyed by shape: how much memory they hold and what switching them off costs.

A routed expert's matmul sees a new token count every step, and on a CPU PyTorch's bf16 matmul
goes through oneDNN, which keeps one kernel ("primitive") per shape in two caches of 1,024
entries: oneDNN's own (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and PyTorch's ideep LRU cache
(``LRU_CACHE_CAPACITY``). This measures, each configuration in a fresh child process (both
variables are read at the first matmul), with ``MALLOC_MMAP_THRESHOLD_=131072`` as every
memory benchmark here:

- **growth**: ``--matmuls`` bf16 matmuls ``x @ w`` against a GPT-OSS expert's ``gate_up``
  weight (2880 x 5760), ``x`` with a random row count in 1..600 each time (as an expert's
  token count varies) or the same row count every time; the process's resident growth and
  CPU seconds, for both caches on, either off, and both off;
- **creation cost**: the time of one matmul of 256 rows at widths 64, 512 and 2880 with the
  caches on and off (off: a kernel is created for every call).

    python benchmarks/shape_caches.py      # ~3 minutes on 2 cores; JSON to benchmarks/results/shape_caches.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "shape_caches.json"
ONEDNN_OFF = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
IDEEP_OFF = {"LRU_CACHE_CAPACITY": "1"}
#: both caches off: what ``benchmarks/packed_experts.py`` runs its children with
SHAPE_CACHES_OFF = {**ONEDNN_OFF, **IDEEP_OFF}
#: configuration name -> environment of its child
CACHES = {
    "both on": {},
    "ideep off": IDEEP_OFF,
    "oneDNN off": ONEDNN_OFF,
    "both off": SHAPE_CACHES_OFF,
}


def child_growth(spec: dict) -> dict:
    import torch
    from methods import rss_bytes

    w = torch.randn(2880, 5760, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    rows = (
        torch.randint(1, 601, (spec["matmuls"],), generator=g).tolist()
        if spec["varied"]
        else [300] * spec["matmuls"]
    )
    torch.randn(8, 2880, dtype=torch.bfloat16) @ w  # libraries loaded before the baseline
    before, cpu = rss_bytes(), time.process_time()
    for m in rows:
        torch.randn(m, 2880, dtype=torch.bfloat16, generator=g) @ w
    return {
        "growth_mb": (rss_bytes() - before) / 1e6,
        "cpu_s": time.process_time() - cpu,
        "shapes": len(set(rows)),
    }


def child_cost(spec: dict) -> dict:
    import torch

    out = {}
    for width, reps in ((64, 20000), (512, 2000), (2880, 20)):
        w, x = torch.randn(width, width, dtype=torch.bfloat16), torch.randn(256, width, dtype=torch.bfloat16)
        x @ w
        t = time.perf_counter()
        for _ in range(reps):
            x @ w
        out[str(width)] = (time.perf_counter() - t) / reps * 1e6
    return {"us_per_matmul": out}


def child(spec_path: str) -> int:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    os.environ.update(spec["env"])  # before the first matmul, when the libraries read them
    torch.set_num_threads(spec["threads"])
    out = child_growth(spec) if spec["kind"] == "growth" else child_cost(spec)
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matmuls", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child)
    from methods import run_child

    def run(kind: str, caches: str, **extra) -> dict:
        spec = {
            "kind": kind,
            "env": CACHES[caches],
            "threads": args.threads,
            "matmuls": args.matmuls,
            **extra,
        }
        return run_child(__file__, spec, args.threads, f"{kind} child ({caches})")

    result = {"command": " ".join(["python", "benchmarks/shape_caches.py", *(argv or sys.argv[1:])]),
              "threads": args.threads, "matmuls": args.matmuls, "growth": {}, "cost": {}}  # fmt: skip
    rows = ["| caches | row counts | distinct shapes | growth MB | CPU s |", "|---|---|---:|---:|---:|"]
    for varied in (True, False):
        for caches in CACHES if varied else ("both on",):
            r = run("growth", caches, varied=varied)
            result["growth"][f"{caches}, {'varied' if varied else 'same'}"] = r
            rows.append(f"| {caches} | {'random 1..600' if varied else 'always 300'} | {r['shapes']} | "
                        f"{r['growth_mb']:.0f} | {r['cpu_s']:.1f} |")  # fmt: skip
    rows += ["", "| caches | us per matmul, width 64 / 512 / 2880 (256 rows) |", "|---|---|"]
    for caches in ("both on", "both off"):
        r = result["cost"][caches] = run("cost", caches)["us_per_matmul"]
        rows.append(f"| {caches} | {' / '.join(f'{v:.0f}' for v in r.values())} |")
    print("\n".join(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
