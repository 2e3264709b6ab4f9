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
    np.testing.assert_allclose(scores["frequency"], reference_scores(rows, 2)["frequency"], rtol=1e-12)
    np.testing.assert_allclose(scores["gate"], reference_scores(rows, 2)["gate"], rtol=1e-12)


def reference_scores(rows: torch.Tensor, top_k: int, components: int = 20) -> dict[str, np.ndarray]:
    """The four importances from raw probability rows, with scikit-learn's PCA and numpy only:
    pca = sum over the first ``components`` components of |loading| x explained-variance ratio;
    variance = sum of eigenvalue x loading^2; frequency = share of tokens whose top-k holds the
    expert; gate = mean routing weight (top-k probabilities renormalised, as make_stats routes)."""
    from sklearn.decomposition import PCA

    p = rows.numpy()
    n, experts = p.shape
    ref = PCA(svd_solver="full").fit(p)
    c = min(components, experts)
    comps, ratio, vals = ref.components_[:c], ref.explained_variance_ratio_[:c], ref.explained_variance_[:c]
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, top, 1)
    w = w / w.sum(1, keepdims=True)
    gate = np.zeros(experts)
    np.add.at(gate, top.reshape(-1), w.reshape(-1))
    return {
        "pca": (np.abs(comps) * ratio[:, None]).sum(0),
        "variance": (vals[:, None] * comps**2).sum(0),
        "frequency": np.bincount(top.reshape(-1), minlength=experts) / n,
        "gate": gate / n,
        "ratio": ref.explained_variance_ratio_,
    }


def top_k_by_score(scores: np.ndarray, k: int) -> list[int]:
    """Decreasing score, ties to the lower index (the documented selection rule)."""
    return [int(e) for e in np.argsort(-np.asarray(scores), kind="stable")[:k]]


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
    # expected values from the raw rows behind the statistics (make_stats: seed + pos), not from
    # the moments; float64 throughout, PCA by SVD vs eigh of the covariance: agree to ~1e-9
    refs = [reference_scores(random_rows(400, 6, pos), top_k=2) for pos in range(3)]
    for pos, layer in enumerate([1, 3, 5]):
        entry, ref = sel["per_layer"][str(layer)], refs[pos]
        assert entry["experts"] == top_k_by_score(ref["pca"], 3)
        np.testing.assert_allclose(entry["importances"], ref["pca"][entry["experts"]], atol=1e-9)
        assert entry["fraction"] == pytest.approx(
            ref["pca"][entry["experts"]].sum() / ref["pca"].sum(), abs=1e-9
        )
        np.testing.assert_allclose(entry["explained_variance_ratio"], ref["ratio"], atol=1e-9)
        for method in ("pca", "variance", "frequency", "gate"):
            np.testing.assert_allclose(entry["scores"][method], ref[method], atol=1e-9, rtol=1e-9)
        # re-selection by another importance keeps the rule
        ex, imp = selected_experts(disk, layer, "frequency")
        assert ex == top_k_by_score(ref["frequency"], 3)
        np.testing.assert_allclose(imp, ref["frequency"][ex], rtol=1e-12)
    # default top-k (24) is capped at the expert count; threshold selects the shortest prefix of the
    # ranking whose share of the layer's total reaches it
    assert all(len(e["experts"]) == 6 for e in analyze.run(stats=stats)["per_layer"].values())
    thr = analyze.run(stats=stats, importance="gate", threshold=0.5)
    for pos, layer in enumerate(stats.layers):
        gate = refs[pos]["gate"]
        order = top_k_by_score(gate, 6)
        share = np.cumsum(gate[order]) / gate.sum()
        want = order[: int(np.argmax(share >= 0.5)) + 1]
        assert thr["per_layer"][str(layer)]["experts"] == want
        assert thr["per_layer"][str(layer)]["fraction"] == pytest.approx(share[len(want) - 1], abs=1e-12)


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
