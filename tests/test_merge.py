"""Native merge: a checkpoint stock transformers loads, equal to base + adapter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from model_dirs import TOKENIZER_VOCAB, write_tiny_model_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

import nexus

# Runs in a fresh interpreter that never imports nexus: proof that the merged checkpoint is stock.
_STOCK = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    assert "nexus" not in sys.modules
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    ids = load_file(sys.argv[2])["ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert "nexus" not in sys.modules
    save_file({"logits": logits.contiguous()}, sys.argv[3])
    """
)


@pytest.mark.parametrize(
    ("family", "intermediate_size", "gate"),
    [
        ("deepseek_v3", None, "scalar"),
        ("deepseek_v3", 30, "none"),
        ("glm4_moe", None, "scalar"),
        ("deepseek_v2", None, "scalar"),
        ("ernie4_5_moe", 10, "scalar"),
    ],
)
def test_native_merge_matches_adapter_logits(family, intermediate_size, gate, tmp_path):
    base_dir = write_tiny_model_dir(tmp_path / "base", family=family)
    model = nexus.load_model(base_dir)
    nexus.attach_shared_experts(
        model, init="random", gate=gate, gate_init=0.7, intermediate_size=intermediate_size, seed=2
    )
    nexus.save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits

    nexus.merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged")
    got = _stock_logits(tmp_path / "merged", ids, tmp_path)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, nexus.load_model(base_dir)(ids).logits.detach())


def _stock_logits(model_dir, ids, tmp_path) -> torch.Tensor:
    """Logits of ``model_dir`` loaded by stock transformers in a fresh interpreter."""
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    out = tmp_path / "out.safetensors"
    subprocess.run(
        [sys.executable, "-c", _STOCK, str(model_dir), str(tmp_path / "ids.safetensors"), str(out)],
        check=True,
    )
    return load_file(str(out))["logits"]


def _shard_keys(model_dir: Path) -> dict[str, list[str]]:
    """Tensor names of every safetensors file in ``model_dir``."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out[f.name] = list(h.keys())
    return out


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("deepseek_v3", {}),
        ("glm4_moe", {}),
        ("ernie4_5_moe", {"use_bias": True}),  # native shared expert with biases
        ("ernie4_5_moe", {"moe_num_shared_experts": 0}),  # no native shared expert yet: tensors made
    ],
)
def test_native_merge_of_a_sharded_checkpoint(family, overrides, tmp_path):
    """Real releases split a layer over shards; each tensor must be rewritten where it lives."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, seed=1, vocab_size=TOKENIZER_VOCAB, **overrides)
    base_dir = tmp_path / "base"
    model.save_pretrained(str(base_dir), max_shard_size="6KB")  # a few tensors per shard
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    block = "model.layers.1.mlp"
    shared = [f"{block}.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")]
    if overrides.get("moe_num_shared_experts") != 0:
        # the layout that broke the old merge: the block's first key and the shared expert's
        # projections in different shards
        first = index[min(k for k in index if k.startswith(block))]
        assert len({first, *(index[k] for k in shared)}) >= 3, "the test checkpoint must span shards"
    model = nexus.load_model(base_dir)
    layers = nexus.attach_shared_experts(model, init="random", gate_init=0.7, intermediate_size=30, seed=2)
    nexus.save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(3, TOKENIZER_VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits

    nexus.merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = tmp_path / "merged"

    got = _stock_logits(merged, ids, tmp_path)
    # fp32 throughout; the merged MLP sums the same products in another order (one matmul over
    # native + our units instead of two added outputs), so equal up to float32 rounding
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits.detach())

    # every tensor in exactly one shard, each shard holding what the index says, nothing orphaned
    keys = _shard_keys(merged)
    new_index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    flat = [k for names in keys.values() for k in names]
    assert len(flat) == len(set(flat))
    assert {k: s for s, names in keys.items() for k in names} == new_index
    made = set()  # no native shared expert before: the merge creates it in every MoE layer
    if overrides.get("moe_num_shared_experts") == 0:
        made = {
            f"model.layers.{L}.mlp.shared_experts.{p}_proj.weight"
            for L in layers
            for p in ("gate", "up", "down")
        }
    assert set(new_index) == set(index) | made
    # tensors stay in their shard; shards without a changed tensor are links to the base's
    assert all(new_index[k] == s for k, s in index.items())
    changed = {new_index[k] for k in new_index if ".shared_experts." in k}
    for shard in keys:
        same = (merged / shard).stat().st_ino == (base_dir / shard).stat().st_ino
        assert same == (shard not in changed), shard


def test_merge_refuses_an_fp8_checkpoint(tmp_path):
    """FP8 block-quantised shared experts would need the adapter requantised: refused, nothing written."""
    base_dir = write_tiny_model_dir(tmp_path / "base", family="deepseek_v3")
    model = nexus.load_model(base_dir)
    nexus.attach_shared_experts(model, init="random")
    nexus.save_adapter(model, tmp_path / "adapter")
    config = json.loads((base_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (base_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(nexus.NexusError, match=r"FP8 block-quantised \(quant_method=fp8, weight_block_size"):
        nexus.merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    # the tensors say so even when the config does not
    del config["quantization_config"]
    (base_dir / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(base_dir / "model.safetensors"))
    key = "model.layers.1.mlp.shared_experts.down_proj.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    tensors[key + "_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(nexus.NexusError, match=r"is F8_E4M3 with a weight_scale_inv"):
        nexus.merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged")


@pytest.mark.parametrize(
    ("family", "why"),
    [
        ("qwen2_moe", "gated native shared expert"),
        ("mixtral", "no native shared expert"),
        ("llama4_text", "fixed width"),
    ],
)
def test_merge_refused_where_the_family_cannot_absorb_an_adapter(family, why, tmp_path):
    base_dir = write_tiny_model_dir(tmp_path / "base", family=family)
    model = nexus.load_model(base_dir)
    nexus.attach_shared_experts(model, init="random")
    nexus.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(nexus.NexusError, match=f"{why}.*the adapter itself is the export"):
        nexus.merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_sigmoid_gate(tmp_path):
    base_dir = write_tiny_model_dir(tmp_path / "base", family="deepseek_v3")
    model = nexus.load_model(base_dir)
    nexus.attach_shared_experts(model, init="random", gate="sigmoid")
    nexus.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(nexus.NexusError, match="per-token sigmoid gate"):
        nexus.merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_export_command_and_existing_output(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from nexus.cli import main

    base_dir = write_tiny_model_dir(tmp_path / "base", family="glm4_moe")
    model = nexus.load_model(base_dir)
    nexus.attach_shared_experts(model, init="random")
    nexus.save_adapter(model, tmp_path / "adapter")
    args = [
        "export",
        "--model",
        str(base_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--format",
        "merged",
        "--output",
        str(tmp_path / "merged"),
    ]
    assert main(args) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.n_shared_experts == model.config.n_shared_experts + 1
    assert main(args) == 2  # exists, no --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
