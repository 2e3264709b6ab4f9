"""MXFP4: our decoder against transformers', and a tiny GPT-OSS checkpoint stored like the real ones.

The checkpoint helper here (experts as ``*_blocks``/``*_scales``, ``quantization_config``
set, optionally sharded with an index) is also used by the conversion tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from nexus.weights import mxfp4


def write_mxfp4_gpt_oss_dir(out: Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """A tiny GPT-OSS checkpoint whose experts are MXFP4 exactly as the released checkpoints
    store them (:func:`nexus.weights.mxfp4.save_gpt_oss_mxfp4`): ``mlp.experts.gate_up_proj_blocks``
    [E, 2I, H/32, 16] uint8 + ``_scales`` [E, 2I, H/32], same for ``down_proj``; biases,
    attention and router in bf16; ``quantization_config`` set."""
    overrides.setdefault("intermediate_size", 64)  # MXFP4 needs widths divisible by 32
    return mxfp4.save_gpt_oss_mxfp4(
        tiny_model("gpt_oss", seed=seed, **overrides), out, max_shard_size=max_shard_size
    )


def _random_mxfp4(*lead, groups=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*lead, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, (*lead, groups), dtype=torch.uint8, generator=g)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_mxfp4(3, 40, groups=4)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
    for e in range(3):
        ours = mxfp4.decode(blocks[e], scales[e], dtype=dtype)  # [out, in]
        assert ours.dtype == dtype
        assert torch.equal(ours, ref[e].T)
    assert torch.equal(mxfp4.decode(blocks, scales, dtype=dtype), ref.transpose(1, 2))


def test_decode_table_and_nibble_order():
    # byte 0x21: low nibble 1 (0.5) first, high nibble 2 (1.0) second; 0xF8: -0.0 then -6.0
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0], blocks[0, 1] = 0x21, 0xF8
    scales = torch.tensor([128], dtype=torch.uint8)  # 2^1
    out = mxfp4.decode(blocks, scales)
    assert out[:4].tolist() == [1.0, 2.0, -0.0, -12.0]
    assert out[4:].abs().sum() == 0


def test_chunked_decode_and_out(monkeypatch):
    blocks, scales = _random_mxfp4(7, 33, groups=2, seed=1)
    full = mxfp4.decode(blocks, scales)
    monkeypatch.setattr(mxfp4, "_ROWS_PER_CHUNK", 5)
    buf = torch.empty(7, 33, 64)
    assert mxfp4.decode(blocks, scales, out=buf) is buf
    assert torch.equal(buf, full)
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.decode(blocks, scales[..., :1])
    with pytest.raises(ValueError, match="uint8"):
        mxfp4.decode(blocks.to(torch.int32), scales)


def test_encode_roundtrip():
    w = torch.randn(16, 96) * 0.05
    blocks, scales = mxfp4.encode(w)
    assert blocks.shape == (16, 3, 16) and scales.shape == (16, 3)
    deq = mxfp4.decode(blocks, scales)
    # FP4 with a power-of-two block scale: error at most half a grid step of the block's range
    err = (deq - w).abs().reshape(16, 3, 32).amax(-1)
    assert bool((err <= w.abs().reshape(16, 3, 32).amax(-1) / 3 + 1e-12).all())
    # values already on the MXFP4 grid survive a second round trip exactly
    assert torch.equal(mxfp4.decode(*mxfp4.encode(deq)), deq)


def test_gpt_oss_mxfp4_checkpoint_loads_dequantised(tmp_path):
    """Issue 2 item 7: the MXFP4 checkpoint loads through nexus.load_model (dequantised on
    request), equals transformers' own Mxfp4Config(dequantize=True) load, our per-expert decoder
    reads the same weights, and shared experts attach and run."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    import nexus
    from nexus.models import FAMILIES, expert_weights, find_moe_blocks
    from nexus.weights.checkpoint import checkpoint_expert_weights

    d = write_mxfp4_gpt_oss_dir(tmp_path / "gpt_oss_mxfp4", max_shard_size="40KB")
    assert len(list(d.glob("*.safetensors"))) > 1
    keys = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)

    model = nexus.load_model(d, experts="dequantized")
    ref = AutoModelForCausalLM.from_pretrained(
        str(d), quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    fam = FAMILIES["gpt_oss"]
    ours_blocks, ref_blocks = find_moe_blocks(model), find_moe_blocks(ref)
    for b, rb in zip(ours_blocks, ref_blocks):
        assert b.experts.gate_up_proj.dtype == torch.float32
        assert torch.equal(b.experts.gate_up_proj, rb.experts.gate_up_proj)
        assert torch.equal(b.experts.down_proj, rb.experts.down_proj)
        for e in range(b.num_experts):
            live, disk = expert_weights(b, fam, e), checkpoint_expert_weights(d, b.layer, e)
            for f in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
                assert torch.equal(getattr(live, f), getattr(disk, f)), (b.layer, e, f)

    x = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        base = model(x).logits
    layers = nexus.attach_shared_experts(model, init="random", seed=1)
    assert layers == [b.layer for b in ours_blocks]
    se = nexus.shared_expert_modules(model)[layers[0]]
    assert se.spec.bias and se.spec.gate_up_layout == "interleaved" and se.spec.activation == "gpt_oss"
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, base)
        with nexus.shared_experts_disabled(model):
            assert torch.equal(model(x).logits, base)
