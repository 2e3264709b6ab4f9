"""``train.strategy: fsdp``: FSDP2 over 2 Ray Train workers (gloo) against DDP on the same runs.

What FSDP must not change: the losses, the trained adapter, the KD teacher (the base: shared
experts off, and base routers when the router trains), the checkpoint format and exact resume.
What it must change: each worker holds about half the frozen base (measured from the tensors
the workers hold, recorded in ``train_summary.json``).

Tolerances: DDP all-reduces full gradients, FSDP reduce-scatters them and sums the squared
shard norms for clipping, so gradients differ in the last float32 bits (a different summation
order); over a few AdamW steps that stays ~1e-6 relative. We allow 1e-4 on losses and 1e-4
(absolute, on weights of order 0.1) on the adapter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_dirs import sample_texts, write_tiny_model_dir
from safetensors.numpy import load_file

from nexus.stages import train

# each case runs two 2-worker Ray Train runs: ~80-150 s on a quiet machine
pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 10
#: what a step logs that does not depend on timing
LOGGED = ("loss", "ce", "kd", "router_kl", "grad_norm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_corpus")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(200)))
    return d


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny checkpoints (written once for the module): Qwen3-MoE and DeepSeek-V3 in float32, and
    GPT-OSS with its experts in MXFP4 as published, so that its experts load packed: FSDP shards
    the packed uint8 blocks and scales like any other weight."""
    from model_dirs import TOKENIZER_VOCAB, write_tokenizer
    from test_mxfp4 import write_mxfp4_gpt_oss_dir

    dirs = {
        family: write_tiny_model_dir(tmp_path_factory.mktemp(family), family)
        for family in ("qwen3_moe", "deepseek_v3")
    }
    packed = write_mxfp4_gpt_oss_dir(
        tmp_path_factory.mktemp("gpt_oss") / "m",
        hidden_size=64,
        intermediate_size=64,
        vocab_size=TOKENIZER_VOCAB,
    )
    write_tokenizer(packed)
    return {**dirs, "gpt_oss": packed}


def _run(model_dir, corpus, tmp_path, strategy: str, name: str, **kw):
    cfg = dict(
        model=str(model_dir),
        corpus=[str(corpus / "train.jsonl")],
        output=str(tmp_path / name),
        workers=2,
        strategy=strategy,
        max_steps=STEPS,
        batch_size=2,
        seq_len=32,
        lr=5e-3,
        warmup_steps=1,
        checkpoint_every=STEPS,
        init="random",
        kd_weight=0.5,
        storage_path=str(tmp_path / "ray"),
        name=name,
    )
    cfg.update(kw)
    return train.run(**cfg)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run, reference, *, tol: float) -> None:
    got, want = _metrics(run), _metrics(reference)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        for key in LOGGED:
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), (a["step"], key)
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    expected = load_file(str(reference / "adapter" / "adapter.safetensors"))
    assert sorted(adapter) == sorted(expected)
    for name, tensor in expected.items():
        np.testing.assert_allclose(adapter[name], tensor, rtol=0, atol=tol, err_msg=name)


@pytest.mark.parametrize(
    "family,options",
    [
        ("gpt_oss", {"experts": "packed"}),
        # the other two families: the same code path (extended: NEXUS_EXTENDED=1, ~2 min each)
        pytest.param(
            "qwen3_moe", {"gradient_checkpointing": True, "grad_accum": 2}, marks=pytest.mark.extended
        ),
        # the router trains: the KD teacher swaps the base routers in inside each router's
        # forward, after FSDP gathered the layer (and the router KL reads them too)
        pytest.param(
            "deepseek_v3", {"train_router": True, "router_kl_weight": 0.1}, marks=pytest.mark.extended
        ),
    ],
)
def test_fsdp_trains_like_ddp_with_half_the_base_per_worker(
    ray_cluster, model_dirs, corpus, tmp_path, family, options
):
    ddp = _run(model_dirs[family], corpus, tmp_path, "ddp", "ddp", **options)
    fsdp = _run(model_dirs[family], corpus, tmp_path, "fsdp", "fsdp", verify_base=True, **options)
    assert_same_training(fsdp, ddp, tol=1e-4)
    if options.get("train_router"):
        assert _metrics(fsdp)[-1]["router_kl"] > 0  # the routers moved, and the KL saw it

    checks = json.loads((fsdp / "train_summary.json").read_text())["checks"]
    assert checks["base_unchanged"] is True  # each worker's shards of the base, bitwise
    assert checks["replicas_identical"]  # the gathered adapter is the same on both ranks
    ddp_placement = json.loads((ddp / "train_summary.json").read_text())["checks"]["placement"]
    full = ddp_placement[0]["frozen_bytes"]
    assert [p["frozen_resident_bytes"] for p in ddp_placement] == [full, full]
    held = [p["frozen_resident_bytes"] for p in checks["placement"]]
    # dim-0 shards: each rank holds ceil or floor of half of every tensor's rows; the buffers
    # (rotary tables, DeepSeek's score-correction bias) are not sharded, a few hundred bytes
    assert sum(held) == pytest.approx(full, rel=0.02), held
    for h in held:
        assert h == pytest.approx(full / 2, rel=0.05), (held, full)

    # the checkpoint holds whole tensors: a one-worker run (no FSDP, another worker count)
    # loads the two-worker FSDP run's last checkpoint and holds exactly its adapter and moments
    _assert_resumable_on_one_worker(model_dirs[family], corpus, tmp_path, fsdp, options)


def _assert_resumable_on_one_worker(model_dir, corpus, tmp_path, run, options) -> None:
    import torch

    from nexus.method.adapter import adapter_state_dict
    from nexus.stages.train.config import TrainConfig
    from nexus.stages.train.core import make_optimizer, prepare_model
    from nexus.stages.train.state import load_training_state

    (checkpoint,) = sorted(p for p in (tmp_path / "ray" / "fsdp").glob("checkpoint_*") if p.is_dir())[-1:]
    cfg = TrainConfig(model=str(model_dir), corpus=[str(corpus / "train.jsonl")], output=str(tmp_path / "one"),
                      init="random", max_steps=STEPS, warmup_steps=1, lr=5e-3, **options)  # fmt: skip
    model = prepare_model(cfg, torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(trainable, cfg)
    payload, _ = load_training_state(checkpoint, model, optimizer, scheduler)
    assert payload["step"] == STEPS and scheduler.last_epoch == STEPS
    saved = load_file(str(run / "adapter" / "adapter.safetensors"))
    for name, tensor in adapter_state_dict(model).items():
        np.testing.assert_array_equal(tensor.numpy(), saved[name], err_msg=name)
    moments = [optimizer.state[p]["exp_avg"] for p in trainable]
    assert [m.shape for m in moments] == [p.shape for p in trainable]
