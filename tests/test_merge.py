"""Native merge: a checkpoint stock transformers loads, equal to base + adapter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from model_dirs import write_tiny_model_dir
from safetensors.torch import load_file, save_file

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
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    subprocess.run(
        [
            sys.executable,
            "-c",
            _STOCK,
            str(tmp_path / "merged"),
            str(tmp_path / "ids.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        check=True,
    )
    got = load_file(str(tmp_path / "out.safetensors"))["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, nexus.load_model(base_dir)(ids).logits.detach())


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
        "--output",
        str(tmp_path / "merged"),
    ]
    assert main(args) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.n_shared_experts == model.config.n_shared_experts + 1
    assert main(args) == 2  # exists, no --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
