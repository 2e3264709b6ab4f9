"""Stage 3, analysis: per-layer PCA of router probabilities, expert importance, selection.

Everything comes from the collected sufficient statistics (:mod:`nexus.method.stats`); no
per-token data is needed. Per MoE layer (one Ray task each):

- PCA from the covariance ``(S2 - n mu mu^T) / (n - 1)``: eigenvalues (the explained
  variance, as scikit-learn's ``explained_variance_``), components and explained-variance
  ratios;
- importance of every expert by four methods, all stored so that conversion can use any:
  ``pca`` (the reference: sum over the first ``components`` components of
  ``|loading| x explained-variance ratio``), ``variance`` (sum over the same components of
  ``eigenvalue x loading^2``, the variance of the expert's probability those components
  carry), ``frequency`` (share of tokens that selected the expert, ESFT-Token) and ``gate``
  (mean routing weight per token, ESFT-Gate);
- selection by the chosen importance: the top ``k`` (default 24, capped at the layer's
  expert count) or the smallest set whose share of the layer's total importance reaches a
  threshold.

The result is ``selection.json`` (and, on request, PNG plots) in an output directory
written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import ray
from pydantic import InstanceOf

from nexus.config import RemoteCode, input_, setting
from nexus.errors import NexusError, user_errors
from nexus.method.stats import STATS_FILE, RouterStats, covariance_from_moments
from nexus.models.identity import check_identity, model_identity
from nexus.models.loading import load_config
from nexus.util.artifacts import atomic_dir, claim_output, claims_released, read_json, write_json
from nexus.util.cluster import ensure_ray

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 24
DEFAULT_COMPONENTS = 20
SELECTION_FILE = "selection.json"
FORMAT = "nexus-selection"
FORMAT_VERSION = 1


# -- per-layer maths -----------------------------------------------------------------------


def pca_from_moments(n: float, sum_p: np.ndarray, sum_ppt: np.ndarray, ddof: int = 1):
    """PCA of the rows behind the moments: (eigenvalues desc, components [C, E], ratio).

    Eigenvalues equal scikit-learn's ``PCA().explained_variance_`` (``ddof=1``); rows of
    ``components`` are unit eigenvectors (sign fixed so each one's largest entry is
    positive); ``ratio`` is eigenvalue / total variance.
    """
    cov = covariance_from_moments(n, sum_p, sum_ppt, ddof)
    vals, vecs = np.linalg.eigh(cov)
    vals, comps = vals[::-1].copy(), vecs[:, ::-1].T.copy()
    flip = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    comps *= np.where(flip == 0, 1.0, flip)[:, None]
    vals = np.clip(vals, 0.0, None)  # tiny negatives from rounding (p sums to 1: one zero eigenvalue)
    total = float(np.trace(cov))
    ratio = vals / total if total > 0 else np.zeros_like(vals)
    return vals, comps, ratio


def importance_scores(vals, comps, ratio, frequency, gate, components: int = DEFAULT_COMPONENTS) -> dict:
    """All four importance vectors (length E) of one layer."""
    c = min(int(components), len(vals))
    return {
        "pca": (np.abs(comps[:c]) * ratio[:c, None]).sum(0),
        "variance": (vals[:c, None] * comps[:c] ** 2).sum(0),
        "frequency": np.asarray(frequency, dtype=np.float64),
        "gate": np.asarray(gate, dtype=np.float64),
    }


def select(scores, *, top_k: int | None = None, threshold: float | None = None) -> list[int]:
    """Experts by decreasing score (ties: lower index first): top-k, or the smallest set
    whose share of the total score reaches ``threshold``."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    if threshold is not None:
        total = float(scores.sum())
        if not total > 0:
            raise NexusError("importances sum to zero in a layer; a threshold cannot select from them")
        cum = np.cumsum(scores[order]) / total
        k = int(np.searchsorted(cum, threshold - 1e-12) + 1)
        return [int(e) for e in order[: min(k, len(order))]]
    k = len(order) if top_k is None else int(top_k)
    return [int(e) for e in order[:k]]


def analyze_layer(
    layer: int,
    n: float,
    sum_p,
    sum_ppt,
    topk_count,
    topk_weight_sum,
    *,
    importance: str,
    top_k: int | None,
    threshold: float | None,
    components: int,
) -> dict:
    """The analysis of one layer as a JSON-ready dict (runs inside a Ray task)."""
    try:
        vals, comps, ratio = pca_from_moments(n, sum_p, sum_ppt)
    except NexusError as exc:
        raise NexusError(f"layer {layer}: {exc}") from None
    n = max(float(n), 1.0)
    scores = importance_scores(
        vals, comps, ratio, np.asarray(topk_count) / n, np.asarray(topk_weight_sum) / n, components
    )
    chosen = scores[importance]
    try:
        experts = select(chosen, top_k=top_k, threshold=threshold)
    except NexusError as exc:
        raise NexusError(f"layer {layer}: {exc}") from None
    total = float(chosen.sum())
    return {
        "layer": int(layer),
        "experts": experts,
        "importances": [float(chosen[e]) for e in experts],
        "fraction": float(chosen[experts].sum() / total) if total > 0 else 0.0,
        "eigenvalues": [float(v) for v in vals],
        "explained_variance_ratio": [float(v) for v in ratio],
        "scores": {m: [float(v) for v in s] for m, s in scores.items()},
    }


