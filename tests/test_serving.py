"""Serving: ``nexus export --format vllm`` directories run by vLLM equal transformers + NEXUS.

vLLM pins an older transformers than NEXUS needs, so it lives in its own environment,
``.venv-vllm`` (``./dev setup`` builds it: vLLM's CPU build, the same torch, NEXUS
installed without dependencies so that its ``vllm.general_plugins`` entry point is
registered). This module exports tiny models of GPT-OSS, Qwen3-MoE, Mixtral and OLMoE
(shapes vLLM's CPU kernels accept: head size 32, hidden 128), runs
``python -m nexus.serving.vllm_run`` once in that environment (vLLM's offline ``LLM`` API: greedy
generation of 32 tokens and prompt log-probabilities, one engine per model, all in one
process) and compares, in this environment, with transformers + ``nexus.load_adapter``:

- greedy generations are equal token for token;
- prompt log-probabilities agree within ``LOGPROB_ATOL`` (both fp32; vLLM's CPU GEMMs,
  attention and fused-MoE kernels add in other orders than torch's, so they differ by float32
  rounding, ~1e-6 here; the adapters move log-probabilities by more than 1e-2);
- the exported model with the adapter switched to zero (``w_out`` = 0, so the shared
  expert adds exactly 0.0) equals the base: transformers' within the same tolerance for
  every family, and vLLM's own base model bit for bit for GPT-OSS (each architecture vLLM
  meets for the first time costs it a model-inspection subprocess, so one base engine only).

``NEXUS_SKIP_VLLM=1`` skips the module (for a developer without the vLLM environment); without
it a missing environment fails, so CI (which builds it) can never pass without serving.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from model_dirs import write_tiny_model_dir
from safetensors.torch import load_file, save_file
from tiny_models import VLLM_SHAPES

import nexus
from nexus.serving.vllm_run import run_in_vllm_env
from nexus.stages.export import export_vllm, vllm_base_dir

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / os.environ.get("NEXUS_VLLM_VENV", ".venv-vllm")
#: prompt log-probabilities, vLLM vs transformers, both fp32 (see the module docstring)
LOGPROB_ATOL = 1e-4
NEW_TOKENS = 32
#: family -> (extra config, adapter settings): every gate kind and a non-default width somewhere
FAMILIES = {
    # plain RoPE (like the demo base; the published GPT-OSS use YaRN, which passes through as is)
    "gpt_oss": (
        {"sliding_window": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        {"gate": "scalar", "gate_init": 0.5},
    ),
    "qwen3_moe": ({"moe_intermediate_size": 64}, {"gate": "sigmoid"}),
    "mixtral": ({}, {"gate": "none"}),
    "olmoe": ({}, {"gate": "scalar", "gate_init": 0.7, "intermediate_size": 96}),
}
#: vLLM families its CPU backend cannot run, with the reason (none at vLLM 0.32.0)
CPU_UNSUPPORTED: dict[str, str] = {}
#: the family whose zero-adapter export is compared with vLLM's own base model bit for bit
BITWISE_BASE = "gpt_oss"
PROMPTS = [[1, *range(40, 51)], [1, *range(200, 222, 2)], [1, 7, 9, 11, 300, 301, 5, 6, 90, 91, 92, 17]]


def _vllm_environment() -> Path:
    if os.environ.get("NEXUS_SKIP_VLLM") == "1":
        pytest.skip("NEXUS_SKIP_VLLM=1: the vLLM environment is not set up, serving is not tested")
    if not (VLLM_VENV / ".vllm-installed").is_file():  # written by ./dev once vLLM is installed
        pytest.fail(
            f"the vLLM environment {VLLM_VENV} is missing or incomplete: run ./dev setup (it needs PyPI), "
            "or set NEXUS_SKIP_VLLM=1 to skip the serving test"
        )
    return VLLM_VENV / "bin" / "python"


def _zero_adapter(export: Path, out: Path) -> Path:
    """A copy of ``export`` whose adapter adds exactly zero (``w_out`` = 0)."""
    shutil.copytree(export, out, copy_function=os.link)
    weights = out / "adapter.safetensors"
    tensors = load_file(str(weights))
    weights.unlink()  # a hard link to the original: replace, do not write through it
    save_file(
        {k: torch.zeros_like(v) if k.endswith("w_out") else v for k, v in tensors.items()}, str(weights)
    )
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Exports of every family, their vLLM outputs, and the transformers references."""
    python = _vllm_environment()
    root = tmp_path_factory.mktemp("serving")
    models, dirs = {}, {}
    for family, (config, adapter) in FAMILIES.items():
        if family in CPU_UNSUPPORTED:
            continue
        base = write_tiny_model_dir(root / f"{family}-base", family=family, seed=3, **VLLM_SHAPES, **config)
        model = nexus.load_model(base)
        nexus.attach_shared_experts(model, init="random", seed=4, **adapter)
        nexus.save_adapter(model, root / f"{family}-adapter")
        export = export_vllm(base, root / f"{family}-adapter", root / f"{family}-vllm")
        zero = _zero_adapter(export, root / f"{family}-zero")
        models.update({f"{family}/nexus": str(export), f"{family}/zero": str(zero)})
        if family == BITWISE_BASE:  # the base as stock vLLM runs it (plain RoPE as YaRN)
            models[f"{family}/base"] = str(vllm_base_dir(base, root / f"{family}-base-vllm"))
        dirs[family] = (base, export)
    job = {"models": models, "prompts": PROMPTS, "max_tokens": NEW_TOKENS, "dtype": "float32"}
    return run_in_vllm_env(python, job, root, timeout=1200), dirs


