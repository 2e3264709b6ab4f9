"""Conversion: streamed expert averaging into an initial adapter, for every family and layout."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_analyze import make_stats
from test_mxfp4 import write_mxfp4_gpt_oss_dir
from tiny_models import TINY_CONFIGS, tiny_model

import nexus
from nexus.errors import NexusError
from nexus.method.adapter import read_adapter_config, read_adapter_tensors
from nexus.models import find_moe_blocks
from nexus.models.identity import model_identity
from nexus.stages import analyze, convert
from nexus.stages.analyze import load_selection


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def setup_model(tmp_path: Path, family: str, top_k: int = 2, seed: int = 0, save=None, **analyze_kw):
    """A tiny checkpoint of ``family``, the model transformers loads from it, and a selection."""
    d = tmp_path / family
    if save is None:
        tiny_model(family, seed=seed).save_pretrained(str(d))
    else:
        save(d)
    model = _load(d)
    ident = model_identity(model.config)
    stats = make_stats(ident["moe_layers"], ident["num_experts"], seed=seed, meta={"identity": ident})
    analyze.run(stats=stats, output=tmp_path / f"{family}-sel", top_k=top_k, **analyze_kw, plots=False)
    return d, model, tmp_path / f"{family}-sel"


def live_average(model, layer: int, experts, weights) -> dict:
    """The weighted average of the experts' tensors as transformers loaded them, straight from
    the experts module (float64 sums), as shared-expert parameters. The shared expert keeps its
    family's gate/up order, so only the orientation differs: experts stored [E, in, out]
    (GPT-OSS, Llama4) are transposed to ``nn.Linear``'s [out, in], told apart by shape."""
    ex = next(m for n, m in model.named_modules() if re.search(rf"layers\.{layer}\.\w+\.experts$", n))
    hidden = model.config.get_text_config().hidden_size

    def avg(name: str):
        return sum(w * getattr(ex, name)[e].double() for w, e in zip(weights, experts)).float()

    def linear(t, in_features: int):  # [out, in]
        assert t.shape[0] != t.shape[1]  # the shape tells the orientation
        return t if t.shape[1] == in_features else t.t()

    gate_up, down = avg("gate_up_proj"), avg("down_proj")
    out = {"w_in": linear(gate_up, hidden)}
    out["w_out"] = linear(down, out["w_in"].shape[0] // 2)
    if getattr(ex, "gate_up_proj_bias", None) is not None:
        out["b_in"], out["b_out"] = avg("gate_up_proj_bias"), avg("down_proj_bias")
    return out


def chosen_experts(sel: dict, layer: int, method: str | None) -> tuple[list[int], list[float]]:
    """The selection rule (top-k by decreasing score, ties to the lower index), applied here to
    the scores the selection stored, for the importance ``method`` (default: the selection's)."""
    entry = sel["per_layer"][str(layer)]
    scores = np.asarray(entry["scores"][method or sel["importance"]])
    experts = [int(e) for e in np.argsort(-scores, kind="stable")[: sel["rule"]["top_k"]]]
    return experts, [float(scores[e]) for e in experts]


def check_adapter_average(model, adapter: Path, selection: Path, method=None, weighting="uniform"):
    tensors = read_adapter_tensors(adapter)
    cfg = read_adapter_config(adapter)
    sel = json.loads((selection / "selection.json").read_text())
    # the output starts at `scale` x the average: the scalar gate holds it, `none` folds it into
    # the down projection, `sigmoid` folds in twice that (its gate starts at sigmoid(0) = 0.5)
    gate, scale = cfg["spec"]["gate"], cfg["spec"]["gate_init"]
    down = {"scalar": 1.0, "none": scale, "sigmoid": 2 * scale}[gate]
    for layer in cfg["layers"]:
        experts, imps = chosen_experts(sel, layer, method)
        weights = (
            [1 / len(experts)] * len(experts) if weighting == "uniform" else [v / sum(imps) for v in imps]
        )
        assert cfg["init"]["layers"][str(layer)]["experts"] == experts
        for name, want in live_average(model, layer, experts, weights).items():
            want = want * down if name in ("w_out", "b_out") else want
            torch.testing.assert_close(tensors[f"layers.{layer}.{name}"], want, rtol=1e-5, atol=1e-6)
    return cfg


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_converted_weights_equal_average_of_selected_experts(family, ray_cluster, tmp_path):
    weighting = (
        "importance" if family in ("gpt_oss", "deepseek_v3", "granitemoe", "llama4_text") else "uniform"
    )
    d, model, sel = setup_model(tmp_path, family)
    out = convert.run(model=d, output=tmp_path / "adapter", selection=sel, init="pca", weighting=weighting)
    cfg = check_adapter_average(model, out, sel, weighting=weighting)
    assert cfg["init"]["method"] == "pca" and cfg["init"]["weighting"] == weighting
    assert cfg["layers"] == model_identity(model.config)["moe_layers"]
    # the adapter loads onto the base model and changes its output
    x = torch.randint(3, 100, (1, 7))
    with torch.no_grad():
        base = model(x).logits
        nexus.load_adapter(model, out)
        assert not torch.allclose(model(x).logits, base)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe", "mixtral", "granitemoe"])
def test_uniform_adapter_over_one_expert_reproduces_that_expert(family, ray_cluster, tmp_path):
    d, model, sel = setup_model(tmp_path, family, top_k=1)
    out = convert.run(model=d, output=tmp_path / "adapter", selection=sel)
    nexus.load_adapter(model, out)
    chosen = load_selection(sel)["per_layer"]
    x = torch.randn(9, model.config.hidden_size)
    for b in find_moe_blocks(model):
        (e,) = chosen[str(b.layer)]["experts"]
        se = b.module.nexus
        for name, want in live_average(model, b.layer, [e], [1.0]).items():
            assert torch.equal(getattr(se, name), want), (b.layer, name)  # 1.0 x w is exact
        with torch.no_grad():
            routed = b.experts(x, torch.full((9, 1), e), torch.ones(9, 1))
            # the weights are bit-identical; outputs differ only by the matmul kernels' summation
            # order (transformers: x @ W^T-layout, ours: F.linear), i.e. fp32 rounding
            torch.testing.assert_close(se(x), routed, rtol=1e-5, atol=1e-5)


def test_mxfp4_checkpoint_converts_to_dequantised_average(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    d, _, sel = setup_model(
        tmp_path,
        "gpt_oss",
        top_k=3,
        save=lambda p: write_mxfp4_gpt_oss_dir(p, max_shard_size="40KB"),
    )
    ref = AutoModelForCausalLM.from_pretrained(
        str(d), quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    out = convert.run(model=d, output=tmp_path / "adapter", selection=sel, weighting="importance")
    check_adapter_average(ref, out, sel, weighting="importance")


def test_esft_inits_zero_random_and_sizes(ray_cluster, tmp_path):
    d, model, sel = setup_model(tmp_path, "qwen3_moe", top_k=2)
    for init in ("frequency", "gate"):
        out = convert.run(model=d, output=tmp_path / init, selection=sel, init=init)
        cfg = check_adapter_average(model, out, sel, method=init)
        assert cfg["init"]["importance"] == init
    # scale: the scalar gate's value, or folded into the down projection
    scalar = read_adapter_tensors(convert.run(model=d, output=tmp_path / "s", selection=sel, scale=0.25))
    none = read_adapter_tensors(
        convert.run(model=d, output=tmp_path / "n", selection=sel, gate="none", scale=0.25)
    )
    assert float(scalar["layers.0.scale"]) == 0.25 and "layers.0.scale" not in none
    torch.testing.assert_close(none["layers.0.w_out"], 0.25 * scalar["layers.0.w_out"])
    with pytest.raises(NexusError, match="needs --selection"):
        convert.run(model=d, output=tmp_path / "bad", selection=None, init="pca")
    x = torch.randint(3, 100, (1, 7))
    with torch.no_grad():
        base = model(x).logits
    zero = convert.run(
        model=d, output=tmp_path / "zero", selection=None, init="zero", intermediate_size=40, gate="sigmoid"
    )
    assert read_adapter_config(zero)["spec"]["intermediate_size"] == 40
    nexus.load_adapter(model, zero)
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)
    nexus.detach_shared_experts(model)
    random_init = dict(
        model=d,
        output=tmp_path / "rnd",
        init="random",
        intermediate_size=40,
        seed=3,
        adapter_dtype="bfloat16",
    )
    rnd = convert.run(**random_init)
    assert read_adapter_tensors(rnd)["layers.1.w_in"].dtype == torch.bfloat16
    nexus.load_adapter(model, rnd)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, base)
    again = convert.run(**random_init, overwrite=True)
    assert torch.equal(
        read_adapter_tensors(again)["layers.1.w_in"], read_adapter_tensors(rnd)["layers.1.w_in"]
    )


def test_averaged_init_at_another_width(ray_cluster, tmp_path):
    """GPT-OSS (interleaved gate/up, biases): a wider averaged shared expert is the average plus
    units with zero down columns, so the model computes what it computes with the average
    (fp32 sums over more terms: close, not bitwise); a narrower one keeps exactly the average's
    units of largest |down| |gate| |up|."""
    from nexus.models.live import split_gate_up

    d, model, sel = setup_model(tmp_path, "gpt_oss", top_k=2)
    plain_dir = convert.run(model=d, output=tmp_path / "plain", selection=sel)
    plain = read_adapter_tensors(plain_dir)
    width = plain["layers.0.w_out"].shape[1]
    wide_dir = convert.run(model=d, output=tmp_path / "wide", selection=sel, intermediate_size=width + 24)
    wide = read_adapter_tensors(wide_dir)
    assert read_adapter_config(wide_dir)["init"]["width"] == "widened"
    for layer in (0, 1):
        pg, pu = split_gate_up(plain[f"layers.{layer}.w_in"], "interleaved")
        wg, wu = split_gate_up(wide[f"layers.{layer}.w_in"], "interleaved")
        assert torch.equal(wg[:width], pg) and torch.equal(wu[:width], pu)
        assert wg[width:].abs().min() > 0 and wu[width:].abs().min() > 0  # extra units are trained
        assert torch.equal(wide[f"layers.{layer}.w_out"][:, :width], plain[f"layers.{layer}.w_out"])
        assert not wide[f"layers.{layer}.w_out"][:, width:].any()
        assert torch.equal(wide[f"layers.{layer}.b_out"], plain[f"layers.{layer}.b_out"])
        pb = split_gate_up(plain[f"layers.{layer}.b_in"], "interleaved")
        wb = split_gate_up(wide[f"layers.{layer}.b_in"], "interleaved")
        assert all(torch.equal(w[:width], p) and not w[width:].any() for w, p in zip(wb, pb))
    x = torch.randint(3, 100, (2, 9))
    outputs = []
    for adapter in (plain_dir, wide_dir):
        nexus.load_adapter(model, adapter)
        with torch.no_grad():
            outputs.append(model(x).logits)
        nexus.detach_shared_experts(model)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)

    narrow = read_adapter_tensors(
        convert.run(model=d, output=tmp_path / "narrow", selection=sel, intermediate_size=width // 4)
    )
    for layer in (0, 1):
        pg, pu = split_gate_up(plain[f"layers.{layer}.w_in"], "interleaved")
        ng, nu = split_gate_up(narrow[f"layers.{layer}.w_in"], "interleaved")
        down = plain[f"layers.{layer}.w_out"]
        size = down.norm(dim=0) * pg.norm(dim=1) * pu.norm(dim=1)
        # each kept unit is one of the average's, in order, and none dropped is larger
        kept = [int((pg == row).all(dim=1).nonzero()[0]) for row in ng]
        assert kept == sorted(kept) and len(kept) == width // 4
        assert torch.equal(nu, pu[kept]) and torch.equal(narrow[f"layers.{layer}.w_out"], down[:, kept])
        dropped = sorted(set(range(width)) - set(kept))
        assert size[kept].min() >= size[dropped].max()


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_bad_inputs_give_one_line_errors_and_no_output(ray_cluster, tmp_path):
    d = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(str(d), max_shard_size="30KB")
    ident = model_identity(_load(d).config)
    out = tmp_path / "adapter"

    def fails(match, selection, model_dir=d, **kw):
        with pytest.raises(NexusError, match=match) as info:
            convert.run(model=model_dir, output=out, selection=selection, **kw)
        assert "\n" not in str(info.value)
        _no_output(out)

    # a selection from a model with another expert count, or other layers
    analyze.run(stats=make_stats(ident["moe_layers"], 8), output=tmp_path / "sel8", top_k=2, plots=False)
    fails("8 experts per layer, but this model has 4", tmp_path / "sel8")
    analyze.run(stats=make_stats([0, 1, 2], 4), output=tmp_path / "sel3", top_k=2, plots=False)
    fails(r"covers MoE layers \[0, 1, 2\], but this model's MoE layers are \[0, 1\]", tmp_path / "sel3")
    other = dict(ident, hidden_size=64)
    analyze.run(
        stats=make_stats(ident["moe_layers"], 4, meta={"identity": other}),
        output=tmp_path / "selh",
        top_k=2,
        plots=False,
    )
    fails("hidden_size=64, but this model has hidden_size=32", tmp_path / "selh")
    fails("selection not found", tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "selection.json").write_text("[1, 2")
    fails("is not valid JSON", tmp_path / "junk")

    good = tmp_path / "sel"
    analyze.run(
        stats=make_stats(ident["moe_layers"], 4, meta={"identity": ident}), output=good, top_k=2, plots=False
    )
    shards = sorted(d.glob("*.safetensors"))
    # truncated shard
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[:-16])
    fails(f"{shards[-1].name} is truncated or corrupted", good)
    # corrupted header
    shards[-1].write_bytes(b"\x00\x01garbage" + data[10:])
    fails(f"{shards[-1].name} is truncated or corrupted", good)
    # missing shard
    shards[-1].unlink()
    fails(f"shard {shards[-1].name} .* is missing", good)
    shards[-1].write_bytes(data)
    # an existing output is kept unless --overwrite
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(NexusError, match="already exists"):
        convert.run(model=d, output=out, selection=good)
    assert (out / "keep").exists()
    convert.run(model=d, output=out, selection=good, overwrite=True)
    assert not (out / "keep").exists() and read_adapter_config(out)["init"]["method"] == "pca"