def _analyze_task(*args, **kwargs) -> dict:
    return analyze_layer(*args, **kwargs)


# -- statistics in, selection out ----------------------------------------------------------


def stats_identity(stats) -> dict | None:
    """The model identity the statistics recorded, if any."""
    meta = stats.meta or {}
    for key in ("identity", "model_identity", "base_identity"):
        if isinstance(meta.get(key), dict):
            return meta[key]
    return None


def _check_stats(stats, where: str) -> None:
    L, E = len(stats.layers), stats.num_experts
    for name, shape in stats.expected_shapes().items():
        got = tuple(np.shape(getattr(stats, name)))
        if got != shape:
            raise NexusError(
                f"router statistics {where} are inconsistent: {name} has shape {list(got)}, expected "
                f"{list(shape)} for {L} layers x {E} experts; rerun `nexus collect`"
            )
    meta = stats.meta or {}
    if "num_experts" in meta and int(meta["num_experts"]) != E:
        raise NexusError(
            f"router statistics {where}: router_stats.json says {meta['num_experts']} experts but the "
            f"tensors have {E}; the two files come from different runs"
        )
    if "layers" in meta and [int(x) for x in meta["layers"]] != list(stats.layers):
        raise NexusError(
            f"router statistics {where}: router_stats.json lists layers {meta['layers']} but the tensors "
            f"have {list(stats.layers)}; the two files come from different runs"
        )
    ident = stats_identity(stats)
    if ident:
        if "num_experts" in ident and int(ident["num_experts"]) != E:
            raise NexusError(
                f"router statistics {where} have {E} experts per layer but were recorded for a model with "
                f"{ident['num_experts']}; rerun `nexus collect`"
            )
        if "moe_layers" in ident and list(ident["moe_layers"]) != list(stats.layers):
            raise NexusError(
                f"router statistics {where} cover layers {list(stats.layers)} but the model's MoE layers "
                f"are {ident['moe_layers']}; rerun `nexus collect`"
            )


def check_against_model(
    layers: list[int], num_experts: int, identity: dict | None, model_ident: dict, what: str
):
    """One-line error if an artifact's layers / expert count / identity differ from the model's."""
    if num_experts != model_ident["num_experts"]:
        raise NexusError(
            f"{what} is for a model with {num_experts} experts per layer, but this model has "
            f"{model_ident['num_experts']}; it comes from a different model"
        )
    if list(layers) != list(model_ident["moe_layers"]):
        raise NexusError(
            f"{what} covers MoE layers {list(layers)}, but this model's MoE layers are "
            f"{model_ident['moe_layers']}; it comes from a different model"
        )
    if identity:
        check_identity(identity, model_ident, what, "use an artifact made from this model")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class AnalyzeConfig(RemoteCode):
    """``nexus analyze``: per-layer PCA of router statistics, expert importance and selection."""

    stats: str | InstanceOf[RouterStats] = input_(
        help="router statistics directory (output of nexus collect); in Python also a RouterStats"
    )
    output: str | None = input_(
        None, help="output directory for selection.json (written atomically); none: only print the selection"
    )
    overwrite: bool = input_(False, help="replace the output directory if it exists")
    model: str | None = input_(None, help="check that the statistics belong to this model directory")
    importance: Literal["pca", "variance", "frequency", "gate"] = setting(
        "pca",
        help="pca: sum of |loading| x explained-variance ratio over the first components (reference); "
        "variance: sum of eigenvalue x loading^2; frequency: share of tokens routed (ESFT-Token); "
        "gate: mean routing weight (ESFT-Gate)",
    )
    top_k: int | None = setting(
        None,
        help=f"experts selected per layer (none: {DEFAULT_TOP_K}, capped at the expert count)",
        gt=0,
    )
    threshold: float | None = setting(
        None,
        help="instead of top-k: the smallest set of experts covering this share of the layer's importance",
        gt=0,
        le=1,
    )
    components: int = setting(
        DEFAULT_COMPONENTS, help="principal components used by the pca/variance importances", gt=0
    )
    plots: bool = setting(True, help="also write PNG plots into OUTPUT/plots")

    def check(self) -> None:
        if self.top_k is not None and self.threshold is not None:
            raise ValueError("give either top_k or threshold, not both")


