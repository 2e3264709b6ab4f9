"""Analysis: PCA from statistics against scikit-learn, importances, selection, artifacts, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nexus.errors import NexusError
from nexus.method.stats import RouterStats
from nexus.stages import analyze
from nexus.stages.analyze import (
    importance_scores,
    load_selection,
    pca_from_moments,
    select,
    selected_experts,
)


def random_rows(n: int, experts: int, seed: int = 0, temperature: float = 2.0) -> torch.Tensor:
    """Softmax router probabilities with some experts systematically preferred."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.linspace(1.5, -1.5, experts)[torch.randperm(experts, generator=g)]
    return torch.softmax(torch.randn(n, experts, generator=g, dtype=torch.float64) * temperature + bias, -1)


def make_stats(layers, experts, n=400, seed=0, top_k=2, meta=None, rows=None) -> RouterStats:
    stats = RouterStats(list(layers), experts, meta=dict(meta or {}))
    for pos in range(len(stats.layers)):
        p = rows[pos] if rows is not None else random_rows(n, experts, seed + pos)
        w, i = p.topk(top_k, -1)
        stats.update(pos, p, i, w / w.sum(-1, keepdim=True))
    return stats


def test_pca_from_statistics_equals_sklearn_on_raw_rows():
    from sklearn.decomposition import PCA

    rows = random_rows(700, 8, seed=5)
    stats = make_stats([0], 8, rows=[rows])
    vals, comps, ratio = pca_from_moments(stats.n[0], stats.sum_p[0], stats.sum_ppt[0])
    ref = PCA(svd_solver="full").fit(rows.numpy())
    np.testing.assert_allclose(vals, ref.explained_variance_, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.abs(comps), np.abs(ref.components_), atol=1e-6, rtol=0)
    np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, atol=1e-6, rtol=0)
    # the reference importance: sum over the first 20 components of |loading| x explained-variance ratio
    scores = importance_scores(vals, comps, ratio, stats.frequency(0), stats.mean_gate(0), components=20)
    want = (np.abs(ref.components_[:20]) * ref.explained_variance_ratio_[:20, None]).sum(0)
    np.testing.assert_allclose(scores["pca"], want, atol=1e-9)
    np.testing.assert_allclose(scores["variance"], np.diag(np.cov(rows.numpy().T)), atol=1e-9)
    top = rows.topk(2, -1).indices
    np.testing.assert_allclose(scores["frequency"], np.bincount(top.reshape(-1), minlength=8) / 700)
    assert scores["gate"].sum() == pytest.approx(1.0)


def test_selection_rules():
    s = np.array([0.1, 0.4, 0.0, 0.3, 0.2])
    assert select(s, top_k=2) == [1, 3]
    assert select(s, threshold=0.7) == [1, 3]
    assert select(s, threshold=0.71) == [1, 3, 4]
    assert select(s, threshold=1.0) == [1, 3, 4, 0]
    assert select(np.ones(4), top_k=3) == [0, 1, 2]  # ties: lower index first
    with pytest.raises(NexusError, match="sum to zero"):
        select(np.zeros(3), threshold=0.5)


