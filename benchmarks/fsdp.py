"""``train.strategy``: DDP against FSDP on the same CPU run, per worker, side by side.

Both runs train the same shared experts on the same base, batches and settings with 2 Ray Train
workers (gloo); only ``strategy`` differs. The base is the demo's GPT-OSS-style model (its
tokenizer and corpus) enlarged to a random base of ``--layers`` layers of ``--experts`` experts,
so that the frozen weights dominate a worker's memory as they do at scale, and that one layer
(what FSDP gathers at a time) is a small part of the base. Reported per worker, from
``train_summary.json`` (what the workers measured themselves):

- frozen base held: bytes of the frozen parameters and buffers the worker holds (FSDP: its
  local shards), against the whole base;
- trainable held: the worker's shared-expert tensors (FSDP: its shards);
- peak RSS: the worker process's peak resident memory (``ru_maxrss``): torch and Ray's own
  few hundred MB, the base, and under FSDP rank 0's CPU copy of the whole base, which it loads
  and scatters to the others before training (the other ranks build the model on the meta
  device);
- step time: median seconds per optimizer step after the first (``tokens / tokens_per_s``).

    python benchmarks/fsdp.py                  # 16 layers x 16 experts, width 512 (~0.9 GB base)
    python benchmarks/fsdp.py --layers 4 --experts 8 --width 256 --steps 3 --json /tmp/fsdp.json  # smoke

Raw results (JSON): ``benchmarks/results/fsdp.json`` by default (``--json`` overrides).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=16, help="routed experts per layer of the random base")
    p.add_argument("--width", type=int, default=512, help="hidden size = expert width of the random base")
    p.add_argument("--layers", type=int, default=16, help="decoder layers of the random base")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-fsdp"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fsdp.json"))
    return p.parse_args(argv)


def build_base(args, work: Path) -> tuple[Path, str]:
    """A random base shaped like the demo's, widened; the demo's tokenizer; the demo corpus."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nexus.demo import ensure_demo

    corpus_dir, demo_model = ensure_demo("small", progress=False)
    out = work / f"base-l{args.layers}-e{args.experts}-w{args.width}"
    if not (out / "config.json").exists():
        config = AutoConfig.from_pretrained(demo_model)
        config.num_local_experts = args.experts
        config.num_hidden_layers = args.layers
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(args.layers)]
        config.hidden_size = config.intermediate_size = args.width
        config.head_dim = args.width // config.num_attention_heads
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(demo_model / name, out / name)
    return out, str(corpus_dir / "domain.parquet")


def run(args, strategy: str, model: Path, corpus: str, work: Path) -> dict:
    from nexus.stages import train

    out = train.run(
        model=str(model),
        corpus=[corpus],
        output=str(work / strategy),
        overwrite=True,
        restart=True,
        workers=2,
        strategy=strategy,
        max_steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup_steps=1,
        checkpoint_every=args.steps,
        init="random",
        storage_path=str(work / "ray"),
        name=f"bench-{strategy}",
    )
    summary = json.loads((out / "train_summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["tokens"] / m["tokens_per_s"] for m in metrics[1:] if m.get("tokens_per_s")]
    return {
        "strategy": strategy,
        "workers": summary["checks"]["placement"],
        "step_s": statistics.median(steps),
        "final_loss": metrics[-1]["loss"],
    }


def table(results: list[dict]) -> str:
    mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = ["| strategy | rank | frozen base held (MB) | of (MB) | trainable held (MB) | peak RSS (MB) | step (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for rank, w in enumerate(r["workers"]):
            lines.append(
                f"| {r['strategy']} | {rank} | {mb(w['frozen_resident_bytes'])} | {mb(w['frozen_bytes'])} | "
                f"{mb(w['trainable_resident_bytes'])} | {mb(w['peak_rss_bytes'])} | {r['step_s']:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    import ray

    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, corpus = build_base(args, work)
    # its own Ray instance; workers' RSS follows live tensors, not glibc's cache of freed buffers
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})  # fmt: skip
    try:
        results = [run(args, s, model, corpus, work) for s in ("ddp", "fsdp")]
    finally:
        ray.shutdown()
    print(table(results))
    print(f"final loss: ddp {results[0]['final_loss']:.6f}, fsdp {results[1]['final_loss']:.6f}")
    record = {"command": "python benchmarks/fsdp.py " + " ".join(sys.argv[1:]), "args": vars(args),
              "results": results}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
