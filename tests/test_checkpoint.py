"""Reading single experts from safetensors checkpoints, for every family and layout."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import TINY_CONFIGS, tiny_model

from nexus.errors import NexusError
from nexus.models import expert_weights, family_for_config, find_moe_blocks
from nexus.weights.checkpoint import (
    Checkpoint,
    ExpertReader,
    SafetensorsWriter,
    checkpoint_expert_weights,
    layer_shapes,
    plan_layer,
    preallocate_safetensors,
    write_at,
)

FIELDS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def _save(model, path, dtype=None, **kwargs):
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(path), **kwargs)
    return path


def _transformers_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _assert_same(a, b, what):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), (what, f)
        if x is not None:
            assert torch.equal(x.float(), y.float()), (what, f)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_experts_from_checkpoint_equal_transformers_load(family, tmp_path):
    """Every expert read from the saved checkpoint equals the expert transformers loads."""
    d = _save(tiny_model(family, seed=3), tmp_path / family)
    live = _transformers_load(d)
    fam = family_for_config(live.config)
    ckpt = Checkpoint(d)
    shapes = layer_shapes(live.config)
    blocks = find_moe_blocks(live)
    assert sorted(shapes) == [b.layer for b in blocks]
    for b in blocks:
        plan = plan_layer(ckpt, shapes[b.layer])
        with ExpertReader(plan) as reader:
            for e in range(b.num_experts):
                _assert_same(reader.read(e), expert_weights(b, fam, e), (family, b.layer, e))
        # streamed, chunked averaging (tiny chunks: several per tensor) equals the plain average
        chosen, weights = [b.num_experts - 1, 0], [0.25, 0.75]
        acc = ExpertReader(plan, chunk_elems=40).average(chosen, weights)
        ref = [expert_weights(b, fam, e) for e in chosen]
        gate, up = (
            (acc["w_in"][0::2], acc["w_in"][1::2])
            if plan.shape.gate_up_layout == "interleaved"
            else acc["w_in"].chunk(2)
        )
        for name, got in (("gate", gate), ("up", up), ("down", acc["w_out"])):
            want = sum(w * getattr(r, name) for w, r in zip(weights, ref))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        if plan.shape.bias:
            want = sum(w * r.down_bias for w, r in zip(weights, ref))
            torch.testing.assert_close(acc["b_out"], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "family,dtype", [("qwen3_moe", torch.bfloat16), ("gpt_oss", torch.bfloat16), ("mixtral", torch.float16)]
)
def test_sharded_half_precision_checkpoints(family, dtype, tmp_path):
    d = _save(tiny_model(family, seed=1), tmp_path / family, dtype=dtype, max_shard_size="30KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    live = _transformers_load(d)
    fam = family_for_config(live.config)
    for b in find_moe_blocks(live):
        for e in (0, b.num_experts - 1):
            _assert_same(checkpoint_expert_weights(d, b.layer, e), expert_weights(b, fam, e), (b.layer, e))


@pytest.fixture
def qwen_dir(tmp_path):
    return _save(tiny_model("qwen3_moe"), tmp_path / "qwen", max_shard_size="30KB")


def test_missing_shard(qwen_dir):
    shard = sorted(qwen_dir.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(NexusError, match=f"shard {shard.name} .* is missing"):
        Checkpoint(qwen_dir)


def test_truncated_and_corrupted_files(qwen_dir):
    shard = sorted(qwen_dir.glob("*.safetensors"))[0]
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(NexusError, match="truncated or corrupted") as info:
        Checkpoint(qwen_dir)
    assert "\n" not in str(info.value)
    with open(shard, "r+b") as f:
        f.write(b"\xff" * 12)
    with pytest.raises(NexusError, match=f"{shard.name} is truncated or corrupted"):
        Checkpoint(qwen_dir)


def test_index_naming_a_key_its_shard_lacks(qwen_dir):
    index = qwen_dir / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.mlp.experts.9.gate_proj.weight"] = next(
        iter(data["weight_map"].values())
    )
    index.write_text(json.dumps(data))
    with pytest.raises(NexusError, match="does not contain it"):
        Checkpoint(qwen_dir)
    index.write_text("{not json")
    with pytest.raises(NexusError, match="not a valid safetensors index"):
        Checkpoint(qwen_dir)


def test_config_and_checkpoint_from_different_models(tmp_path):
    from nexus.models.loading import load_config

    # per-expert layout: the config promises more experts than the checkpoint has
    d = _save(tiny_model("qwen3_moe"), tmp_path / "qwen")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] = 6
    (d / "config.json").write_text(json.dumps(cfg))
    shape = layer_shapes(load_config(d))[0]
    with pytest.raises(NexusError, match=r"lacks model\.layers\.0\.mlp\.experts\.4\.gate_proj\.weight"):
        plan_layer(Checkpoint(d), shape)
    # fused layout: a width mismatch is a shape error naming the tensor
    g = _save(tiny_model("gpt_oss"), tmp_path / "gpt")
    cfg = json.loads((g / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (g / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        NexusError, match=r"gate_up_proj has shape \[4, 32, 96\] but .* implies \[4, 32, 128\]"
    ):
        plan_layer(Checkpoint(g), layer_shapes(load_config(g))[0])
    # a layer with no expert tensors at all
    with pytest.raises(NexusError, match="no expert tensors for MoE layer 7"):
        plan_layer(Checkpoint(g), shape.__class__(**{**shape.__dict__, "layer": 7}))
    with pytest.raises(NexusError, match="not an MoE layer"):
        checkpoint_expert_weights(g, 5, 0)


def test_streaming_writers_roundtrip(tmp_path):
    tensors = {
        "a": torch.randn(5, 7),
        "b": torch.randn(3, 4).to(torch.bfloat16),
        "c": torch.tensor(2.5),
        "d": torch.randint(0, 255, (9,), dtype=torch.uint8),
    }
    st = {torch.float32: "F32", torch.bfloat16: "BF16", torch.uint8: "U8"}
    entries = [(k, st[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
    w = SafetensorsWriter(tmp_path / "s.safetensors", entries, metadata={"format": "x"})
    w.write("a", tensors["a"][:2])
    w.write("a", tensors["a"][2:].numpy())
    with pytest.raises(ValueError, match="expected data for 'b'"):
        w.write("c", tensors["c"])
    for k in ("b", "c", "d"):
        w.write(k, tensors[k])
    w.close()
    spans = preallocate_safetensors(tmp_path / "p.safetensors", entries, metadata={"format": "x"})
    for k in reversed(list(tensors)):  # any order, any process
        write_at(tmp_path / "p.safetensors", spans[k], tensors[k])
    for name in ("s.safetensors", "p.safetensors"):
        back = load_file(str(tmp_path / name))
        assert set(back) == set(tensors)
        for k, t in tensors.items():
            assert torch.equal(back[k], t), (name, k)
        with safe_open(str(tmp_path / name), "pt") as f:
            assert f.metadata() == {"format": "x"}
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "p.safetensors").read_bytes()
    with pytest.raises(ValueError, match="bytes for a tensor"):
        write_at(tmp_path / "p.safetensors", spans["a"], np.zeros(3, dtype=np.float32))
