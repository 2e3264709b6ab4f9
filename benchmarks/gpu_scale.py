"""GPU check at real scale: a GPT-OSS-20B-shaped model on one H100/H200, random bf16 weights.

No download: the model is built from a config with GPT-OSS-20B's shape (24 layers, 32
experts top-4, hidden and expert width 2880, 64 query / 8 KV heads of 64, vocabulary
201,088, alternating sliding-window (128) and full attention) and random bf16 weights on
the GPU. A NEXUS shared expert (fp32 master weights, bf16 autocast) is attached to all 24
layers, gradient checkpointing is on, and the training step is exactly ``nexus train``'s
(``benchmarks/methods.py`` -> ``compute_losses``: chunked CE + KD from the same model with
the shared experts off). It measures

- training tokens/s at sequence length 2048 (median over the timed steps);
- model FLOP utilisation: the step's model FLOPs (teacher forward + student forward +
  backward, which for the frozen base is the input gradient only, plus the shared experts'
  weight gradients; attention scores counted over the visible context; checkpoint
  recomputation not counted) / step time / the card's dense bf16 peak;
- peak GPU memory (``torch.cuda.max_memory_allocated``) during training;
- collection tokens/s: :class:`nexus.stages.collect.RouterCollector` (router statistics, shared
  experts off) on the same model.

It keeps to an 8-minute budget (it stops timing early rather than overrun) and prints one
JSON line. ``--tiny`` runs the same code on a tiny shape (on the CPU when there is no GPU),
for a smoke test.

    python benchmarks/gpu_scale.py               # on a machine with an H100/H200
    python benchmarks/gpu_scale.py --tiny        # CPU smoke test (seconds)

The JSON line is also written to ``benchmarks/results/gpu_scale.json`` (full shape; not with
``--tiny``), or to ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: dense bf16 peak (TFLOP/s) by device name fragment, most specific first
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
]


def gpt_oss_20b_config(tiny: bool = False):
    from transformers import GptOssConfig

    if tiny:
        shape = dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, hidden_size=64,
                     intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=512, sliding_window=32, max_position_embeddings=256)  # fmt: skip
    else:
        shape = dict(num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4, hidden_size=2880,
                     intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8,
                     vocab_size=201_088, sliding_window=128, max_position_embeddings=131_072)  # fmt: skip
    n = shape["num_hidden_layers"]
    return GptOssConfig(
        **shape,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        use_cache=False,
    )


def model_flops_per_token(cfg, seq_len: int, shared_params_per_layer: int, kd: bool) -> dict:
    """Matmul FLOPs per token of one NEXUS training step (see the module docstring)."""
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    attn_proj = H * q + 2 * H * kv + q * H
    expert = 3 * H * cfg.intermediate_size
    router = H * cfg.num_local_experts
    lm_head = H * cfg.vocab_size
    base_params = L * (attn_proj + router + cfg.num_experts_per_tok * expert) + lm_head
    ctx = []
    for t in cfg.layer_types:  # mean visible context per query position (causal, windowed)
        w = cfg.sliding_window if t == "sliding_attention" else seq_len
        w = min(w, seq_len)
        ctx.append((w * (w + 1) / 2 + (seq_len - w) * w) / seq_len)
    attn_scores = sum(4 * q * c for c in ctx)  # QK^T and AV, forward
    base_fwd = 2 * base_params + attn_scores
    shared_fwd = 2 * L * shared_params_per_layer
    # teacher forward (no grad) + student forward + backward (input grads everywhere, weight
    # grads for the shared experts only)
    total = (base_fwd if kd else 0) + (base_fwd + shared_fwd) + (base_fwd + shared_fwd) + shared_fwd
    return {
        "active_base_params_per_token": base_params,
        "shared_params": L * shared_params_per_layer,
        "forward_flops_per_token": base_fwd + shared_fwd,
        "train_flops_per_token": total,
    }


def peak_tflops(name: str) -> float | None:
    for frag, value in PEAK_TFLOPS:
        if frag in name:
            return value
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (128 with --tiny)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed training steps (at most)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--loss-chunk", type=int, default=512, help="positions per chunk of the vocabulary loss")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--attn", default="eager", help="attention implementation (eager, flex_attention, ...)")
    p.add_argument("--experts", default=None, help="experts implementation (default: transformers')")
    p.add_argument("--collect-batches", type=int, default=4)
    p.add_argument("--collect-batch-size", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=360.0, help="stop timing steps after this many seconds")
    p.add_argument("--watchdog-s", type=float, default=465.0,
                   help="print what was measured so far and exit after this many seconds")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (--tiny only)")
    p.add_argument("--json", default=None, help="also write the JSON line here (default: see the docstring)")
    args = p.parse_args(argv)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    return args


#: what has been measured so far (printed by the watchdog if the run overstays)
PARTIAL: dict = {}


def run(args) -> dict:
    import methods as M
    import numpy as np
    import torch

    from nexus.method.attach import attach_shared_experts, shared_expert_modules, shared_experts_disabled
    from nexus.stages.collect import RouterCollector
    from nexus.stages.train.core import enable_checkpointing

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        return {"error": "no GPU: the GPT-OSS-20B shape needs one (use --tiny for a CPU smoke test)"}
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    out = PARTIAL  # filled in as measurements come, so the watchdog can report them
    out.update({"benchmark": "gpu_scale", "device": name, "shape": "tiny" if args.tiny else "gpt-oss-20b"})
    torch.manual_seed(0)
    cfg = gpt_oss_20b_config(args.tiny)
    cfg._attn_implementation = args.attn
    if args.experts:
        cfg._experts_implementation = args.experts
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    if on_gpu:
        torch.cuda.synchronize(device)
    out["build_s"] = round(time.perf_counter() - t, 2)
    out["base_params"] = sum(p.numel() for p in model.parameters())
    attach_shared_experts(model, init="random", gate="scalar", seed=0)  # fp32 masters, base frozen
    se = shared_expert_modules(model)
    shared_per_layer = sum(p.numel() for p in next(iter(se.values())).parameters())
    out["shared_expert_layers"] = len(se)
    out["trainable_params"] = shared_per_layer * len(se)
    if not args.no_checkpointing:
        enable_checkpointing(model)
    out["gradient_checkpointing"] = not args.no_checkpointing
    out["weights_gb"] = round(torch.cuda.memory_allocated(device) / 1e9, 2) if on_gpu else None

    method = M.Method("nexus", "nexus", "NEXUS (random init, scalar gate)", lr=1e-4, init="random",
                      kd_weight=args.kd_weight)  # fmt: skip
    steps = args.warmup + args.steps
    tcfg = M.train_config(method, "(random weights)", seed=0, steps=steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, warmup_steps=1, loss_chunk=args.loss_chunk)  # fmt: skip
    built = M.Built(method, model, tcfg, [p for p in model.parameters() if p.requires_grad])
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield torch.randint(2, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen)

    records: list = []

    class _Stop(Exception):
        pass

    def on_step(rec):
        records.append(rec)
        if time.perf_counter() > deadline and len(records) > args.warmup:
            raise _Stop

    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if on_gpu else None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        M.train(built, batches(), on_step=on_step, autocast=autocast, device=device)
    except _Stop:
        out["stopped_early"] = True
    except FloatingPointError as exc:  # random weights: report it, keep the timings
        out["warning"] = str(exc)
    timed = records[args.warmup :] or records[-1:]
    step_s = statistics.median(r.seconds for r in timed)
    tokens = args.batch_size * args.seq_len
    flops = model_flops_per_token(cfg, args.seq_len, shared_per_layer, args.kd_weight > 0)
    peak = args.peak_tflops or (peak_tflops(name) if on_gpu else None)
    out.update(
        {
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "kd_weight": args.kd_weight,
            "train_steps_timed": len(timed),
            "train_step_s": round(step_s, 4),
            "train_tokens_per_s": round(tokens / step_s, 1),
            "train_loss_first_last": [round(records[0].loss, 4), round(records[-1].loss, 4)],
            "train_flops_per_token": flops["train_flops_per_token"],
            "achieved_tflops": round(flops["train_flops_per_token"] * tokens / step_s / 1e12, 2),
            "peak_tflops_bf16": peak,
            "mfu": round(flops["train_flops_per_token"] * tokens / step_s / (peak * 1e12), 4)
            if peak
            else None,
            "active_base_params_per_token": flops["active_base_params_per_token"],
            "train_peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            if on_gpu
            else None,
            "train_peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 2)
            if on_gpu
            else None,
        }
    )
    del built
    for p in model.parameters():
        p.grad = None

    # -- collection ---------------------------------------------------------------------------
    collector = RouterCollector(model, device=str(device))
    rng = np.random.default_rng(0)
    seqs = [
        [rng.integers(2, cfg.vocab_size, args.seq_len) for _ in range(args.collect_batch_size)]
        for _ in range(args.collect_batches + 1)
    ]
    times = []
    with shared_experts_disabled(model):
        for i, batch in enumerate(seqs):
            if time.perf_counter() > deadline + 30 and times:
                break
            if on_gpu:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            collector.collect_batch(batch)
            if on_gpu:
                torch.cuda.synchronize(device)
            if i > 0:  # first batch: warmup
                times.append(time.perf_counter() - t)
    times = times or [time.perf_counter() - t]
    out["collect_batches_timed"] = len(times)
    out["collect_tokens_per_s"] = round(args.collect_batch_size * args.seq_len / statistics.median(times), 1)
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    if not math.isfinite(out["train_tokens_per_s"]):
        out["warning"] = "non-finite throughput"
    return out


class _Watchdog(Exception):
    pass


def _alarm(signum, frame):
    raise _Watchdog


def main(argv=None) -> int:
    import signal

    args = parse_args(argv)
    if args.watchdog_s and hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(args.watchdog_s)))
    try:
        out = run(args)
    except _Watchdog:
        out = {**PARTIAL, "error": f"watchdog: still running after {args.watchdog_s:.0f} s"}
    except Exception as exc:  # one JSON line whatever happens, so the caller can record it
        out = {**PARTIAL, "benchmark": "gpu_scale", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    print(json.dumps(out, default=str), flush=True)
    path = args.json or (
        None if args.tiny else Path(__file__).resolve().parent / "results" / "gpu_scale.json"
    )
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, default=str, indent=1) + "\n")
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
