"""Measured peak memory of one NEXUS stage, for ``tests/test_planner.py``.

``python tests/memory_probe.py SPEC.json`` runs in a fresh process (so that peaks of
different runs never mix): it imports torch, transformers, the model's modelling code and
NEXUS, takes that as the loaded process's baseline, then runs the stage through the
production code (``nexus.train.core``'s ``prepare_model`` / ``optimizer_step`` for training,
:class:`nexus.collect.RouterCollector` for collection) and prints one JSON line with the peak
resident-memory increase over the baseline (weights included: they load after it).

:func:`write_random_checkpoint` writes a random-init model directory fast, tensor by tensor
(transformers' own initialisation of a GPT-OSS-20B-wide layer takes a minute on 2 cores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_random_checkpoint(config, out: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """``config.json`` + one safetensors file of random weights for ``config``, one tensor in memory
    at a time (names and shapes from a meta-device build; values a tiled random block of std 0.02,
    routers N(0, 1) so that tokens spread over the experts; norms at 1)."""
    import torch

    from nexus.checkpoint import TORCH_TO_ST, SafetensorsWriter, meta_model

    config.dtype = dtype
    model = meta_model(config)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(1 << 20, generator=gen)
    state = model.state_dict()
    entries = [(name, TORCH_TO_ST[torch_dtype], tuple(t.shape)) for name, t in state.items()]
    out.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(out / "model.safetensors", entries, {"format": "pt"})
    for name, _, shape in entries:
        n = int(torch.Size(shape).numel())
        values = block.repeat(-(-n // block.numel()))[:n].reshape(shape)
        if "norm" in name or name.endswith("sinks"):
            values = torch.full(shape, 50.0)  # 1 after the scaling below
        elif "router" in name or name.endswith("mlp.gate.weight"):
            values = values * 50  # N(0, 1) from the N(0, 1) block / 0.02 below
        writer.write(name, (values * 0.02).to(torch_dtype))
    writer.close()
    config.save_pretrained(out)
    return out


def _baseline(family: str) -> None:
    """Import everything a stage imports before it allocates (the 'loaded process')."""
    import importlib

    import torch
    import transformers  # noqa: F401

    importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    import nexus.collect  # noqa: F401
    import nexus.train.core  # noqa: F401

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
        from nexus.train.config import TrainConfig
        from nexus.train.core import Backbone, make_optimizer, optimizer_step, prepare_model

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
        from nexus.collect import RouterCollector

        collector = RouterCollector(spec["model"], dtype=spec["dtype"], device="cpu")
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
