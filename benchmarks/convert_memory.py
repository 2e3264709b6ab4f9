"""Memory benchmark of ``nexus convert`` on a GPT-OSS-20B-shaped MXFP4 checkpoint.

Writes a checkpoint with GPT-OSS-20B's exact tensor names, shapes, dtypes and three-shard
layout (24 layers x 32 experts, width 2880, experts as MXFP4 ``*_blocks``/``*_scales``,
everything else bf16; random values, about 13.8 GB) into a temporary directory, builds a
top-8 selection with ``nexus analyze`` from synthetic router statistics, then runs

    python -m nexus convert --model CKPT --selection SEL --output ADAPTER

as a child process on a fresh local Ray instance and samples the resident memory of that
process and all its descendants (driver, GCS, raylet, agents, workers) every 0.1 s. The
reported peak is the largest *sum of RSS* over the tree (shared pages counted once per
process, so an upper bound) and, alongside, the sum of PSS. Finally it checks two layers of
the adapter against an independent dequantisation (transformers' own MXFP4 decoder) and
deletes the checkpoint.

    .venv/bin/python benchmarks/convert_memory.py            # full size, about 5 min here
    .venv/bin/python benchmarks/convert_memory.py --layers 2 # quick smoke run

The raw results (JSON, with the command line and the machine) go to
``benchmarks/results/convert_memory.json`` for the full-size run and to
``runs/convert_memory-<layers>L-<experts>E-<hidden>H.json`` for a reduced one, so a smoke run
never replaces the figures ``docs/benchmarks.md`` cites; ``--json PATH`` overrides both.

Target (issue 5): peak <= 3 GB and wall time <= 10 min on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nexus.weights.checkpoint import SafetensorsWriter  # noqa: E402
from nexus.weights.mxfp4 import GPT_OSS_QUANTIZATION_CONFIG  # noqa: E402

SHARD_LIMIT = 4_800_000_000  # bytes per shard: gives GPT-OSS-20B's three shards
_CHUNK = 1 << 26  # elements generated and written per step (64 MB of uint8)


def gpt_oss_20b_config(layers: int, experts: int, hidden: int, vocab: int = 201088) -> dict:
    """GPT-OSS-20B's config.json (as published), with layer/expert/width overrides."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": min(200002, vocab - 1),  # a smaller --vocab keeps the ids inside it
        "experts_per_token": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": hidden,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "num_local_experts": experts,
        "output_router_logits": False,
        "pad_token_id": min(199999, vocab - 2),
        "quantization_config": GPT_OSS_QUANTIZATION_CONFIG,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab,
    }


