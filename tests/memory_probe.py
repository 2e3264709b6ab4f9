"""Measured peak memory of one NEXUS stage, for ``tests/test_planner.py``.

``python tests/memory_probe.py SPEC.json`` runs in a fresh process (so that peaks of
different runs never mix): it imports torch, transformers, the model's modelling code and
NEXUS, takes that as the loaded process's baseline, then runs the stage through the
production code (``nexus.stages.train.core``'s ``prepare_model`` / ``optimizer_step`` for training,
:class:`nexus.stages.collect.RouterCollector` for collection) and prints one JSON line with the peak
resident-memory increase over the baseline (weights included: they load after it).

:func:`write_random_checkpoint` writes a random-init model directory fast, tensor by tensor
(transformers' own initialisation of a GPT-OSS-20B-wide layer takes a minute on 2 cores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (name, family, config overrides, weights' dtype).
#: ``g20``: GPT-OSS-20B's layer (hidden and expert width 2880, 32 experts top-4, 64 query / 8 KV
#: heads of 64), one layer, and a 32,768-token vocabulary: the published 201,088 would add
#: 1.9 GB of embedding and LM-head weights (counted exactly from the meta model, see
#: test_packed_replica_is_exactly_the_mxfp4_checkpoint) and push the run past 4 GB; the
#: vocabulary-sized loss tensors are measured in ``qwen``, where they are half the peak.
#: ``deep``: activation-dominated (4 layers, long sequences, eager attention).
#: ``qwen``: another family (SDPA attention, SwiGLU experts without biases).
SHAPES = {
    "g20": ("gpt_oss", dict(num_hidden_layers=1, num_local_experts=32, num_experts_per_tok=4, hidden_size=2880,
                            intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                            vocab_size=32768, sliding_window=128), "bfloat16"),
    "deep": ("gpt_oss", dict(num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2, hidden_size=512,
                             intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                             vocab_size=8192, sliding_window=128), "float32"),
    "qwen": ("qwen3_moe", dict(num_hidden_layers=4, num_experts=16, num_experts_per_tok=4, hidden_size=512,
                               moe_intermediate_size=256, intermediate_size=256, num_attention_heads=8,
                               num_key_value_heads=4, head_dim=64, vocab_size=16384), "float32"),
}  # fmt: skip
#: shapes written as a published GPT-OSS checkpoint stores them (MXFP4 experts), and run with
#: packed experts: the shape they copy
PACKED_SHAPES = {"g20p": "g20"}

#: (shape, stage, batch, seq_len, gradient checkpointing)
CASES = [
    ("g20", "train", 1, 128, True),
    ("g20", "collect", 2, 128, False),
    # packed collection is over-predicted on a CPU (1.32x: its memory-mapped input embedding is
    # read only at the rows a batch uses; docs/benchmarks.md "Memory plan accuracy"), the safe side
    ("g20p", "train", 1, 128, True),
    ("deep", "train", 2, 512, False),
    ("deep", "collect", 4, 512, False),
    ("qwen", "train", 2, 512, True),
    ("qwen", "collect", 4, 512, False),
]


def write_shape(name: str, root: Path) -> Path:
    """The model directory of shape ``name`` (random weights) under ``root``."""
    from transformers import AutoConfig

    family, shape, dtype = SHAPES[PACKED_SHAPES.get(name, name)]
    extra = {}
    if family == "gpt_oss":
        n = shape["num_hidden_layers"]
        extra["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    config = AutoConfig.for_model(
        family, **shape, **extra, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0
    )
    return write_random_checkpoint(config, root / name, dtype, packed=name in PACKED_SHAPES)


def measure(spec: dict, work: Path, fixed_allocator: bool = True) -> int:
    """Peak RSS increase of one stage in a fresh process.

    ``fixed_allocator``: glibc returns freed buffers of 128 KiB and more to the system at once
    (``MALLOC_MMAP_THRESHOLD_``, as benchmarks/train.py does), so that RSS follows the live
    tensors; by default glibc keeps freed buffers below 32 MB for reuse, which on small models
    adds up to a third to the peak and at GPT-OSS-20B width a few percent
    (docs/benchmarks.md, "Memory plan accuracy").
    """
    import os
    import subprocess

    path = work / f"spec-{os.getpid()}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if fixed_allocator:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(path)], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_increase"]


def compare(case: tuple, model: Path, fixed_allocator: bool = True) -> dict:
    """``nexus.plan``'s prediction and the measured peak of one of :data:`CASES`."""
    import time

    import nexus

    name, stage, batch, seq_len, checkpointing = case
    family, _, dtype = SHAPES[PACKED_SHAPES.get(name, name)]
    experts = "packed" if name in PACKED_SHAPES else "dequantized"
    settings = dict(dtype=dtype, batch_size=batch, seq_len=seq_len, experts=experts)
    if stage == "train":
        settings.update(gradient_checkpointing=checkpointing, kd_weight=0.5, loss_chunk=256, grad_accum=1)
        # two steps: the second runs with AdamW's state allocated, as every later one does
        train = {**settings, "max_steps": 10, "warmup_steps": 1}
        spec = {"stage": "train", "family": family, "model": str(model), "train": train, "steps": 2}
    else:
        spec = {"stage": "collect", "family": family, "model": str(model), "dtype": dtype, "experts": experts,
                "batch_size": batch, "seq_len": seq_len, "steps": 1}  # fmt: skip
    plan = nexus.plan(model, cpu_memory="1000GB", stages=(stage,), **settings).stages[stage]
    t0 = time.perf_counter()
    measured = measure(spec, model.parent, fixed_allocator)
    return {
        "shape": name,
        "stage": stage,
        "batch": batch,
        "seq_len": seq_len,
        "checkpointing": checkpointing,
        "dtype": dtype,
        "experts": experts,
        "predicted_mb": round(plan.peak / 2**20),
        "measured_mb": round(measured / 2**20),
        "ratio": round(plan.peak / measured, 3),
        "phase": plan.phase,
        "parts_mb": {k: round(v / 2**20) for k, v in plan.parts.items() if v},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def write_random_checkpoint(
    config, out: Path, dtype: str = "bfloat16", seed: int = 0, packed: bool = False
) -> Path:
    """``config.json`` + one safetensors file of random weights for ``config``, written in chunks
    (names and shapes from a meta-device build; values a tiled random block: std 0.02, routers
    N(0, 1) so that tokens spread over the experts, norms and sinks 1). A few MB in memory.
    ``packed`` (GPT-OSS): the experts as the published checkpoints store them, MXFP4 blocks
    (random bytes) and scales (2^-10 .. 2^-7), with the config's ``quantization_config``."""
    import torch

    from nexus.weights.checkpoint import TORCH_TO_ST, SafetensorsWriter, meta_model
    from nexus.weights.mxfp4 import GPT_OSS_QUANTIZATION_CONFIG
    from nexus.weights.packed import swap_in_packed_experts

    config.dtype = dtype
    torch_dtype = getattr(torch, dtype)
    chunk = 1 << 24
    block = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed))
    fills = {
        "weight": (block * 0.02).to(torch_dtype).repeat(chunk >> 20),
        "router": block.to(torch_dtype).repeat(chunk >> 20),
        "one": torch.ones(chunk, dtype=torch_dtype),
        "blocks": torch.randint(
            0, 256, (chunk,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
        ),
        "scales": torch.full((chunk,), 119, dtype=torch.uint8),
    }
    model = meta_model(config)
    if packed:
        swap_in_packed_experts(model)
        config.quantization_config = dict(GPT_OSS_QUANTIZATION_CONFIG)
    state = model.state_dict()

    def st_dtype(name: str) -> str:
        return TORCH_TO_ST[torch.uint8 if name.endswith(("_blocks", "_scales")) else torch_dtype]

    entries = [(name, st_dtype(name), tuple(t.shape)) for name, t in state.items()]
    out.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(out / "model.safetensors", entries, {"format": "pt"})
    for name, _, shape in entries:
        kind = "weight"
        if name.endswith(("_blocks", "_scales")):
            kind = name.rsplit("_", 1)[1]
        elif "norm" in name or name.endswith("sinks"):
            kind = "one"
        elif "router" in name or name.endswith("mlp.gate.weight"):
            kind = "router"
        n = int(torch.Size(shape).numel())
        for start in range(0, n, chunk):
            writer.write(name, fills[kind][: min(chunk, n - start)])
    writer.close()
    config.save_pretrained(out)
    return out


def _baseline(family: str) -> None:
    """Import everything a stage imports before it allocates (the 'loaded process')."""
    import importlib

    import torch
    import transformers  # noqa: F401

    importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    import nexus.stages.collect  # noqa: F401
    import nexus.stages.train.core  # noqa: F401

    torch.set_num_threads(1)


def run(spec: dict) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    _baseline(spec["family"])
    import numpy as np
    import torch
    from methods import reset_peak_rss, rss_bytes

    reset_peak_rss()
    base = rss_bytes()
    if spec["stage"] == "train":
        from nexus.stages.train.config import TrainConfig
        from nexus.stages.train.core import Backbone, make_optimizer, optimizer_step, prepare_model

        cfg = TrainConfig(model=spec["model"], corpus=["-"], output="-", **spec["train"])
        model = prepare_model(cfg, torch.device("cpu"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(trainable, cfg)
        gen = torch.Generator().manual_seed(0)
        vocab = model.config.get_text_config().vocab_size
        for _ in range(spec["steps"]):
            ids = [
                torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=gen)
                for _ in range(cfg.grad_accum)
            ]
            optimizer_step(model, Backbone(model), ids, cfg, optimizer, scheduler, trainable)
    else:
        from nexus.stages.collect import RouterCollector

        collector = RouterCollector(spec["model"], dtype=spec["dtype"], device="cpu", experts=spec["experts"])
        rng = np.random.default_rng(0)
        vocab = collector.model.config.get_text_config().vocab_size
        b, s = spec["batch_size"], spec["seq_len"]
        for i in range(spec["steps"]):
            # the last sequence one token short: padding, as the length-sorted batches have
            seqs = [rng.integers(3, vocab, s - (r == b - 1 and b > 1)) for r in range(b)]
            collector.collect_batch(seqs, list(range(i * b, (i + 1) * b)))
    return {"peak_increase": rss_bytes(peak=True) - base, "baseline": base}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