def test_analyze_writes_selection_and_plots(ray_cluster, tmp_path):
    stats = make_stats([1, 3, 5], 6, meta={"note": "synthetic"})
    stats.save(tmp_path)
    out = tmp_path / "sel"
    sel = analyze.run(stats=tmp_path, output=out, top_k=3, importance="pca", plots=True)
    assert (out / "selection.json").is_file()
    for png in ("explained_variance.png", "importance_heatmap.png", "topk_fraction.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    disk = load_selection(out)
    assert disk["layers"] == [1, 3, 5] and disk["num_experts"] == 6 and disk["rule"] == {"top_k": 3}
    assert disk["stats"]["sha256"] and disk["tokens"] == 400
    for pos, layer in enumerate([1, 3, 5]):
        entry = sel["per_layer"][str(layer)]
        vals, comps, ratio = pca_from_moments(stats.n[pos], stats.sum_p[pos], stats.sum_ppt[pos])
        scores = importance_scores(vals, comps, ratio, stats.frequency(pos), stats.mean_gate(pos))
        assert entry["experts"] == select(scores["pca"], top_k=3)
        assert entry["importances"] == pytest.approx([scores["pca"][e] for e in entry["experts"]])
        assert entry["fraction"] == pytest.approx(scores["pca"][entry["experts"]].sum() / scores["pca"].sum())
        assert entry["explained_variance_ratio"] == pytest.approx(list(ratio))
        # re-selection by another importance keeps the rule
        ex, imp = selected_experts(disk, layer, "frequency")
        assert ex == select(stats.frequency(pos), top_k=3)
        assert imp == pytest.approx(list(stats.frequency(pos)[ex]))
    # default top-k (24) is capped at the expert count; threshold selects a prefix
    assert all(len(e["experts"]) == 6 for e in analyze.run(stats=stats)["per_layer"].values())
    thr = analyze.run(stats=stats, importance="gate", threshold=0.5)
    for pos, layer in enumerate(stats.layers):
        assert thr["per_layer"][str(layer)]["experts"] == select(stats.mean_gate(pos), threshold=0.5)
        assert thr["per_layer"][str(layer)]["fraction"] >= 0.5


def test_analyze_bad_inputs(ray_cluster, tmp_path):
    stats = make_stats([0, 1], 4)
    (tmp_path / "stats").mkdir()
    stats.save(tmp_path / "stats")
    out = tmp_path / "sel"
    with pytest.raises(NexusError, match="top-k 5 is larger than the 4 experts") as info:
        analyze.run(stats=tmp_path / "stats", output=out, top_k=5, plots=False)
    assert "\n" not in str(info.value)
    with pytest.raises(NexusError, match="not both"):
        analyze.run(stats=stats, output=out, top_k=2, threshold=0.5, plots=False)
    with pytest.raises(NexusError, match="analyze setting 'importance': Input should be 'pca'"):
        analyze.run(stats=stats, output=out, importance="magic", plots=False)
    with pytest.raises(NexusError, match="statistics directory not found"):
        analyze.run(stats=tmp_path / "nope", output=out, plots=False)
    # metadata and tensors from different runs
    meta = tmp_path / "stats" / "router_stats.json"
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "num_experts": 8}))
    with pytest.raises(NexusError, match="says 8 experts but the tensors have 4"):
        analyze.run(stats=tmp_path / "stats", output=out, plots=False)
    meta.write_text(json.dumps({**m, "identity": {"num_experts": 8}}))
    with pytest.raises(NexusError, match="recorded for a model with 8"):
        analyze.run(stats=tmp_path / "stats", output=out, plots=False)
    # a layer with a single token has no covariance
    one = RouterStats([0], 4)
    one.update(0, random_rows(1, 4), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))
    with pytest.raises(NexusError, match="layer 0: 1 tokens are too few"):
        analyze.run(stats=one, output=out, plots=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sel")]
    # existing output needs --overwrite
    out.mkdir()
    with pytest.raises(NexusError, match="already exists"):
        analyze.run(stats=stats, output=out, plots=False)


def test_analyze_checks_statistics_against_model(ray_cluster, tmp_path):
    from tiny_models import tiny_model

    from nexus.models.identity import model_identity

    d = tmp_path / "olmoe"
    model = tiny_model("olmoe")
    model.save_pretrained(str(d))
    ident = model_identity(model.config)
    good = make_stats(ident["moe_layers"], ident["num_experts"], meta={"identity": ident})
    assert analyze.run(stats=good, model=d, top_k=2)["identity"] == ident
    other = make_stats(ident["moe_layers"], 8)
    with pytest.raises(NexusError, match="8 experts per layer, but this model has 4"):
        analyze.run(stats=other, model=d)
    fewer = make_stats([0], 4)
    with pytest.raises(
        NexusError, match=r"covers MoE layers \[0\], but this model's MoE layers are \[0, 1\]"
    ):
        analyze.run(stats=fewer, model=d)


def test_analyze_cli(ray_cluster, tmp_path, capsys):
    from nexus.cli import main

    make_stats([0, 1], 4).save(tmp_path)
    out = tmp_path / "sel"
    assert main(["analyze", "--stats", str(tmp_path), "--output", str(out), "--top-k", "2", "--plots"]) == 0
    assert "layer   0:   2 experts" in capsys.readouterr().out
    assert len(load_selection(out)["per_layer"]["1"]["experts"]) == 2
    assert main(["analyze", "--stats", str(tmp_path), "--output", str(out), "--top-k", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nexus: error: output directory") and "\n" not in err
    args = ["analyze", "--stats", str(tmp_path), "--output", str(out), "--top-k", "9", "--overwrite"]
    assert main(args) == 2
    assert "top-k 9 is larger than the 4 experts" in capsys.readouterr().err
    assert main([*args[:-3], "--threshold", "0.6", "--importance", "variance", "--plots", "--overwrite"]) == 0
    assert (out / "plots" / "topk_fraction.png").is_file()
    assert load_selection(out)["rule"] == {"threshold": 0.6}