def tensor_list(layers: int, experts: int, hidden: int, vocab: int = 201088) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of every GPT-OSS-20B tensor, in the checkpoint's sorted order."""
    H, I, E, heads, kv, hd = hidden, hidden, experts, 64, 8, 64  # noqa: E741
    out = [("model.embed_tokens.weight", "BF16", (vocab, H))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", "BF16", (H,)),
            (p + "mlp.experts.down_proj_bias", "BF16", (E, H)),
            (p + "mlp.experts.down_proj_blocks", "U8", (E, H, I // 32, 16)),
            (p + "mlp.experts.down_proj_scales", "U8", (E, H, I // 32)),
            (p + "mlp.experts.gate_up_proj_bias", "BF16", (E, 2 * I)),
            (p + "mlp.experts.gate_up_proj_blocks", "U8", (E, 2 * I, H // 32, 16)),
            (p + "mlp.experts.gate_up_proj_scales", "U8", (E, 2 * I, H // 32)),
            (p + "mlp.router.bias", "BF16", (E,)),
            (p + "mlp.router.weight", "BF16", (E, H)),
            (p + "post_attention_layernorm.weight", "BF16", (H,)),
            (p + "self_attn.k_proj.bias", "BF16", (kv * hd,)),
            (p + "self_attn.k_proj.weight", "BF16", (kv * hd, H)),
            (p + "self_attn.o_proj.bias", "BF16", (H,)),
            (p + "self_attn.o_proj.weight", "BF16", (H, heads * hd)),
            (p + "self_attn.q_proj.bias", "BF16", (heads * hd,)),
            (p + "self_attn.q_proj.weight", "BF16", (heads * hd, H)),
            (p + "self_attn.sinks", "BF16", (heads,)),
            (p + "self_attn.v_proj.bias", "BF16", (kv * hd,)),
            (p + "self_attn.v_proj.weight", "BF16", (kv * hd, H)),
        ]
    out += [("model.norm.weight", "BF16", (H,)), ("lm_head.weight", "BF16", (vocab, H))]
    return out


def _nbytes(dtype: str, shape: tuple) -> int:
    return int(np.prod(shape, dtype=np.int64)) * (2 if dtype == "BF16" else 1)


def _random_chunk(rng: np.random.Generator, name: str, dtype: str, n: int) -> np.ndarray:
    if name.endswith("_scales"):
        return rng.integers(118, 125, size=n, dtype=np.uint8)  # 2^-9 .. 2^-3: realistic magnitudes
    if dtype == "U8":
        return np.frombuffer(rng.bytes(n), dtype=np.uint8)
    # bf16 bits with a bounded exponent (|x| in [2^-17, 1)): finite, weight-like values
    r = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16)
    return (r & 0x807F) | ((110 + ((r >> 7) & 0xF)) << 7).astype(np.uint16)


def write_checkpoint(out: Path, layers: int, experts: int, hidden: int, vocab: int, seed: int = 0) -> int:
    """Write the sharded checkpoint (streamed: a 64 MB chunk in memory at a time)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(gpt_oss_20b_config(layers, experts, hidden, vocab), indent=2))
    tensors = tensor_list(layers, experts, hidden, vocab)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        n = _nbytes(t[1], t[2])
        if shards[-1] and size + n > SHARD_LIMIT:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    total = sum(_nbytes(t[1], t[2]) for t in tensors)
    names = [f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors" for i in range(len(shards))]
    rng = np.random.default_rng(seed)
    weight_map = {}
    for fname, entries in zip(names, shards):
        w = SafetensorsWriter(out / fname, entries, metadata={"format": "pt"})
        for name, dtype, shape in entries:
            weight_map[name] = fname
            n = int(np.prod(shape, dtype=np.int64))
            for start in range(0, n, _CHUNK):
                w.write(name, _random_chunk(rng, name, dtype, min(_CHUNK, n - start)))
        w.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_selection(work: Path, layers: int, experts: int, top_k: int) -> Path:
    """Synthetic router statistics -> ``nexus analyze --top-k`` selection."""
    import torch

    from nexus.method.stats import RouterStats
    from nexus.stages import analyze

    stats = RouterStats(list(range(layers)), experts, meta={"synthetic": True})
    g = torch.Generator().manual_seed(0)
    for pos in range(layers):
        p = torch.softmax(torch.randn(4096, experts, generator=g) * 2, -1)
        w, i = p.topk(4, -1)
        stats.update(pos, p, i, w)
    stats_dir = work / "stats"
    stats_dir.mkdir()
    stats.save(stats_dir)
    analyze.run(stats=stats_dir, output=work / "selection", top_k=top_k, overwrite=True, plots=False)
    return work / "selection"


class TreeSampler(threading.Thread):
    """Peak sum of RSS (and PSS) over a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs: dict[str, int] = {}
        self.max_procs = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            named = {}
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                    key = f"{p.pid}:{p.name()}"
                    named[key] = info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if rss > self.peak_rss:
                self.peak_rss, self.peak_procs = rss, named
            self.peak_pss = max(self.peak_pss, pss)
            self.max_procs = max(self.max_procs, len(procs))
            self.stop.wait(self.interval)


def verify(ckpt: Path, selection: Path, adapter: Path, layers: list[int]) -> float:
    """Largest |difference| between the adapter and an independent MXFP4 average."""
    import torch
    from safetensors import safe_open
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from nexus.method.adapter import read_adapter_tensors
    from nexus.stages.analyze import load_selection

    sel = load_selection(selection)
    tensors = read_adapter_tensors(adapter)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    worst = 0.0
    for layer in layers:
        experts = sel["per_layer"][str(layer)]["experts"]
        for proj, name in (("gate_up_proj", "w_in"), ("down_proj", "w_out")):
            key = f"model.layers.{layer}.mlp.experts.{proj}"
            with safe_open(str(ckpt / index[key + "_blocks"]), "pt") as f:
                blocks = torch.stack([f.get_slice(key + "_blocks")[e] for e in experts])
                scales = torch.stack([f.get_slice(key + "_scales")[e] for e in experts])
            ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2).mean(0)
            worst = max(worst, float((tensors[f"layers.{layer}.{name}"] - ref).abs().max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--vocab", type=int, default=201088)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--json", default=None, help="where to write the results (default: see above)")
    args = ap.parse_args(argv)
    out_json = Path(args.json) if args.json else default_json(args, ap)
    os.environ["RAY_ADDRESS"] = "local"  # a fresh Ray instance of our own, never someone else's cluster
    os.environ.setdefault("NEXUS_RAY_LOGS", "0")

    work = Path(tempfile.mkdtemp(prefix="nexus-convert-bench-", dir=args.workdir))
    ckpt = work / "gpt-oss-20b-shaped"
    result: dict = {
        "benchmark": "convert_memory",
        "benchmark_command": " ".join(["python", "benchmarks/convert_memory.py", *(argv or sys.argv[1:])]),
        "full_size": out_json == FULL_SIZE_JSON,
        "layers": args.layers,
        "experts": args.experts,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "top_k": args.top_k,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    try:
        t0 = time.time()
        total = write_checkpoint(ckpt, args.layers, args.experts, args.hidden, args.vocab)
        result["checkpoint_gb"] = round(total / 1e9, 2)
        result["shards"] = len(list(ckpt.glob("*.safetensors")))
        result["write_s"] = round(time.time() - t0, 1)
        print(
            f"checkpoint: {total / 1e9:.2f} GB in {result['shards']} shards, written in {result['write_s']} s"
        )

        sel = write_selection(work, args.layers, args.experts, args.top_k)
        import ray

        ray.shutdown()  # the analysis above ran on its own Ray instance; measure convert alone

        adapter = work / "adapter"
        cmd = [sys.executable, "-m", "nexus", "convert", "--model", str(ckpt), "--selection", str(sel)]
        cmd += ["--output", str(adapter)]
        env = dict(os.environ, RAY_ADDRESS="local", NEXUS_RAY_LOGS="0")
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.time() - t0
        sampler.stop.set()
        sampler.join()
        if rc != 0:
            print(f"convert failed with exit status {rc}")
            return rc
        result.update(
            {
                "command": " ".join(["python", *cmd[1:]]),
                "convert_wall_s": round(wall, 1),
                "peak_rss_tree_gb": round(sampler.peak_rss / 1e9, 3),
                "peak_pss_tree_gb": round(sampler.peak_pss / 1e9, 3),
                "max_processes": sampler.max_procs,
                "adapter_gb": round(sum(f.stat().st_size for f in adapter.iterdir()) / 1e9, 3),
            }
        )
        top = sorted(sampler.peak_procs.items(), key=lambda kv: -kv[1])[:8]
        result["rss_at_peak_mb"] = {k: round(v / 1e6) for k, v in top}
        check_layers = sorted({0, args.layers - 1})
        result["max_abs_diff_vs_transformers"] = verify(ckpt, sel, adapter, check_layers)
        result["meets_target"] = result["peak_rss_tree_gb"] <= 3.0 and wall <= 600
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_json}")
    return 0 if result.get("meets_target") else 1


FULL_SIZE_JSON = ROOT / "benchmarks" / "results" / "convert_memory.json"


def default_json(args, parser: argparse.ArgumentParser) -> Path:
    """``benchmarks/results/convert_memory.json`` at GPT-OSS-20B's size, ``runs/...`` otherwise."""
    shape = ("layers", "experts", "hidden", "vocab", "top_k")
    if all(getattr(args, k) == parser.get_default(k) for k in shape):
        return FULL_SIZE_JSON
    return ROOT / "runs" / f"convert_memory-{args.layers}L-{args.experts}E-{args.hidden}H.json"


if __name__ == "__main__":
    sys.exit(main())