def test_layer_task_without_shared_storage_returns_tensors(tmp_path):
    """On a node that cannot see the driver's file, the task returns the bytes instead."""
    from nexus.method.shared_expert import SharedExpertSpec
    from nexus.stages.convert import NONCE_FILE, LayerJob, _tensor_entries, build_layer

    spec = SharedExpertSpec(hidden_size=8, intermediate_size=4)
    entries = tuple(_tensor_entries(3, spec, "float32"))
    (tmp_path / NONCE_FILE).write_text("other-run")
    job = LayerJob(3, spec.to_dict(), "random", 0, 1.0, "float32", entries=entries)
    for target in (None, (str(tmp_path / "adapter.safetensors"), "this-run", {})):
        result = build_layer(LayerJob(**{**job.__dict__, "target": target}))
        assert result["written"] is False
        assert sorted(result["tensors"]) == ["layers.3.scale", "layers.3.w_in", "layers.3.w_out"]
        assert result["tensors"]["layers.3.w_in"].nbytes == 8 * 8 * 4


def test_convert_cli(ray_cluster, tmp_path, capsys):
    from nexus.cli import main

    d, model, sel = setup_model(tmp_path, "olmoe")
    out = tmp_path / "adapter"
    args = ["convert", "--model", str(d), "--selection", str(sel), "--output", str(out)]
    assert main([*args, "--weighting", "importance", "--gate", "sigmoid"]) == 0
    assert "adapter written" in capsys.readouterr().out
    check_adapter_average(model, out, sel, weighting="importance")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--init", "zero", "--intermediate-size", "16"]) == 0
    assert read_adapter_config(out)["spec"]["intermediate_size"] == 16
    assert main([*args, "--overwrite", "--intermediate-size", "16"]) == 0  # the pca average, narrowed
    assert read_adapter_config(out)["init"]["width"] == "narrowed"
    capsys.readouterr()
    no_selection = ["convert", "--model", str(d), "--output", str(out), "--overwrite", "--init", "pca"]
    assert main(no_selection) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --selection" in err[0]
    assert os.listdir(out)  # the previous adapter is still there
    assert json.loads((out / "nexus_config.json").read_text())["init"]["method"] == "pca"