def _reference(base: Path, adapter: Path | None) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuations (argmax, EOS not special, like vLLM's ignore_eos) and prompt
    log-probabilities from transformers, with the adapter loaded by NEXUS."""
    model = nexus.load_model(base)
    if adapter is not None:
        nexus.load_adapter(model, adapter)
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), -1)
        prompt = logprobs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        out = model.generate(
            ids, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0
        )
    return out[:, ids.shape[1] :].tolist(), prompt.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_serves_the_adapter_like_transformers(family, served):
    if family in CPU_UNSUPPORTED:
        pytest.skip(
            f"vLLM's CPU backend cannot run {family}: {CPU_UNSUPPORTED[family]} (benchmarks/gpu_serve.py)"
        )
    results, dirs = served
    base, export = dirs[family]
    nexus_out, zero_out = results[f"{family}/nexus"], results[f"{family}/zero"]
    assert nexus_out["arch"] == zero_out["arch"] == f"Nexus{nexus_out['arch'][5:]}"

    generated, prompt = _reference(base, export)
    assert nexus_out["generated"] == generated
    _close(nexus_out["prompt_logprobs"], prompt)

    # the adapter matters: without it, log-probabilities move by far more than the tolerance
    base_generated, base_prompt = _reference(base, None)
    assert (torch.tensor(base_prompt) - torch.tensor(prompt)).abs().max() > 100 * LOGPROB_ATOL
    # switched to zero, the exported model is the base model
    assert zero_out["generated"] == base_generated
    _close(zero_out["prompt_logprobs"], base_prompt)
    if family == BITWISE_BASE:
        # a zero adapter adds exactly 0.0 to every MoE output: vLLM's own base model, bit for bit
        base_out = results[f"{family}/base"]
        assert not base_out["arch"].startswith("Nexus")
        assert zero_out["generated"] == base_out["generated"]
        assert zero_out["prompt_logprobs"] == base_out["prompt_logprobs"]


def _close(got: list, expected: list) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=LOGPROB_ATOL)


# -- the exported directory itself (no vLLM needed) -------------------------------------------


def test_export_vllm_directory(tmp_path, capsys):
    """Base weights linked (MXFP4 kept as it is, sharded index included), adapter beside them,
    config naming the NEXUS architecture; the directory is also a NEXUS adapter directory."""
    from test_mxfp4 import write_mxfp4_gpt_oss_dir

    from nexus.cli import main

    base = write_mxfp4_gpt_oss_dir(tmp_path / "base", max_shard_size="20KB")
    (base / "tokenizer.json").write_text("{}")  # the small files travel with the export
    model = nexus.load_model(base)
    nexus.attach_shared_experts(model, init="random", gate="sigmoid")
    nexus.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "served"
    argv = ["export", "--format", "vllm", "--model", str(base), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--output", str(out)]) == 0
    assert f"vllm serve {out}" in capsys.readouterr().out

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["NexusGptOssForCausalLM"]
    base_config = json.loads((base / "config.json").read_text())
    assert config["rope_parameters"] == base_config["rope_parameters"]  # YaRN, as published
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert (
        config["nexus"]["spec"]["gate"] == "sigmoid" and config["nexus"]["weights"] == "adapter.safetensors"
    )
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:  # hard links: the same bytes, no copy
        assert (out / shard).stat().st_ino == (base / shard).stat().st_ino
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    adapter_keys = set(load_file(str(tmp_path / "adapter" / "adapter.safetensors")))
    assert index == {**base_index, **dict.fromkeys(adapter_keys, "adapter.safetensors")}
    assert (out / "tokenizer.json").read_text() == "{}"
    assert (out / "generation_config.json").is_file()

    # the export is itself the adapter: loading it gives the trained model's outputs
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    fresh = nexus.load_model(base)
    nexus.load_adapter(fresh, out)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_plain_rope_gpt_oss_gets_the_yarn_parameters_that_compute_it(tmp_path):
    """vLLM's GPT-OSS reads YaRN parameters only: the export (and the base view for stock vLLM)
    of a plain-RoPE GPT-OSS carries YaRN with factor 1, which gives the same logits bit for bit
    (checked in transformers; vLLM's run is the serving test's gpt_oss case)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    plain = {"rope_type": "default", "rope_theta": 5000.0}
    base = write_tiny_model_dir(tmp_path / "base", rope_parameters=plain)
    model = nexus.load_model(base)
    nexus.attach_shared_experts(model, init="zero")
    nexus.save_adapter(model, tmp_path / "adapter")
    export = export_vllm(base, tmp_path / "adapter", tmp_path / "served")
    view = vllm_base_dir(base, tmp_path / "base-vllm")
    configs = [json.loads((d / "config.json").read_text()) for d in (export, view)]
    for config in configs:
        rope = config["rope_parameters"]
        assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("yarn", 1.0, 5000.0)
    drop = ("architectures", "nexus")
    assert {k: v for k, v in configs[0].items() if k not in drop} == {
        k: v for k, v in configs[1].items() if k not in drop
    }
    assert (view / "model.safetensors").stat().st_ino == (base / "model.safetensors").stat().st_ino

    plain_model = nexus.load_model(base)
    yarn_model = GptOssForCausalLM(GptOssConfig.from_pretrained(view)).eval()
    yarn_model.load_state_dict(plain_model.state_dict())
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(yarn_model(ids).logits, plain_model(ids).logits, rtol=0, atol=0)


def test_link_file_falls_back_to_a_symlink_then_a_copy(tmp_path, monkeypatch):
    from nexus.stages import export

    src = tmp_path / "a.safetensors"
    src.write_bytes(b"weights")

    def refuse(*_):
        raise OSError("cross-device link")

    assert export.link_file(src, tmp_path / "hard") == "hardlink"
    monkeypatch.setattr(export.os, "link", refuse)
    assert export.link_file(src, tmp_path / "soft") == "symlink"
    assert (tmp_path / "soft").resolve() == src
    monkeypatch.setattr(export.os, "symlink", refuse)
    assert export.link_file(src, tmp_path / "copy") == "copy"
    assert (tmp_path / "copy").read_bytes() == b"weights" and not (tmp_path / "copy").is_symlink()


def test_vllm_plugin_registers_lazily_without_importing_vllm():
    """The entry point module imports nothing heavy: NEXUS does not need vLLM."""
    import sys

    code = (
        "import sys, nexus.serving.vllm_plugin as p; "
        "assert not {'vllm', 'transformers', 'torch'} & set(sys.modules), sorted(sys.modules); "
        "print(len(p.ARCHITECTURES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4"
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "nexus"]
    assert ep.value == "nexus.serving.vllm_plugin:register"
