"""Training throughput and memory: NEXUS against LoRA, ESFT and full fine-tuning, side by side.

Same base (the demo base), same batches, batch size and sequence length for every method;
the methods and the training step are those of ``benchmarks/methods.py`` (``nexus train``'s
loss, optimiser and schedule). Two measurements, each in fresh child processes with a fixed
number of torch threads:

- **speed**: one child builds every method (its own copy of the base each) and then runs
  their optimizer steps interleaved, one step of each method in turn (rotating the order),
  so load from other jobs on a shared machine hits all methods alike within seconds. The
  ratio of a method's step time to LoRA's in the same turn is the robust number (median over
  turns); tokens/s (median step) is reported too.
- **memory**: one child per method (so the peak is its own) runs a few steps and reports
  its peak resident memory (model, optimiser state, activations, Python, torch) and the
  growth over the loaded base. Children run with ``MALLOC_MMAP_THRESHOLD_=131072``, so that
  resident memory tracks live tensors rather than glibc's caching of freed buffers (which
  otherwise moves the peak by 100-200 MB with the order of allocations, not the method).

    python benchmarks/train.py                      # small demo base, batch 8 x seq 256
    python benchmarks/train.py --quick              # tiny demo base, few steps (smoke test)
    python benchmarks/train.py --json out.json --methods nexus lora-r11

Raw results (JSON): ``benchmarks/results/train_throughput.json`` for the full run (small demo
base, every default method), ``<work>/train_throughput.json`` otherwise; ``--json`` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods as M  # noqa: E402

from nexus.stages.evaluate import packed_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ["nexus", "nexus-offline-k32", "nexus-kd0", "lora-r11", "lora-r2", "esft-token", "full-ft"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny demo base, one round, few steps")
    p.add_argument("--size", default=None, help="demo size (default small; tiny with --quick)")
    p.add_argument("--model", default=None)
    p.add_argument("--corpus-dir", default=None)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: 256, capped at the model's positions")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of each memory child")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing for every method")
    p.add_argument("--work", default=None, help="work directory (default runs/bench-train-<size>)")
    p.add_argument("--json", default=None, help="where to write the results (default: see the docstring)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or ("tiny" if args.quick else "small")
    args.steps = args.steps or (3 if args.quick else 12)
    args.work = Path(args.work or ROOT / "runs" / f"bench-train-{args.size}{'-quick' if args.quick else ''}")
    return args


# -- child: one measurement ---------------------------------------------------------------------


def _child_setup(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from safetensors.torch import load_file

    return load_file(spec["blocks"])["blocks"]


def _built(spec: dict, name: str, blocks, steps: int):
    method = M.get_method(name)
    cfg = M.train_config(method, spec["model"], seed=0, steps=steps, batch_size=spec["batch_size"],
                         seq_len=blocks.shape[1], warmup_steps=1,
                         gradient_checkpointing=spec["checkpointing"])  # fmt: skip
    teacher = None
    if method.kd == "offline":  # scored by prepare(): loaded here
        teacher = M.TeacherTable.make(spec["model"], blocks, spec["teacher_k"], Path(spec["teacher"]))
    return M.build(method, cfg, M.FixedInits.from_dict(spec["inits"]), teacher=teacher)


def child_memory(spec: dict) -> dict:
    """One method alone: peak resident memory over a few steps."""
    blocks = _child_setup(spec)
    M.reset_peak_rss()
    built = _built(spec, spec["method"], blocks, spec["memory_steps"])
    rss_loaded = M.rss_bytes()
    records = M.train(built, M.seeded_batches(blocks, spec["batch_size"], 0))
    return {
        "method": spec["method"],
        "label": built.method.label,
        "trainable_params": built.trainable_params,
        "peak_rss_mb": M.rss_bytes(peak=True) / 2**20,
        "loaded_rss_mb": rss_loaded / 2**20,
        "steps": len(records),
    }


def child_speed(spec: dict) -> dict:
    """Every method in one process, their steps interleaved: per turn, one step of each."""
    blocks = _child_setup(spec)
    names = spec["methods"]
    total = spec["warmup"] + spec["steps"]
    steppers = {}
    for name in names:
        built = _built(spec, name, blocks, total)
        steppers[name] = M.Stepper(built, M.seeded_batches(blocks, spec["batch_size"], 0))
    times: dict[str, list[float]] = {n: [] for n in names}
    tokens = spec["batch_size"] * blocks.shape[1]
    for turn in range(total):
        k = turn % len(names)
        for name in names[k:] + names[:k]:
            rec = steppers[name].step()
            if turn >= spec["warmup"]:
                times[name].append(rec.seconds)
    return {"times": times, "tokens_per_step": tokens}


def child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = child_speed(spec) if spec["kind"] == "speed" else child_memory(spec)
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


# -- parent --------------------------------------------------------------------------------------


def prepare(args) -> dict:
    """Training blocks, NEXUS adapters and ESFT selections, made once (Ray), then Ray is shut down."""
    import ray

    corpus_dir, model_dir = M.demo_inputs(args)
    seq_len = M.default_seq_len(model_dir, args.seq_len)
    domain = M.split_path(corpus_dir, "domain")
    args.work.mkdir(parents=True, exist_ok=True)
    started = M.start_ray()
    needed = args.batch_size * (args.warmup + args.steps)
    blocks = packed_blocks([domain], model_dir, seq_len, max_tokens=needed * seq_len)
    blocks_path = args.work / "blocks.safetensors"
    save_file({"blocks": blocks.contiguous()}, str(blocks_path))
    methods = [M.get_method(n) for n in args.methods]
    tokens = 20_000 if args.quick else 100_000
    inits = M.NexusInits(str(model_dir), [domain], args.work / "inits" / model_dir.name, sample_tokens=tokens,
                         collect_tokens=tokens, seq_len=seq_len)  # fmt: skip
    fixed = M.FixedInits.make(inits, methods)
    k = M.teacher_k(methods)
    teacher = args.work / f"teacher-top{k}.safetensors"
    if k:  # offline KD: the teacher pass runs here, once, like `nexus distill` before training
        M.TeacherTable.make(model_dir, blocks, k, teacher)
    if started:
        ray.shutdown()  # its processes would otherwise share the CPUs with the measurements
    return {"model": str(model_dir), "blocks": str(blocks_path), "seq_len": seq_len, "inits": fixed.to_dict(),
            "teacher": str(teacher), "teacher_k": k}  # fmt: skip


def measure(args, ctx: dict, kind: str, **extra) -> dict:
    """Run one child (``kind`` speed or memory) and return what it measured."""
    spec = {
        "kind": kind,
        "model": ctx["model"],
        "blocks": ctx["blocks"],
        "inits": ctx["inits"],
        "teacher": ctx["teacher"],
        "teacher_k": ctx["teacher_k"],
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "memory_steps": args.memory_steps,
        "threads": args.threads,
        "checkpointing": args.checkpointing,
        **extra,
    }
    return M.run_child(__file__, spec, args.threads, f"{kind} child {extra}")


#: the reference: the LoRA with about NEXUS's trainable parameters
REFERENCE = "lora-r11"


def summarise(speed: dict, memory: list[dict], names: list[str]) -> list[dict]:
    times = speed["times"]
    ref = times.get(REFERENCE)
    rows = []
    for name in names:
        mem = next(m for m in memory if m["method"] == name)
        step_s = statistics.median(times[name])
        row = {
            "method": name,
            "label": mem["label"],
            "trainable_params": mem["trainable_params"],
            "step_s": step_s,
            "tokens_per_s": speed["tokens_per_step"] / step_s,
            # per turn, LoRA's step time / this method's: > 1 means faster than LoRA
            "speed_vs_lora": statistics.median(r / t for r, t in zip(ref, times[name])) if ref else None,
            "step_s_all": [round(t, 3) for t in times[name]],
            "peak_rss_mb": mem["peak_rss_mb"],
            "loaded_rss_mb": mem["loaded_rss_mb"],
            "training_rss_mb": mem["peak_rss_mb"] - mem["loaded_rss_mb"],
        }
        rows.append(row)
    ref_mem = next((r for r in rows if r["method"] == REFERENCE), None)
    for r in rows:
        r["memory_vs_lora"] = r["peak_rss_mb"] / ref_mem["peak_rss_mb"] if ref_mem else None
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | tokens/s (median step) | s/step | speed vs LoRA r11 (paired) | peak RSS MB | RSS over loaded model MB | memory vs LoRA r11 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sv = f"{r['speed_vs_lora']:.2f}x" if r["speed_vs_lora"] else "-"
        mv = f"{r['memory_vs_lora']:.2f}x" if r["memory_vs_lora"] else "-"
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {sv} "
            f"| {r['peak_rss_mb']:.0f} | {r['training_rss_mb']:.0f} | {mv} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    t0 = time.perf_counter()
    ctx = prepare(args)
    names = list(args.methods)
    memory = []
    for name in names:
        m = measure(args, ctx, "memory", method=name)
        memory.append(m)
        print(
            f"memory {name:12s} peak {m['peak_rss_mb']:.0f} MB  params {m['trainable_params']:,}", flush=True
        )
    speed = measure(args, ctx, "speed", methods=names)
    for name in names:
        print(f"speed  {name:12s} median step {statistics.median(speed['times'][name]):.3f} s", flush=True)
    rows = summarise(speed, memory, names)
    md = table(rows)
    print(md)
    result = {
        "settings": {
            "model": ctx["model"],
            "batch_size": args.batch_size,
            "seq_len": ctx["seq_len"],
            "tokens_per_step": args.batch_size * ctx["seq_len"],
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "memory_steps": args.memory_steps,
            "threads": args.threads,
            "gradient_checkpointing": args.checkpointing,
        },
        "rows": rows,
        "memory_runs": memory,
        "table_markdown": md,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "seconds": time.perf_counter() - t0,
    }
    full = not args.quick and args.model is None and args.size == "small" and args.methods == DEFAULT_METHODS
    default = ROOT / "benchmarks" / "results" if full else args.work
    out = Path(args.json) if args.json else default / "train_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
