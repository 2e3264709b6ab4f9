"""GPU check at real scale: GPT-OSS-20B and GPT-OSS-120B shapes, packed MXFP4 experts, one H100/H200.

No download: each model is built from a config with the published shape (20B: 24 layers, 32
experts; 120B: 36 layers, 128 experts; both top-4, hidden and expert width 2880, 64 query / 8
KV heads of 64, vocabulary 201,088, alternating sliding-window (128) and full attention). The
routed experts are NEXUS's packed MXFP4 experts (:class:`nexus.weights.packed.PackedGptOssExperts`,
``--experts packed``, the default) filled with random MXFP4 blocks and scales straight on the
GPU (the model is built on the meta device, so no dequantised copy ever exists), or
transformers' bf16 experts (``--experts dequantized``, 20B only: 120B's would need 229 GB).
Everything else is random bf16 from transformers' own initialisation. A NEXUS shared expert (fp32
master weights, bf16 autocast) is attached to every layer, gradient checkpointing is on, and the
training step is exactly ``nexus train``'s (``benchmarks/methods.py`` -> ``optimizer_step``:
chunked CE + KD from the same model with the shared experts off). Per shape it measures

- training tokens/s at sequence length 2048 (median over the timed steps);
- the share of a training step spent decoding MXFP4 (one profiled step: the GPU time of the
  kernels under ``nexus::mxfp4_decode.*`` / the step's wall time; target under 10% on a GPU)
  and the decoding rate in packed GB/s;
- model FLOP utilisation: the step's model FLOPs (teacher forward + student forward +
  backward, which for the frozen base is the input gradient only, plus the shared experts'
  weight gradients; attention scores counted over the visible context; checkpoint
  recomputation not counted) / step time / the card's dense bf16 peak;
- peak GPU memory (``torch.cuda.max_memory_allocated``) during training and collection, next
  to ``nexus plan``'s prediction for the same settings (the plan adds the CUDA context and
  workspaces, ``runtime``, which the allocator does not see: both are printed);
- collection tokens/s: :class:`nexus.stages.collect.RouterCollector` (router statistics, shared
  experts off) on the same model.

A shape the plan says does not fit the card is skipped with the plan's numbers. The run keeps
to an 8-minute budget (each shape stops timing early rather than overrun; a watchdog prints
what was measured) and prints one JSON line. ``--tiny`` runs the same code on a tiny shape (on
the CPU when there is no GPU), for a smoke test that the test suite runs.

    python benchmarks/gpu_scale.py                         # 20B and 120B, packed (H100/H200)
    python benchmarks/gpu_scale.py --shapes 20b --experts dequantized
    python benchmarks/gpu_scale.py --tiny                  # CPU smoke test (seconds)

The JSON line is also written to ``benchmarks/results/gpu_scale.json`` (not with ``--tiny``), or
to ``--json PATH``.
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


#: the published shapes (what differs between them); everything else is common
SHAPES = {
    "tiny": dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, hidden_size=64,
                 intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512, sliding_window=32, max_position_embeddings=256),
    "20b": dict(num_hidden_layers=24, num_local_experts=32),
    "120b": dict(num_hidden_layers=36, num_local_experts=128),
}  # fmt: skip
GPT_OSS = dict(num_experts_per_tok=4, hidden_size=2880, intermediate_size=2880, head_dim=64,
               num_attention_heads=64, num_key_value_heads=8, vocab_size=201_088, sliding_window=128,
               max_position_embeddings=131_072)  # fmt: skip


def gpt_oss_config(shape: str = "20b"):
    """A ``GptOssConfig`` of the named shape (``tiny``, ``20b``, ``120b``)."""
    from transformers import GptOssConfig

    dims = SHAPES[shape] if shape == "tiny" else {**GPT_OSS, **SHAPES[shape]}
    n = dims["num_hidden_layers"]
    return GptOssConfig(
        **dims,
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


def build_model(cfg, experts: str, device):
    """GPT-OSS of ``cfg``'s shape on ``device`` in bf16, random weights, routed experts packed
    (random MXFP4 blocks, scales near 2^-8 so weights are ~0.02 like the initialiser's) or
    dequantised. Packed: built on the meta device and materialised on ``device``, so the bf16
    experts never exist."""
    import torch
    from transformers import AutoModelForCausalLM

    if experts == "dequantized":
        with torch.device(device):
            return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    from nexus.weights.packed import PROJECTIONS, PackedGptOssExperts, swap_in_packed_experts

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    swap_in_packed_experts(model)
    model.to_empty(device=device)
    model.apply(model._init_weights)  # transformers' own initialisation, rotary tables included
    gen = torch.Generator(device).manual_seed(0)
    for module in model.modules():
        if isinstance(module, PackedGptOssExperts):
            for proj in PROJECTIONS:
                getattr(module, f"{proj}_blocks").random_(0, 256, generator=gen)
                getattr(module, f"{proj}_scales").random_(117, 121, generator=gen)  # 2^-10 .. 2^-7
                bias = getattr(module, f"{proj}_bias")
                module.register_buffer(f"{proj}_bias", torch.zeros_like(bias, dtype=torch.bfloat16))
    return model


def plan_prediction(cfg, args, experts: str, gpu_memory_gb: float | None) -> dict:
    """``nexus plan``'s prediction (GB per worker, verdict) for this run's settings."""
    import tempfile

    import nexus
    from nexus.planner import GB
    from nexus.weights.mxfp4 import GPT_OSS_QUANTIZATION_CONFIG

    with tempfile.TemporaryDirectory() as d:
        if experts == "packed":  # what a published MXFP4 checkpoint's config says
            cfg.quantization_config = dict(GPT_OSS_QUANTIZATION_CONFIG)
        cfg.save_pretrained(d)
        cfg.quantization_config = None
        p = nexus.plan(
            d, stages=("collect", "train"), experts=experts, dtype="bfloat16", seq_len=args.seq_len,
            batch_size=args.batch_size, kd_weight=args.kd_weight, loss_chunk=args.loss_chunk,
            gradient_checkpointing=not args.no_checkpointing, workers=1,
            overrides=[f"collect.batch_size={args.collect_batch_size}"],
            **({"gpus": 1, "gpu_memory": gpu_memory_gb} if gpu_memory_gb else {}),
        )  # fmt: skip
    return {
        name: {"peak_gb": round(s.peak / GB, 2), "runtime_gb": round(s.parts.get("runtime", 0.0) / GB, 2),
               "fits": s.fits}
        for name, s in p.stages.items()
    }  # fmt: skip


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
    p.add_argument("--shapes", default="20b,120b", help="comma-separated: 20b, 120b (ignored with --tiny)")
    p.add_argument("--experts", choices=("packed", "dequantized"), default="packed",
                   help="routed experts packed in MXFP4 (default) or transformers' bf16 ones")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (128 with --tiny)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed training steps (at most)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--loss-chunk", type=int, default=512, help="positions per chunk of the vocabulary loss")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--attn", default="eager", help="attention implementation (eager, flex_attention, ...)")
    p.add_argument("--experts-impl", default=None, help="transformers' experts implementation (dequantized)")
    p.add_argument("--collect-batches", type=int, default=4)
    p.add_argument("--collect-batch-size", type=int, default=4)
    p.add_argument(
        "--budget-s", type=float, default=150.0, help="per shape: stop timing steps after this many seconds"
    )
    p.add_argument("--watchdog-s", type=float, default=465.0,
                   help="print what was measured so far and exit after this many seconds")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (--tiny only)")
    p.add_argument("--json", default=None, help="also write the JSON line here (default: see the docstring)")
    args = p.parse_args(argv)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    args.shapes = ["tiny"] if args.tiny else [x.strip() for x in args.shapes.split(",") if x.strip()]
    unknown = [x for x in args.shapes if x not in SHAPES or (x == "tiny") != args.tiny]
    if unknown:
        p.error(f"unknown shape(s) {', '.join(unknown)}; choose from 20b, 120b")
    return args


#: what has been measured so far (printed by the watchdog if the run overstays)
PARTIAL: dict = {}


def run(args) -> dict:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        return {"error": "no GPU: the GPT-OSS shapes need one (use --tiny for a CPU smoke test)"}
    on_gpu = device.type == "cuda"
    out = PARTIAL  # filled in as measurements come, so the watchdog can report them
    out.update({"benchmark": "gpu_scale", "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                "experts": args.experts, "seq_len": args.seq_len, "batch_size": args.batch_size,
                "kd_weight": args.kd_weight, "gradient_checkpointing": not args.no_checkpointing,
                "shapes": {}})  # fmt: skip
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if on_gpu else None
    for shape in args.shapes:
        result = out["shapes"][shape] = {}
        try:
            run_shape(args, shape, device, gpu_gb, result)
        except torch.OutOfMemoryError as exc:
            result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        if on_gpu:
            torch.cuda.empty_cache()
    return out


def _decode_profile(step, on_gpu: bool) -> dict:
    """One profiled training step: the share of its wall time spent decoding MXFP4 (GPU kernel
    time under ``nexus::mxfp4_decode.*`` on a GPU, CPU time on the CPU) and the decoding rate."""
    from torch.profiler import ProfilerActivity, profile

    from nexus.weights.packed import DECODE_LABEL

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        rec = step()
    decode_us, calls = 0.0, 0
    for ev in prof.key_averages():
        if ev.key.startswith(DECODE_LABEL):
            decode_us += ev.device_time_total if on_gpu else ev.cpu_time_total
            calls += ev.count
    return {"profiled_step_s": round(rec.seconds, 4), "decode_s": round(decode_us / 1e6, 4),
            "decode_share": round(decode_us / 1e6 / rec.seconds, 4), "decode_calls": calls}  # fmt: skip


def run_shape(args, shape: str, device, gpu_gb: float | None, out: dict) -> None:
    """Build, train and collect on one shape; fills ``out`` as it goes."""
    import methods as M
    import numpy as np
    import torch

    from nexus.method.attach import attach_shared_experts, shared_expert_modules, shared_experts_disabled
    from nexus.stages.collect import RouterCollector
    from nexus.stages.train.core import enable_checkpointing
    from nexus.weights.packed import PackedGptOssExperts

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    on_gpu = device.type == "cuda"
    cfg = gpt_oss_config(shape)
    cfg._attn_implementation = args.attn
    if args.experts_impl:
        cfg._experts_implementation = args.experts_impl
    out["plan"] = plan_prediction(cfg, args, args.experts, gpu_gb)
    if out["plan"]["train"]["fits"] is False:
        out["skipped"] = (
            f"nexus plan: training needs {out['plan']['train']['peak_gb']} GB, the card has {gpu_gb:.0f}"
        )
        return
    torch.manual_seed(0)
    t = time.perf_counter()
    model = build_model(cfg, args.experts, device)
    model.eval()
    if on_gpu:
        torch.cuda.synchronize(device)
    out["build_s"] = round(time.perf_counter() - t, 2)
    out["base_params"] = sum(p.numel() for p in model.parameters())
    packed = [m for m in model.modules() if isinstance(m, PackedGptOssExperts)]
    out["packed_expert_bytes"] = sum(b.numel() * b.element_size() for m in packed for b in m.buffers())
    attach_shared_experts(model, init="random", gate="scalar", seed=0)  # fp32 masters, base frozen
    se = shared_expert_modules(model)
    shared_per_layer = sum(p.numel() for p in next(iter(se.values())).parameters())
    out["trainable_params"] = shared_per_layer * len(se)
    if not args.no_checkpointing:
        enable_checkpointing(model)
    out["weights_gb"] = round(torch.cuda.memory_allocated(device) / 1e9, 2) if on_gpu else None

    method = M.Method("nexus", "nexus", "NEXUS (random init, scalar gate)", lr=1e-4, init="random",
                      kd_weight=args.kd_weight)  # fmt: skip
    steps = args.warmup + args.steps + 1  # + the profiled step
    tcfg = M.train_config(method, "(random weights)", seed=0, steps=steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, warmup_steps=1, loss_chunk=args.loss_chunk)  # fmt: skip
    built = M.Built(method, model, tcfg, [p for p in model.parameters() if p.requires_grad])
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield torch.randint(2, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen)

    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if on_gpu else None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    stepper = M.Stepper(built, batches(), autocast=autocast, device=device)
    records = []
    try:
        while len(records) < args.warmup + args.steps:
            records.append(stepper.step())
            if time.perf_counter() > deadline and len(records) > args.warmup:
                out["stopped_early"] = True
                break
        if packed:
            out.update(_decode_profile(stepper.step, on_gpu))
            # each call decodes one expert's gate_up or down, and every visited expert decodes
            # both: calls x the mean packed bytes of one (blocks + scales) is what was read
            packed_bytes = sum(
                b.numel() for m in packed for n, b in m.named_buffers() if not n.endswith("_bias")
            )
            per_call = packed_bytes / (2 * len(packed) * cfg.num_local_experts)
            out["decode_packed_gb_per_s"] = round(
                out["decode_calls"] * per_call / 1e9 / max(out["decode_s"], 1e-9), 2
            )
    except FloatingPointError as exc:  # random weights: report it, keep the timings
        out["warning"] = str(exc)
    timed = records[args.warmup :] or records[-1:]
    step_s = statistics.median(r.seconds for r in timed)
    tokens = args.batch_size * args.seq_len
    flops = model_flops_per_token(cfg, args.seq_len, shared_per_layer, args.kd_weight > 0)
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if on_gpu else None)
    achieved = flops["train_flops_per_token"] * tokens / step_s
    out.update(
        {
            "train_steps_timed": len(timed),
            "train_step_s": round(step_s, 4),
            "train_tokens_per_s": round(tokens / step_s, 1),
            "train_loss_first_last": [round(records[0].loss, 4), round(records[-1].loss, 4)],
            "train_flops_per_token": flops["train_flops_per_token"],
            "achieved_tflops": round(achieved / 1e12, 2),
            "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
            "active_base_params_per_token": flops["active_base_params_per_token"],
            "train_peak_gpu_memory_gb": _peak_gb(device),
        }
    )
    del built, stepper
    for p in model.parameters():
        p.grad = None

    # -- collection ---------------------------------------------------------------------------
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    collector = RouterCollector(model, device=str(device))
    rng = np.random.default_rng(0)
    times = []
    with shared_experts_disabled(model):
        for i in range(args.collect_batches + 1):
            batch = [rng.integers(2, cfg.vocab_size, args.seq_len) for _ in range(args.collect_batch_size)]
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
    out["collect_peak_gpu_memory_gb"] = _peak_gb(device)
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    if not math.isfinite(out["train_tokens_per_s"]):
        out["warning"] = "non-finite throughput"
    del model, collector


def _peak_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


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