@claims_released()
def run(cfg: AnalyzeConfig | None = None, /, **kwargs) -> dict:
    """Analyse router statistics and select experts per layer (one Ray task per layer).

    Writes ``selection.json`` (and ``plots/``) into ``cfg.output`` unless it is None, and returns
    the selection. A ``top_k`` larger than the statistics' expert count is an error.
    """
    cfg = AnalyzeConfig.build(cfg, **kwargs)
    if cfg.output is not None:
        claim_output(cfg.output, cfg.overwrite)
    stats, where, source = _load_stats(cfg.stats)
    _check_stats(stats, where)
    E = stats.num_experts
    if cfg.top_k is not None and cfg.top_k > E:
        raise NexusError(
            f"top-k {cfg.top_k} is larger than the {E} experts per layer in these statistics; choose at most {E}"
        )
    k = None if cfg.threshold is not None else min(cfg.top_k or DEFAULT_TOP_K, E)
    identity = stats_identity(stats)
    if cfg.model is not None:
        model_ident = model_identity(load_config(cfg.model, trust_remote_code=cfg.trust_remote_code))
        check_against_model(stats.layers, E, identity, model_ident, f"router statistics {where}")

    ensure_ray()
    task = ray.remote(_analyze_task).options(
        num_cpus=1, memory=64 * 1024**2 + 64 * E * E * 8, name="nexus-analyze-layer"
    )
    refs = [
        task.remote(
            layer,
            float(stats.n[pos]),
            stats.sum_p[pos],
            stats.sum_ppt[pos],
            stats.topk_count[pos],
            stats.topk_weight_sum[pos],
            importance=cfg.importance,
            top_k=k,
            threshold=cfg.threshold,
            components=cfg.components,
        )
        for pos, layer in enumerate(stats.layers)
    ]
    with user_errors("analysing router statistics"):
        try:
            results = ray.get(refs)
        except BaseException:
            for ref in refs:  # after a failure the other layers' tasks are of no use
                ray.cancel(ref)
            raise
    selection = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "importance": cfg.importance,
        "rule": {"threshold": float(cfg.threshold)} if cfg.threshold is not None else {"top_k": k},
        "components": cfg.components,
        "num_experts": int(E),
        "layers": [int(x) for x in stats.layers],
        "tokens": int(stats.tokens),
        "identity": identity,
        "stats": source,
        "per_layer": {str(r["layer"]): r for r in results},
    }
    if cfg.output is not None:
        with atomic_dir(cfg.output, overwrite=cfg.overwrite) as tmp:
            write_json(tmp / SELECTION_FILE, selection)
            if cfg.plots:
                write_plots(selection, tmp / "plots")
        log.info("wrote %s", Path(cfg.output) / SELECTION_FILE)
    return selection


def _load_stats(stats: str | RouterStats) -> tuple[RouterStats, str, dict]:
    """(statistics, how errors name them, their source record for selection.json)."""
    if isinstance(stats, RouterStats):
        return stats, "(in memory)", {}
    path = Path(stats)
    if not path.is_dir():
        raise NexusError(f"router statistics directory not found: {stats}; run `nexus collect` first")
    loaded = RouterStats.load(path)
    return loaded, str(stats), {"path": str(path.resolve()), "sha256": _file_sha256(path / STATS_FILE)}


# -- reading a selection -------------------------------------------------------------------


def load_selection(path: str | os.PathLike) -> dict:
    """Read and check ``selection.json`` (``path`` is its directory or the file itself)."""
    p = Path(path)
    file = p / SELECTION_FILE if p.is_dir() else p
    if not file.is_file():
        raise NexusError(f"selection not found: {file}; run `nexus analyze` first")
    sel = read_json(file, "selection")
    if not isinstance(sel, dict) or sel.get("format") != FORMAT:
        raise NexusError(
            f"{file} is not a NEXUS selection (format={sel.get('format') if isinstance(sel, dict) else None!r})"
        )
    if int(sel.get("format_version", 0)) > FORMAT_VERSION:
        raise NexusError(f"{file} has format version {sel['format_version']}; upgrade nexus")
    try:
        E = int(sel["num_experts"])
        layers = [int(x) for x in sel["layers"]]
        per = sel["per_layer"]
        for layer in layers:
            entry = per[str(layer)]
            ex = [int(e) for e in entry["experts"]]
            if not ex or len(set(ex)) != len(ex) or not all(0 <= e < E for e in ex):
                raise ValueError(f"layer {layer} has invalid experts {ex} (expert count {E})")
            if len(entry["importances"]) != len(ex):
                raise ValueError(
                    f"layer {layer} has {len(ex)} experts but {len(entry['importances'])} importances"
                )
            for m, s in entry.get("scores", {}).items():
                if len(s) != E:
                    raise ValueError(f"layer {layer} has {len(s)} '{m}' scores for {E} experts")
    except (KeyError, TypeError, ValueError) as exc:
        raise NexusError(f"selection {file} is malformed ({exc}); rerun `nexus analyze`") from None
    sel["_path"] = str(file)
    return sel


