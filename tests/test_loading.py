"""nexus.load_model / load_tokenizer and the `nexus` command: clear one-line errors for bad models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from model_dirs import write_tiny_model_dir

import nexus
from nexus.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("m"), family="qwen3_moe")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_load_model_and_tokenizer(model_dir):
    model = nexus.load_model(model_dir)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert nexus.load_model(model_dir, dtype="bfloat16").dtype == torch.bfloat16
    tok = nexus.load_tokenizer(model_dir)
    assert tok.pad_token is not None and len(tok("def f(): pass")["input_ids"]) > 0


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_config", "has no config.json"),
        ("bad_json", "is not valid JSON"),
        ("no_model_type", "has no model_type"),
        ("bad_value", "is not usable: .*num_experts_per_tok"),
        ("dense", "not a Mixture-of-Experts architecture"),
        ("remote_code", "ships custom code"),
        ("no_weights", "has no .safetensors weights"),
        ("truncated", "cannot load model weights"),
        ("garbage", "cannot load model weights"),
    ],
)
def test_bad_model_directories_fail_with_one_line(model_dir, tmp_path, breakage, message):
    d = _copy(model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    weights = d / "model.safetensors"
    if breakage == "no_config":
        (d / "config.json").unlink()
    elif breakage == "bad_json":
        (d / "config.json").write_text("{not json")
    elif breakage == "no_model_type":
        (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    elif breakage == "bad_value":
        cfg["num_experts_per_tok"] = "two"
        (d / "config.json").write_text(json.dumps(cfg))
    elif breakage == "dense":
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    elif breakage == "remote_code":
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
        (d / "config.json").write_text(json.dumps(cfg))
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif breakage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    with pytest.raises(nexus.NexusError, match=message) as info:
        nexus.load_model(d)
    assert "\n" not in str(info.value)


def test_missing_tokenizer_is_named(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "m")
    for f in d.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(nexus.NexusError, match="has no tokenizer"):
        nexus.load_tokenizer(d)


def test_cli_info_and_errors(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen3_moe" and info["moe_layers"] == [0, 1] and info["num_experts"] == 4
    assert main(["info", "--model", str(model_dir / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nexus: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_python_dash_m_nexus_runs():
    out = subprocess.run(
        [sys.executable, "-m", "nexus", "families"], capture_output=True, text=True, check=True
    )
    assert "deepseek_v3" in out.stdout and "adapter + native merge" in out.stdout


def test_block_scaled_fp8_checkpoint_loads_dequantised_and_refuses_packed(tmp_path):
    """DeepSeek-V3/Qwen3-style FP8 (F8_E4M3 weights, a weight_scale_inv per 16x16 tile here):
    transformers' FineGrainedFP8Config(dequantize=True) decodes it on load, tile scales in the
    right places (equal to our own fp8 * scale_inv); packed experts are MXFP4 only."""
    from model_dirs import write_fp8_model_dir

    from nexus.models import FAMILIES, expert_weights, find_moe_blocks

    d = tmp_path / "fp8"
    expected = write_fp8_model_dir(d)
    model = nexus.load_model(d)  # auto: dequantized
    fam = FAMILIES["qwen3_moe"]
    blocks = find_moe_blocks(model)
    for b in blocks:
        for e in range(b.num_experts):
            w = expert_weights(b, fam, e)
            prefix = f"model.layers.{b.layer}.mlp.experts.{e}."
            assert torch.equal(w.gate, expected[prefix + "gate_proj.weight"])
            assert torch.equal(w.up, expected[prefix + "up_proj.weight"])
            assert torch.equal(w.down, expected[prefix + "down_proj.weight"])
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, expected["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(
        nexus.NexusError, match=r"stores its experts in block-scaled FP8 \(quant_method fp8\)"
    ):
        nexus.load_model(d, experts="packed")
