"""Decode speed of a served model: base vs NEXUS vs LoRA-on-experts, in vLLM and in transformers.

One run measures, side by side on the same base (default: the small demo base, GPT-OSS
architecture, built or reused by ``nexus.demo.ensure_demo``), generation tokens/s at batch 1
and batch 16 (greedy, ``--new-tokens`` new tokens after a ``--prompt-len``-token prompt, EOS
ignored; prefill included, decode dominates) of

- ``base``: the base model;
- ``nexus``: base + a NEXUS adapter (one shared expert per MoE layer, the experts' width or
  ``--shared-width``);
  in vLLM the ``nexus export --format vllm`` directory (the plugin's architecture);
- ``lora``: base + a PEFT LoRA on the fused expert tensors (``target_parameters``
  ``mlp.experts.gate_up_proj``/``down_proj``, as benchmarks/methods.py builds its LoRA
  baselines) with the rank that gives the same parameter count as the NEXUS adapter.

transformers runs in this process (``generate``; the three methods interleaved per repeat, so
machine load hits them alike); vLLM runs in its own environment (``.venv-vllm``, see ``./dev``)
through :mod:`nexus.serving.vllm_run`, one engine per model, eager mode (no torch.compile:
on a CPU its compile time would dominate a short run). A method vLLM cannot run is reported with
its error. Results: a table on stdout and ``benchmarks/results/serve.json``. The target is
NEXUS >= 0.9x base decode tokens/s in vLLM.

    python benchmarks/serve.py                       # demo base, batch 1 and 16
    python benchmarks/serve.py --new-tokens 32 --repeats 2 --batch-sizes 1 4   # quicker
    python benchmarks/serve.py --shared-width 64     # a quarter-width shared expert (LoRA rank matched)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("base", "nexus", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", help="demo base size (small: GPT-OSS, 4 layers x 8 experts)")
    p.add_argument("--model", help="another base model directory instead of the demo")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--shared-width", type=int, default=None, help="the shared expert's width (default: an expert's)"
    )
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16, for both engines")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads for transformers (default: torch's)"
    )
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--no-vllm", action="store_true", help="transformers only")
    p.add_argument(
        "--eager", action="store_true", help="vLLM without torch.compile (vllm serve compiles by default)"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    return p.parse_args(argv)


def count(params) -> int:
    return sum(p.numel() for p in params)


def make_adapters(model_dir: Path, work: Path, dtype, width: int | None = None) -> dict:
    """The NEXUS adapter (+ its vLLM export) and a PEFT LoRA of the same parameter count."""
    import nexus
    from nexus.stages.export import export_vllm

    model = nexus.load_model(model_dir, dtype=dtype)
    nexus.attach_shared_experts(model, init="random", seed=0, intermediate_size=width)
    nexus.save_adapter(model, work / "nexus-adapter")
    nexus_params = count(p for se in nexus.shared_expert_modules(model).values() for p in se.parameters())
    export_vllm(model_dir, work / "nexus-adapter", work / "nexus-vllm")
    per_rank = count(p for n, p in lora_model(model_dir, 1, dtype).named_parameters() if "lora_" in n)
    rank = max(1, round(nexus_params / per_rank))
    peft_model = lora_model(model_dir, rank, dtype, peft=True)
    peft_model.save_pretrained(str(work / "lora"))
    lora_params = count(p for n, p in peft_model.named_parameters() if "lora_" in n)
    return {"nexus_params": nexus_params, "lora_rank": rank, "lora_params": lora_params}


def lora_model(model_dir: Path, rank: int, dtype, peft: bool = False):
    """Base + PEFT LoRA (rank ``rank``) on the fused expert tensors, B random so it is not a no-op."""
    from peft import LoraConfig, get_peft_model

    import nexus

    model = nexus.load_model(model_dir, dtype=dtype)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )
    wrapped = get_peft_model(model, config)
    return wrapped if peft else wrapped.get_base_model()


def transformers_speed(model_dir: Path, work: Path, prompts: torch.Tensor, args, dtype, rank: int) -> dict:
    import nexus

    models = {"base": nexus.load_model(model_dir, dtype=dtype)}
    models["nexus"] = nexus.load_model(model_dir, dtype=dtype)
    nexus.load_adapter(models["nexus"], work / "nexus-adapter")
    models["lora"] = lora_model(model_dir, rank, dtype)
    out: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    for bs in args.batch_sizes:
        batch = prompts[:bs]
        rates: dict[str, list[float]] = {m: [] for m in METHODS}
        for m in METHODS:  # warm-up
            generate(models[m], batch, 4)
        for _ in range(args.repeats):
            for m in METHODS:
                started = time.perf_counter()
                generate(models[m], batch, args.new_tokens)
                rates[m].append(bs * args.new_tokens / (time.perf_counter() - started))
        for m in METHODS:
            out[m][str(bs)] = statistics.median(rates[m])
    return out


@torch.no_grad()
def generate(model, ids: torch.Tensor, n: int) -> None:
    model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)


def vllm_speed(model_dir: Path, work: Path, prompts: torch.Tensor, args, rank: int) -> dict:
    from nexus.serving.vllm_run import run_in_vllm_env
    from nexus.stages.export import vllm_base_dir

    base = vllm_base_dir(model_dir, work / "base-vllm")  # the base as the export holds it
    job = {
        "models": {
            "base": str(base),
            "nexus": str(work / "nexus-vllm"),
            "lora": {"path": str(base), "lora": str(work / "lora"), "rank": rank},
        },
        "prompts": prompts.tolist(),
        "max_tokens": 0,
        "dtype": args.dtype,
        "max_model_len": args.prompt_len + args.new_tokens + 8,
        "max_num_seqs": max(args.batch_sizes),
        "enforce_eager": args.eager,
        "timing": {"batch_sizes": args.batch_sizes, "new_tokens": args.new_tokens, "repeats": args.repeats},
    }
    results = run_in_vllm_env(args.vllm_python, job, work)
    return {m: r.get("tokens_per_s") or {"error": r.get("error", "no result")} for m, r in results.items()}


def table(results: dict, batch_sizes: list[int]) -> str:
    lines = []
    for engine, by_method in results.items():
        head = " | ".join(f"batch {bs} tok/s | vs base" for bs in batch_sizes)
        lines += [f"| {engine} | {head} |", "|---|" + "---:|" * (2 * len(batch_sizes))]
        for m in METHODS:
            r = by_method.get(m, {})
            if "error" in r:
                lines.append(f"| {m} | not supported: {r['error'][:120]} |")
                continue
            cells = []
            for bs in batch_sizes:
                v, b = r.get(str(bs)), by_method["base"].get(str(bs))
                cells += [f"{v:.1f}" if v else "-", f"{v / b:.2f}x" if v and b else "-"]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from nexus.models.loading import load_config, parse_dtype

    if args.model:
        model_dir = Path(args.model)
    else:
        from nexus.demo import ensure_demo

        model_dir = ensure_demo(args.size, progress=False)[1]
    dtype = parse_dtype(args.dtype)
    vocab = load_config(model_dir).vocab_size
    prompts = torch.randint(
        3, vocab, (max(args.batch_sizes), args.prompt_len), generator=torch.Generator().manual_seed(0)
    )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="nexus-serve-") as tmp:
        work = Path(tmp)
        sizes = make_adapters(model_dir, work, dtype, args.shared_width)
        results = {
            "transformers": transformers_speed(model_dir, work, prompts, args, dtype, sizes["lora_rank"])
        }
        if not args.no_vllm:
            results["vllm"] = vllm_speed(model_dir, work, prompts, args, sizes["lora_rank"])
    report = {
        "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": str(model_dir) if args.model else f"demo-{args.size}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "vllm_python")},
        **sizes,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1min_before": load_before,
            "torch_threads": torch.get_num_threads(),
        },
        "tokens_per_s": results,
    }
    vllm = results.get("vllm", {})
    if "error" not in vllm.get("nexus", {"error": 1}):
        report["nexus_vs_base_vllm"] = {bs: vllm["nexus"][bs] / vllm["base"][bs] for bs in vllm["base"]}
    print(
        f"NEXUS adapter: {sizes['nexus_params']:,} parameters; LoRA on experts: rank {sizes['lora_rank']}, {sizes['lora_params']:,}"
    )
    print(table(results, args.batch_sizes))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