def selected_experts(selection: dict, layer: int, method: str | None = None) -> tuple[list[int], list[float]]:
    """(experts, importances) for ``layer``: as analysed, or re-selected by another importance
    ``method`` (``frequency``, ``gate``...) with the same top-k / threshold rule."""
    entry = selection["per_layer"][str(layer)]
    if method is None or method == selection["importance"]:
        return [int(e) for e in entry["experts"]], [float(v) for v in entry["importances"]]
    scores = entry.get("scores", {}).get(method)
    if scores is None:
        raise NexusError(
            f"selection {selection.get('_path', '')} has no '{method}' importances; rerun `nexus analyze`"
        )
    rule = selection["rule"]
    experts = select(scores, top_k=rule.get("top_k"), threshold=rule.get("threshold"))
    return experts, [float(scores[e]) for e in experts]


# -- plots ---------------------------------------------------------------------------------


def write_plots(selection: dict, directory: str | os.PathLike) -> list[Path]:
    """Explained variance by layer, importance heatmap (selected marked), top-k coverage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    layers = selection["layers"]
    per = [selection["per_layer"][str(layer)] for layer in layers]
    method = selection["importance"]
    E = selection["num_experts"]
    cmap = plt.get_cmap("viridis")
    files = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    c = min(E, max(selection["components"], 1))
    for i, entry in enumerate(per):
        cum = np.cumsum(entry["explained_variance_ratio"][:c])
        ax.plot(np.arange(1, len(cum) + 1), cum, color=cmap(i / max(len(layers) - 1, 1)), lw=1)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(layers), max(layers)))
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set(xlabel="principal components", ylabel="cumulative explained variance", ylim=(0, 1.02))
    ax.set_title("Explained variance of router probabilities by layer")
    files.append(d / "explained_variance.png")
    fig.tight_layout()
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    imp = np.array([entry["scores"][method] for entry in per])
    norm = imp / np.where(imp.sum(1, keepdims=True) > 0, imp.sum(1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(min(16, 3 + E * 0.12), min(12, 2 + len(layers) * 0.3)))
    im = ax.imshow(norm, aspect="auto", cmap="magma", interpolation="nearest")
    ys, xs = zip(*[(i, e) for i, entry in enumerate(per) for e in entry["experts"]]) if per else ((), ())
    ax.scatter(xs, ys, s=6, c="cyan", marker="o", label="selected")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
    ax.set(xlabel="expert", ylabel="layer", title=f"Expert importance ({method}, share of layer total)")
    fig.colorbar(im, ax=ax)
    ax.legend(loc="upper right", fontsize=7)
    files.append(d / "importance_heatmap.png")
    fig.tight_layout()
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = np.arange(1, E + 1)
    curves = []
    for i, row in enumerate(imp):
        total = row.sum()
        cum = np.cumsum(np.sort(row)[::-1]) / total if total > 0 else np.zeros(E)
        curves.append(cum)
        ax.plot(ks, cum, color=cmap(i / max(len(layers) - 1, 1)), lw=0.8, alpha=0.7)
    if curves:
        ax.plot(ks, np.mean(curves, 0), color="black", lw=2, label="mean over layers")
    rule = selection["rule"]
    if rule.get("top_k"):
        ax.axvline(rule["top_k"], color="red", ls="--", lw=1, label=f"top-k = {rule['top_k']}")
    else:
        ax.axhline(rule["threshold"], color="red", ls="--", lw=1, label=f"threshold = {rule['threshold']}")
    ax.set(xlabel="k (experts kept)", ylabel="importance fraction of top-k", ylim=(0, 1.02))
    ax.set_title(f"Importance ({method}) covered by the top-k experts")
    ax.legend(fontsize=8)
    files.append(d / "topk_fraction.png")
    fig.tight_layout()
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def summary_lines(selection: dict, cfg: AnalyzeConfig | None = None) -> list[str]:
    """A short human summary: experts kept and importance covered per layer."""
    lines = []
    for layer in selection["layers"]:
        e = selection["per_layer"][str(layer)]
        ev = e["explained_variance_ratio"]
        pc1 = ev[0] if ev else math.nan
        lines.append(
            f"layer {layer:>3}: {len(e['experts']):>3} experts, {e['fraction']:.1%} of {selection['importance']} "
            f"importance, PC1 explains {pc1:.1%}"
        )
    if cfg is not None and cfg.output:
        lines.append(f"selection written to {cfg.output}")
    return lines


def job_inputs(job) -> dict:
    """In the job: the collect stage's statistics, checked against the base model."""
    return {"stats": job.stage_dir("collect"), "model": job.model_dir}
