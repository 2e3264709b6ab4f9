"""Specialisation quality: NEXUS against LoRA, ESFT, full fine-tuning and the untrained base.

Every method (``benchmarks/methods.py``) specialises the demo base to a target domain
(``--domain``: the demo corpus's docstrings, or another domain of :mod:`nexus.demo.domains`)
with the same data, sequence length, batch size, number of steps, warmup and schedule, in
this one process (no Ray Train per run; the loss, optimiser and schedule code is ``nexus
train``'s). For each run it records held-out domain perplexity (the goal), held-out general
perplexity (forgetting), trainable parameters, training wall time, peak resident memory and
a domain-perplexity curve; over seeds it reports mean and standard deviation. The seed
permutes the order of the training blocks (the same permutation for every method) and seeds
every random initialisation.

Methods trade domain perplexity against general perplexity, so they are compared **at
matched forgetting** (:func:`matched_forgetting`): per seed, each method's domain NLL read
off its own learning-rate frontier at the general perplexity of the reference run (NEXUS at
the pipeline's default learning rate, same seed), as a paired difference. That needs each
method at several learning rates (``--grid``/``--lrs``), and the grid must bracket each
method's optimum (:func:`lr_brackets` warns when it does not). The "mean NLL" (the average of
the two held-out NLLs: specialisation and retention weighted equally), as paired differences
against a reference run with the same seed (same batches), is reported next to it.

Runs are appended to ``<out>/results.jsonl`` (``sweep.jsonl``) as they finish, keyed by the
method, the seed, the settings and the version of the code that trains and measures them
(:data:`HARNESS_VERSION`); a rerun with the same settings and code skips the runs already
there, so an interrupted benchmark resumes, and ``--shard K/N`` splits the runs over N
processes sharing ``--out``. Runs of other code versions are not reported (nor reused)
unless ``--any-version`` is given. ESFT-Gate runs that choose the same experts as the
ESFT-Token run already recorded are copied from it (:func:`esft_twin`).

    python benchmarks/quality.py --sweep-lr         # 1. learning-rate grid per method family (seed 0)
    python benchmarks/quality.py --grid --domain readmes   # 2. matched forgetting: lr grids, seeds 0 1 2
    python benchmarks/quality.py                    # 3. every method and variant, seeds 0 1 2
    python benchmarks/quality.py --report-only --docs docs/img   # tables and plots again
    python benchmarks/quality.py --quick            # smoke test: tiny demo, 1 seed, 80 steps
    python benchmarks/quality.py --methods nexus nexus-topk2 nexus-kd1@0.003 --seeds 0 1 2
    python benchmarks/quality.py --methods nexus lora-r11 --lrs nexus=1e-3,3e-3 lora-r11=1e-4,3e-4,1e-3
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods as M  # noqa: E402

from nexus.demo.domains import DEFAULT_DOMAIN, DOMAINS, ensure_domain  # noqa: E402
from nexus.stages.evaluate import packed_blocks, perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: the pipeline's default NEXUS (TrainConfig: KD weight 1, lr 3e-3): the reference run of the
#: matched-forgetting comparison
DEFAULT_METHOD = "nexus-kd1"
DEFAULT_LR = 3e-3
#: the full run: the pipeline's default NEXUS and the baselines with and without KD, then the
#: NEXUS variants at NEXUS_LR (inits, gates, router, KD weight, top-k of the pca init: the demo
#: has 8 experts per layer; ``nexus`` is the former default, KD 0.5), then the former default lr
DEFAULT_METHODS = [
    "base", DEFAULT_METHOD, "lora-r11", "lora-r11-kd", "lora-r2", "esft-token", "esft-token-kd", "esft-gate",
    "esft-gate-kd", "full-ft",
    "nexus", "nexus-frequency", "nexus-zero", "nexus-random", "nexus-sigmoid", "nexus-router",
    "nexus-kd0", "nexus-kd2", "nexus-topk1", "nexus-topk2", "nexus-topk8", "nexus@0.001", "nexus-kd1@0.001",
    "nexus-offline-k8", "nexus-offline-k32", "nexus-offline-k128",
]  # fmt: skip
assert set(M.METHODS) <= set(DEFAULT_METHODS)
#: ``--grid``'s default methods: the default NEXUS and each baseline, with and without KD (at
#: the default's KD weight)
FRONTIER_METHODS = [
    "base", DEFAULT_METHOD, "nexus-kd0", "lora-r11", "lora-r11-kd1", "esft-token", "esft-token-kd1", "esft-gate",
    "esft-gate-kd1", "full-ft",
]  # fmt: skip
#: ``--sweep-lr``: one method per family, each over its grid, seed 0
SWEEP_METHODS = ["base", "nexus", "lora-r11", "esft-token", "full-ft"]
#: learning rates per method kind for ``--grid`` and ``--sweep-lr`` (x ``--lr-scale``): about
#: 1/3x to 10x the optimum of the docstring sweep in docs/benchmarks.md, so that each optimum is
#: bracketed and each frontier spans the reference's forgetting (LoRA's optimum was the lowest
#: value swept there, so its grid goes lower)
GRIDS: dict[str, tuple[float, ...]] = {
    "nexus": (3e-4, 1e-3, 3e-3, 1e-2),
    "lora": (1e-4, 3e-4, 1e-3, 3e-3),
    "esft": (3e-4, 1e-3, 3e-3, 1e-2),
    "full": (3e-5, 1e-4, 3e-4, 1e-3),
}
#: held-out tokens per split (the quick mode uses 2,048): enough that general perplexity does
#: not move by several points between seeds
EVAL_TOKENS = 65_536
#: The version of the harness that results are keyed by: runs of another version are stale
#: (not reported, rerun) unless ``--any-version``. Bump it by hand with any change that moves
#: a number: the run loop, a method's definition, training, losses, the shared expert or
#: evaluation; not for reporting, plotting or new methods. (Its first value was the
#: :func:`code_hash` of that time, so the runs recorded before it keep their keys.) Each run
#: also records its :func:`code_hash`; the report lists the hashes it mixes.
HARNESS_VERSION = "04a1d30e0768"
#: the code whose changes may change the results: training, losses, the shared expert, the
#: methods, evaluation and this script (its run loop)
CODE_FILES = (
    "benchmarks/quality.py", "benchmarks/methods.py", "nexus/stages/train/*.py", "nexus/method/*.py",
    "nexus/stages/evaluate.py",
)  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny demo, one seed, a few steps")
    p.add_argument("--size", default=None, help="demo size (default: small; tiny with --quick)")
    p.add_argument("--model", default=None, help="base model directory (default: the demo base)")
    p.add_argument("--corpus-dir", default=None, help="corpus with domain/domain_heldout/general_heldout")
    p.add_argument(
        "--domain",
        default=DEFAULT_DOMAIN,
        choices=list(DOMAINS),
        help=f"target domain (default {DEFAULT_DOMAIN}: the demo corpus's domain split; see nexus/demo/domains.py)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"methods (default: all: {' '.join(DEFAULT_METHODS)}; with --grid: {' '.join(FRONTIER_METHODS)})",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; 0 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 100)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: 256, capped at the model's positions")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of the steps)")
    p.add_argument(
        "--eval-tokens", type=int, default=None, help=f"held-out tokens per split (default {EVAL_TOKENS})"
    )
    p.add_argument("--curve-every", type=int, default=None, help="steps between curve points (default 20)")
    p.add_argument(
        "--curve-tokens", type=int, default=None, help="domain tokens per curve point (default 2048)"
    )
    p.add_argument(
        "--lr", nargs="*", default=[], metavar="METHOD=LR", help="override a method's learning rate"
    )
    p.add_argument(
        "--lrs",
        nargs="*",
        default=[],
        metavar="METHOD=LR,LR,...",
        help="run a method at each of these learning rates (its grid), for every seed",
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help="run every method at each learning rate of its kind's grid (x --lr-scale), every seed: "
        + "; ".join(f"{kind} {' '.join(f'{lr:g}' for lr in lrs)}" for kind, lrs in GRIDS.items()),
    )
    p.add_argument(
        "--lr-scale", type=float, default=None, help="multiply every lr (default 1; 3 with --quick)"
    )
    p.add_argument(
        "--sweep-lr",
        action="store_true",
        help=f"instead: {' '.join(SWEEP_METHODS[1:])} over their grids, seed 0, into sweep.jsonl",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed for every run)")
    p.add_argument("--shard", default="0/1", help="K/N: run only every N-th planned run from the K-th")
    p.add_argument(
        "--out",
        default=None,
        help="results directory (default: benchmarks/results/quality, /<domain> for other domains; "
        "runs/quality-tiny-quick with --quick)",
    )
    p.add_argument("--work", default=None,
                   help="NEXUS initial adapters and statistics (default: runs/quality-<size>[-<domain>])")  # fmt: skip
    p.add_argument("--docs", default=None, help="write the plots here (e.g. docs/img) instead of --out")
    p.add_argument("--report-only", action="store_true", help="only aggregate the results already in --out")
    p.add_argument(
        "--across",
        nargs="+",
        default=None,
        metavar="DOMAIN[@SIZE]",
        help="instead: one matched-forgetting table across these domains (of --size, or SIZE), from each one's "
        "summary.json (run --report-only per domain first); written to <results>/across.md",
    )
    p.add_argument(
        "--any-version",
        action="store_true",
        help="also report (and do not rerun) runs made by other code versions (the latest run wins)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.size = args.size or ("tiny" if quick else "small")
    args.seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    args.steps = args.steps or (80 if quick else 100)
    args.lr_scale = args.lr_scale or (3.0 if quick else 1.0)
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    args.eval_tokens = args.eval_tokens or (2048 if quick else EVAL_TOKENS)
    args.curve_every = args.curve_every or (6 if quick else 20)
    args.curve_tokens = args.curve_tokens or (512 if quick else 2048)
    args.methods = args.methods or (
        list(M.METHODS) if quick else FRONTIER_METHODS if args.grid else DEFAULT_METHODS
    )
    domain = "" if args.domain == DEFAULT_DOMAIN else args.domain  # docstrings: the original layout
    name = f"quality-{args.size}{'-quick' if quick else ''}"
    args.out = Path(
        args.out or (ROOT / "runs" / name / domain if quick else results_dir(args.domain, args.size))
    )
    work = ROOT / "runs" / (f"{name}-{domain}" if domain else name)  # the inits are the domain's
    args.work = Path(args.work or (args.out if quick else work))
    return args


def results_dir(domain: str, size: str = "small") -> Path:
    """Where a domain's results go by default: ``benchmarks/results/quality``, ``/<domain>`` for
    domains other than docstrings (whose runs were recorded before domains existed); the
    other demo sizes under ``quality-<size>``."""
    root = ROOT / "benchmarks" / "results" / ("quality" if size == "small" else f"quality-{size}")
    return root if domain == DEFAULT_DOMAIN else root / domain


def lr_grids(items: Iterable[str]) -> dict[str, list[float]]:
    """``--lrs``'s ``METHOD=LR,LR,...`` items as {method: learning rates}."""
    grids = {}
    for item in items:
        name, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"--lrs {item}: expected METHOD=LR,LR,...")
        grids[name] = [float(v) for v in values.split(",")]
    return grids


def scaled(lr: float, scale: float) -> float:
    """``lr * scale`` to 6 significant digits: a run's learning rate is part of its key, and
    ``0.003 * 3`` is 0.009000000000000001, not the 0.009 a user types in ``--lrs``."""
    return float(f"{lr * scale:.6g}")


def plan(args) -> list[tuple[M.Method, int]]:
    """(method, seed) runs in order: seeds outermost, so a partial run covers every method.

    A method runs at ``NAME@LR``'s learning rate exactly; else at each of its ``--lrs``; else,
    with ``--grid``/``--sweep-lr``, at each of its kind's :data:`GRIDS` x ``--lr-scale``; else
    at ``--lr``'s or the registry's x ``--lr-scale``.
    """
    single = dict(item.split("=", 1) for item in args.lr)
    grids = lr_grids(args.lrs)
    names, seeds = (SWEEP_METHODS, args.seeds[:1]) if args.sweep_lr else (args.methods, args.seeds)
    methods = []
    for n in names:
        m = M.get_method(n)
        if "@" in n or not m.trains:
            lrs = [m.lr]
        elif m.name in grids:
            lrs = grids[m.name]
        elif args.grid or args.sweep_lr:
            lrs = [scaled(lr, args.lr_scale) for lr in GRIDS[m.kind]]
        else:
            lrs = [float(single[m.name]) if m.name in single else scaled(m.lr, args.lr_scale)]
        methods += [m.with_(lr=lr) for lr in lrs]
    runs = []
    for seed in seeds:
        for m in methods:
            if m.kind == "base" and seed != seeds[0]:
                continue  # deterministic: one evaluation is enough
            runs.append((m, seed))
    return runs


#: Method fields added after results were recorded: left out of the key at their defaults, so
#: the runs already in results.jsonl keep their keys
_LATER_FIELDS = {
    f.name: f.default
    for f in fields(M.Method)
    if f.name in ("kd", "teacher_k", "width", "unfreeze", "temperature", "lora_on", "attn_rank")
}


def run_key(method: M.Method, seed: int, settings: dict, code: str | None = None) -> str:
    """The run's key: method, seed and settings, and the code version (``code``; None: the
    version-free key, the only key of the runs recorded before versions were)."""
    fields = {k: v for k, v in asdict(method).items() if _LATER_FIELDS.get(k, object()) != v}
    blob = {"method": fields, "seed": seed, **settings, **({"code": code} if code else {})}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def code_hash(root: Path = ROOT) -> str:
    """A hash of the contents of :data:`CODE_FILES` (no git needed), recorded with each run."""
    h = hashlib.sha256()
    for pattern in CODE_FILES:
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:12]


def index_runs(rows: Iterable[dict], any_version: bool = False) -> dict[str, dict]:
    """Recorded runs by the key a plan looks them up with: the versioned key, or with
    ``any_version`` the version-free one (old rows have only that), the latest run winning."""
    return {(r.get("key_any", r["key"]) if any_version else r["key"]): r for r in rows}


def esft_twin(method: M.Method, seed: int, settings: dict, code: str, done: dict, inits) -> dict | None:
    """This ESFT run, when it is already recorded under the other ESFT score: ESFT-Token and
    ESFT-Gate differ only in how they choose the experts, so where both choose the same experts
    (same seed, learning rate and KD weight) the training is the same, bit for bit, and the run
    is copied (``same_run_as``: the recorded run's key) instead of repeated. None otherwise."""
    if method.kind != "esft":
        return None
    scores = {"frequency": "esft-token", "gate": "esft-gate"}
    other = "gate" if method.esft_score == "frequency" else "frequency"
    twin_name = method.name.replace(scores[method.esft_score], scores[other], 1)
    twin = M.get_method(twin_name).with_(lr=method.lr)
    run = done.get(run_key(twin, seed, settings, code))
    chosen = {str(layer): e for layer, e in inits.esft_experts(method.esft_score, method.esft_k).items()}
    if run is None or twin.kd_weight != method.kd_weight or run["esft_experts"] != chosen:
        return None
    return {**run, "method": method.name, "label": method.label, "method_config": asdict(method),
            "same_run_as": run["key"]}  # fmt: skip


def run_one(method: M.Method, seed: int, data: dict, settings: dict, inits, model_dir: Path) -> dict:

    cfg = M.train_config(
        method,
        str(model_dir),
        seed=seed,
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        seq_len=settings["seq_len"],
        warmup_steps=settings["warmup"],
    )
    M.reset_peak_rss()
    rss0 = M.rss_bytes()
    t_build = time.perf_counter()
    built = M.build(method, cfg, inits, teacher=data.get("teacher"))
    build_s = time.perf_counter() - t_build
    model = built.model
    curve_blocks = data["domain"][: max(1, settings["curve_tokens"] // settings["seq_len"])]
    curve = [(0, perplexity(model, curve_blocks)[0])]
    train_s = 0.0
    records = []
    if method.trains:
        batches = M.seeded_batches(data["train"], settings["batch_size"], seed)

        def on_step(rec):
            nonlocal train_s
            train_s += rec.seconds
            if rec.step % settings["curve_every"] == 0 or rec.step == cfg.total_steps:
                curve.append((rec.step, perplexity(model, curve_blocks)[0]))

        records = M.train(built, batches, on_step=on_step)
        if built.masks:
            M.check_esft_frozen(built)
    t_eval = time.perf_counter()
    domain = perplexity(model, data["domain"])[0]
    general = perplexity(model, data["general"])[0]
    eval_s = time.perf_counter() - t_eval
    tokens = sum(r.tokens for r in records)
    result = {
        "method": method.name,
        "label": method.label,
        "kind": method.kind,
        "lr": method.lr,
        "seed": seed,
        "domain_ppl": domain,
        "general_ppl": general,
        "trainable_params": built.trainable_params if method.trains else 0,
        "train_seconds": train_s,
        "tokens_per_s": tokens / train_s if train_s else None,
        "step_seconds_median": statistics.median(r.seconds for r in records) if records else None,
        "build_seconds": build_s,
        "eval_seconds": eval_s,
        "peak_rss_mb": M.rss_bytes(peak=True) / 2**20,
        "rss_before_mb": rss0 / 2**20,
        "final_loss": records[-1].loss if records else None,
        "final_ce": records[-1].ce if records else None,
        "curve": curve,
        "esft_experts": {str(k): v for k, v in built.experts.items()} or None,
        "heldout_tokens": {"domain": data["domain"].numel(), "general": data["general"].numel()},
        "method_config": asdict(method),
    }
    return result


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(results: list[dict]) -> list[dict]:
    """Mean and standard deviation per (method, lr) over seeds, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    rows = []
    for (name, lr), rs in groups.items():

        def ms(key, rs=rs):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if not vals:
                return None, None
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        row = {"method": name, "label": rs[0]["label"], "kind": rs[0]["kind"], "lr": lr, "seeds": len(rs),
               "kd_weight": _kd_weight(rs[0])}  # fmt: skip
        for key in ("domain_ppl", "general_ppl", "train_seconds", "tokens_per_s", "peak_rss_mb"):
            row[key], row[key + "_std"] = ms(key)
        row["trainable_params"] = rs[0]["trainable_params"]
        steps = sorted({s for r in rs for s, _ in r["curve"]})
        row["curve"] = [
            (s, statistics.fmean([p for r in rs for s2, p in r["curve"] if s2 == s])) for s in steps
        ]
        rows.append(row)
    return rows


def _kd_weight(run: dict) -> float:
    return run.get("method_config", {}).get("kd_weight", 0.0)


def _mean_std(values: Iterable[float]) -> tuple[float, float, int] | None:
    """(mean, std, n) of ``values`` (std 0 for one value); None for none."""
    vals = list(values)
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def score(row: dict) -> float:
    """Mean of held-out domain and general NLL (nats): specialisation and retention weighted equally."""
    return (math.log(row["domain_ppl"]) + math.log(row["general_ppl"])) / 2


def best_lrs(rows: list[dict]) -> dict[str, float]:
    """Per method, the learning rate with the lowest :func:`score` (the sweep's choice)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["kind"] != "base" and (r["method"] not in best or score(r) < score(best[r["method"]])):
            best[r["method"]] = r
    return {name: r["lr"] for name, r in best.items()}


def lr_brackets(rows: list[dict]) -> dict[str, dict]:
    """Per method run at two or more learning rates: its grid, its best learning rate (by
    :func:`score`, over the seeds' mean) and whether that is bracketed, i.e. at neither end of
    the grid (an optimum at an end may lie beyond it)."""
    best = best_lrs(rows)
    grids: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] != "base":
            grids.setdefault(r["method"], []).append(r["lr"])
    return {
        name: {"lrs": sorted(lrs), "best": best[name], "bracketed": min(lrs) < best[name] < max(lrs)}
        for name, lrs in grids.items()
        if len(lrs) > 1
    }


def unbracketed_warning(brackets: dict[str, dict]) -> str | None:
    """One line naming the methods whose best learning rate is at an end of their grid."""
    edge = [f"{n} ({b['best']:g} of {b['lrs'][0]:g}..{b['lrs'][-1]:g})" for n, b in brackets.items()
            if not b["bracketed"]]  # fmt: skip
    if not edge:
        return None
    return (
        f"WARNING: best learning rate at an end of its grid (not bracketed; extend --lrs): {', '.join(edge)}"
    )


def frontier_at(points: Iterable[tuple[float, float, float]], x: float) -> float | None:
    """A method's log domain perplexity at log general perplexity ``x``, along its frontier.

    ``points``: (lr, log general ppl, log domain ppl) of one seed's runs. The frontier is the
    path through them in learning-rate order (what the learning rates in between would
    trace), interpolated linearly in log-log space on each segment whose ends bracket ``x``;
    where the path crosses ``x`` more than once (general perplexity not monotone in the
    learning rate), the lowest value: the method's best at that forgetting. None when ``x``
    lies outside the points' range: the frontier is never extrapolated.
    """
    pts = sorted(points)
    values = [y for _, px, y in pts if px == x]
    for (_, x0, y0), (_, x1, y1) in zip(pts, pts[1:]):
        if min(x0, x1) < x < max(x0, x1):
            values.append(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return min(values) if values else None


def matched_forgetting(results: list[dict], ref: str, ref_lr: float) -> dict[str, dict]:
    """Every method against ``ref`` at ``ref_lr`` at matched forgetting, seed by seed.

    Why: a method that forgets more also specialises more, so comparing single runs (or a
    mean of the two NLLs) mixes the two. Per seed, the method's domain NLL is read off its
    learning-rate frontier (:func:`frontier_at`) at the reference run's general NLL (same
    seed: same batches), minus the reference's domain NLL: negative nats = more
    specialisation for the same forgetting. Per method: ``delta_nats`` and ``domain_ppl``
    (the interpolated perplexity) as (mean, std, n) over the seeds where the reference's
    general perplexity lies on the method's frontier, ``per_seed`` differences, and
    ``outside``: seed -> which side the reference lies on where it does not (not
    extrapolated). Runs of seeds without a reference run are left out.
    """
    refs = {r["seed"]: r for r in results if r["method"] == ref and r["lr"] == ref_lr}
    runs: dict[str, dict[int, list[dict]]] = {}
    for r in results:
        if r["kind"] != "base" and r["seed"] in refs:
            runs.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    out = {}
    for name, by_seed in runs.items():
        deltas, ppls, outside = {}, {}, {}
        for seed, rs in sorted(by_seed.items()):
            x = math.log(refs[seed]["general_ppl"])
            pts = [(r["lr"], math.log(r["general_ppl"]), math.log(r["domain_ppl"])) for r in rs]
            y = frontier_at(pts, x)
            if y is None:
                more = x < min(p[1] for p in pts)
                outside[seed] = "forgets more at every lr" if more else "forgets less at every lr"
            else:
                deltas[seed] = y - math.log(refs[seed]["domain_ppl"])
                ppls[seed] = math.exp(y)
        out[name] = {
            "kind": next(iter(by_seed.values()))[0]["kind"],
            "kd_weight": _kd_weight(next(iter(by_seed.values()))[0]),
            "lrs": sorted({r["lr"] for rs in by_seed.values() for r in rs}),
            "seeds": sorted(by_seed),
            "delta_nats": _mean_std(deltas.values()),
            "domain_ppl": _mean_std(ppls.values()),
            "per_seed": deltas,
            "outside": outside,
        }
    return out


def reference(results: list[dict], fallback_lr: float) -> tuple[str, float]:
    """The matched-forgetting reference: the pipeline's default NEXUS (:data:`DEFAULT_METHOD` at
    :data:`DEFAULT_LR`) when it ran, else ``nexus`` at ``fallback_lr`` (the registry's x
    --lr-scale: the quick test, the variants' table)."""
    if any(r["method"] == DEFAULT_METHOD and r["lr"] == DEFAULT_LR for r in results):
        return DEFAULT_METHOD, DEFAULT_LR
    return "nexus", fallback_lr


def matched_table(matched: dict[str, dict], ref: str, ref_general: float | None) -> str:
    """Markdown table of :func:`matched_forgetting` for the methods with a frontier (2+ lrs)."""
    shown = {n: m for n, m in matched.items() if len(m["lrs"]) > 1}
    lines = [
        f"Matched forgetting: each method's domain perplexity interpolated (log-log, along its learning "
        f"rates) at the general perplexity of {ref}, seed by seed"
        + (f" (mean {ref_general:.2f})" if ref_general is not None else "")
        + "; Δ: paired difference in domain NLL (nats; negative: more specialisation for the same forgetting).",
        "",
    ]
    if not shown:
        return "\n".join([*lines, "No method ran at two or more learning rates (run --grid or --lrs)."])
    head = ["method", "KD", "learning rates", "seeds on the frontier", "domain ppl", f"Δ domain NLL vs {ref}",
            "outside the frontier"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|---|---:|---|---:|---:|---:|---|"]
    for name, m in shown.items():
        d, p = m["delta_nats"], m["domain_ppl"]
        outside = "; ".join(f"outside, seed {s}: {side}" for s, side in m["outside"].items()) or "-"
        cells = [
            name,
            f"{m['kd_weight']:g}" if m["kd_weight"] else "-",
            " ".join(f"{lr:g}" for lr in m["lrs"]),
            f"{d[2] if d else 0}/{len(m['seeds'])}",
            _fmt(p[0], p[1], 2) if p else "outside",
            (f"{d[0]:+.3f} ± {d[1]:.3f}" if d[2] > 1 else f"{d[0]:+.3f}") if d else "outside",
            outside,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    single = [n for n, m in matched.items() if len(m["lrs"]) == 1]
    if single:
        lines += ["", f"Run at one learning rate (no frontier, not in this table): {', '.join(single)}."]
    return "\n".join(lines)


def across_table(summaries: dict[str, dict]) -> str:
    """Markdown: per method (rows) and domain (columns), the matched-forgetting Δ domain NLL
    against each domain's reference (mean ± std over the seeds on the frontier, and how many),
    from the domains' ``summary.json``. "outside": the reference's forgetting lies outside the
    method's frontier in every seed; "-": not run on that domain."""
    methods: list[str] = []
    for summary in summaries.values():
        methods += [
            n for n, m in summary["matched_forgetting"].items() if len(m["lrs"]) > 1 and n not in methods
        ]
    refs = "; ".join(
        f"{domain}: {s['reference']['method']}@{s['reference']['lr']:g}" for domain, s in summaries.items()
    )
    lines = [
        f"Δ domain NLL at the reference's forgetting (nats, paired per seed; reference {refs}):",
        "",
        "| method | KD | " + " | ".join(summaries) + " |",
        "|---|---:|" + "---:|" * len(summaries),
    ]
    for name in methods:
        cells, kd = [], None
        for summary in summaries.values():
            m = summary["matched_forgetting"].get(name)
            if m is None or len(m["lrs"]) < 2:
                cells.append("-")
                continue
            kd = m["kd_weight"]
            d, seeds = m["delta_nats"], len(m["seeds"])
            if d is None:
                cells.append(f"outside (0/{seeds})")
            else:
                spread = f" ± {d[1]:.3f}" if d[2] > 1 else ""
                cells.append(f"{d[0]:+.3f}{spread} ({d[2]}/{seeds})")
        lines.append(f"| {name} | {f'{kd:g}' if kd else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(results: list[dict], ref: str = "nexus", ref_lr: float | None = None) -> dict:
    """Per (method, lr): mean and std over seeds of (its score - ``ref``'s score at the same seed).

    Runs with the same seed saw the same batches in the same order, so the paired difference
    removes the data-order noise that both share.
    """
    ref_lr = ref_lr if ref_lr is not None else _ref_lr(results, ref)
    ref_by_seed = {r["seed"]: score(r) for r in results if r["method"] == ref and r["lr"] == ref_lr}
    diffs: dict[tuple, list[float]] = {}
    for r in results:
        if r["kind"] != "base" and r["seed"] in ref_by_seed:
            diffs.setdefault((r["method"], r["lr"]), []).append(score(r) - ref_by_seed[r["seed"]])
    return {k: _mean_std(v) for k, v in diffs.items()}


def _ref_lr(results: list[dict], ref: str) -> float | None:
    lrs = [r["lr"] for r in results if r["method"] == ref]
    return max(set(lrs), key=lrs.count) if lrs else None


def pareto(rows: list[dict]) -> set[str]:
    """Methods no other method beats on both domain and general perplexity."""
    front = set()
    for r in rows:
        dominated = any(
            o["domain_ppl"] <= r["domain_ppl"]
            and o["general_ppl"] <= r["general_ppl"]
            and (o["domain_ppl"], o["general_ppl"]) != (r["domain_ppl"], r["general_ppl"])
            for o in rows
        )
        if not dominated:
            front.add(f"{r['method']}@{r['lr']:g}")
    return front


def _fmt(mean, std, digits=1):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def table(rows: list[dict], pairs: dict[str, dict] | None = None) -> str:
    """Markdown table; ``pairs``: column title -> :func:`paired` result (paired score differences)."""
    base = next((r for r in rows if r["kind"] == "base"), None)
    front = pareto(rows)
    pairs = pairs or {}
    head = ["method", "lr", "seeds", "domain ppl", "general ppl", "Δ domain", "Δ general", "mean NLL", *pairs,
            "trainable params", "train s", "tokens/s", "peak RSS MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        if base is not None:
            dd = f"{100 * (r['domain_ppl'] / base['domain_ppl'] - 1):+.1f}%"
            dg = f"{100 * (r['general_ppl'] / base['general_ppl'] - 1):+.1f}%"
        else:
            dd = dg = "-"
        star = " *" if f"{r['method']}@{r['lr']:g}" in front else ""
        cells = [
            f"{r['method']}{star}",
            "-" if r["kind"] == "base" else format(r["lr"], "g"),
            str(r["seeds"]),
            _fmt(r["domain_ppl"], r["domain_ppl_std"], 2),
            _fmt(r["general_ppl"], r["general_ppl_std"], 2),
            dd,
            dg,
            f"{score(r):.3f}",
            *[_pair(p.get((r["method"], r["lr"]))) for p in pairs.values()],
            f"{r['trainable_params']:,}",
            _fmt(r["train_seconds"], r["train_seconds_std"], 0),
            _fmt(r["tokens_per_s"], None, 0),
            _fmt(r["peak_rss_mb"], None, 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "`*`: on the Pareto front (no other row has both lower domain and lower general perplexity)."
    )
    return "\n".join(lines)


def _frontiers(ax, rows: list[dict], *, marker: str = "", annotate: bool = False) -> None:
    """One line per method run at two or more learning rates, through its (mean) points in
    learning-rate order: its frontier. Colour: the method's kind (darker for each further method
    of the same kind and KD); solid: distilled (KD), dashed: not."""
    from matplotlib.colors import to_rgb

    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] != "base":
            by_method.setdefault(r["method"], []).append(r)
    seen: dict[tuple, int] = {}
    for name, rs in by_method.items():
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["lr"])
        kind, kd = rs[0]["kind"], bool(rs[0]["kd_weight"])
        shade = 0.6 ** seen.setdefault((kind, kd), 0)
        seen[kind, kd] += 1
        color = tuple(c * shade for c in to_rgb(COLORS[kind]))
        ax.plot([r["general_ppl"] for r in rs], [r["domain_ppl"] for r in rs], marker + ("-" if kd else "--"),
                color=color, alpha=1.0 if kind == "nexus" else 0.8, lw=1.2, label=name)  # fmt: skip
        for r in rs if annotate else ():
            ax.annotate(f"{r['lr']:g}", (r["general_ppl"], r["domain_ppl"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=color)  # fmt: skip


def sweep_plot(rows: list[dict], out: Path, title: str, tag: str = "") -> Path:
    """Domain vs general perplexity of each method across its learning rates (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 6))
    for r in rows:
        if r["kind"] == "base":
            ax.plot(r["general_ppl"], r["domain_ppl"], "ks", ms=8, label="base")
    _frontiers(ax, rows, marker="o", annotate=True)
    ax.set_xlabel("held-out general perplexity (lower = less forgetting)")
    ax.set_ylabel("held-out domain perplexity (lower = better specialised)")
    ax.set_title(f"Learning-rate sweep (labels: peak lr), seed 0\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / f"quality_sweep{tag}.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def _pair(p) -> str:
    if p is None:
        return "-"
    mean, std, n = p
    return f"{mean:+.3f} ± {std:.3f}" if n > 1 else f"{mean:+.3f}"


COLORS = {"base": "black", "nexus": "tab:blue", "lora": "tab:orange", "esft": "tab:green", "full": "tab:red"}


#: NEXUS rows shown (and labelled) next to the baselines; the other variants get the zoomed panel
HIGHLIGHT = ("nexus", "nexus-kd1")
MARKERS = {"base": "s", "nexus": "o", "lora": "^", "esft": "D", "full": "v"}


def _point(ax, r, label: bool, color=None) -> None:
    ax.errorbar(r["general_ppl"], r["domain_ppl"], xerr=r["general_ppl_std"] or 0, yerr=r["domain_ppl_std"] or 0,
                fmt=MARKERS[r["kind"]], color=color or COLORS[r["kind"]], ms=7 if r["method"] == "nexus" else 5,
                capsize=2)  # fmt: skip
    if label:
        text = r["method"] + (f" ({r['lr']:g})" if r["kind"] != "base" else "")
        ax.annotate(text, (r["general_ppl"], r["domain_ppl"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)  # fmt: skip


#: a run whose general perplexity exceeds this multiple of the base's has diverged: the
#: frontier plots keep their axes on the others (the tables list every run)
DIVERGED = 1.5


def _clip(ax, rows: list[dict], limit: float) -> None:
    """Axes limits around the runs with general perplexity under ``limit``, and a note of how
    many lie beyond (so that one diverged learning rate does not squash every frontier)."""
    kept = [r for r in rows if r["general_ppl"] <= limit]
    if len(kept) in (0, len(rows)):
        return
    for lo, hi, set_lim in (
        (min(r["general_ppl"] for r in kept), max(r["general_ppl"] for r in kept), ax.set_xlim),
        (min(r["domain_ppl"] for r in kept), max(r["domain_ppl"] for r in kept), ax.set_ylim),
    ):
        pad = 0.08 * (hi - lo) or 1.0
        set_lim(lo - pad, hi + pad)
    ax.text(0.01, 0.01, f"{len(rows) - len(kept)} run(s) with general perplexity over {limit:.0f} (diverged) "
            "beyond the axes", transform=ax.transAxes, fontsize=7, color="gray")  # fmt: skip


def plots(
    rows: list[dict], out: Path, title: str, ref_general: float | None = None, tag: str = ""
) -> list[Path]:
    """``quality_pareto<tag>.png`` (all methods, each method's learning-rate frontier as a line,
    the matched-forgetting reference's general perplexity ``ref_general`` as a dotted line; NEXUS
    variants zoomed) and ``quality_curves<tag>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    variants = [r for r in rows if r["kind"] == "nexus"]
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1.15, 1]})
    for r in rows:  # left: every method; NEXUS variants unlabelled except the highlighted ones
        _point(ax, r, label=r["kind"] != "nexus" or r["method"] in HIGHLIGHT)
    _frontiers(ax, rows)
    if ref_general is not None:
        ax.axvline(ref_general, ls=":", color="gray", lw=1, label="matched forgetting")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(variants):  # right: the NEXUS variants, each its own colour
        _point(zoom, r, label=True, color=cmap(i % 20))
    base = next((r for r in rows if r["kind"] == "base"), None)
    for a, group in ((ax, rows), (zoom, variants)):
        a.set_xlabel("held-out general perplexity (lower = less forgetting)")
        a.set_ylabel("held-out domain perplexity (lower = better specialised)")
        a.grid(alpha=0.3)
        if base is not None:
            _clip(a, group, DIVERGED * base["general_ppl"])
    ax.set_title(f"Specialisation vs forgetting, mean ± std over seeds\n{title}", fontsize=9)
    zoom.set_title("NEXUS variants (zoom)", fontsize=9)
    fig.tight_layout()
    p = out / f"quality_pareto{tag}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    others = [r for r in rows if r["kind"] not in ("base", "nexus") or r["method"] in HIGHLIGHT]
    for a, group in ((ax, others), (zoom, variants)):
        for i, r in enumerate(g for g in group if len(g["curve"]) > 1):
            s, v = zip(*r["curve"])
            style = "-" if r["kind"] == "nexus" else "--"
            color = cmap(i % 20) if a is zoom else COLORS[r["kind"]]
            if a is ax and r["kind"] in ("lora", "esft") and r["method"] not in ("lora-r11", "esft-token"):
                style = ":"
            if a is ax and r["method"] == "nexus-kd1":
                color = "navy"
            a.plot(s, v, style, color=color, lw=2.2 if r["method"] in HIGHLIGHT else 1.2,
                   label=f"{r['method']} ({r['lr']:g})")  # fmt: skip
        a.set_yscale("log")
        a.set_xlabel("optimizer step")
        a.legend(fontsize=7, ncol=2)
        a.grid(alpha=0.3, which="both")
    ax.set_ylabel("domain perplexity (held-out subset)")
    ax.set_title(f"Domain perplexity during training, mean over seeds\n{title}", fontsize=9)
    zoom.set_title("NEXUS variants", fontsize=9)
    fig.tight_layout()
    p = out / f"quality_curves{tag}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def load_data(args, corpus_dir: Path, model_dir: Path, seq_len: int) -> dict:
    """The domain's training blocks and the two held-out sets (the first ``--eval-tokens`` of
    each), with their token counts printed; a held-out split smaller than ``--eval-tokens`` is
    named (all of it is then used)."""
    t = time.perf_counter()

    def read(split: str, limit: int | None = None):
        return packed_blocks([M.split_path(corpus_dir, split)], model_dir, seq_len, limit)

    data = {
        "train": read("domain"),
        "domain": read("domain_heldout", args.eval_tokens),
        "general": read("general_heldout", args.eval_tokens),
    }
    print(
        f"data ({args.domain}, {corpus_dir}): {len(data['train'])} training blocks "
        f"({data['train'].numel():,} tokens), held-out {data['domain'].numel():,} domain / "
        f"{data['general'].numel():,} general tokens at seq {seq_len} ({time.perf_counter() - t:.0f}s)",
        flush=True,
    )
    for split in ("domain", "general"):
        if data[split].numel() < args.eval_tokens // seq_len * seq_len:
            print(
                f"note: {split}_heldout has only {data[split].numel():,} tokens at seq {seq_len}, fewer than "
                f"--eval-tokens {args.eval_tokens:,}: all of it is used",
                flush=True,
            )
    return data


def train_runs(args, todo: list[tuple[int, M.Method, int]], n_runs: int, done: dict, settings: dict, code: str,
               corpus_dir: Path, model_dir: Path) -> None:  # fmt: skip
    """Train and record (in ``done`` and the results file) the runs ``todo`` (plan index, method,
    seed) of this ``--shard``."""
    import torch

    results_path = args.out / ("sweep.jsonl" if args.sweep_lr else "results.jsonl")
    k, n = (int(x) for x in args.shard.split("/"))
    todo = [(i, m, s) for i, m, s in todo if i % n == k]
    if not todo:
        return
    torch.set_num_threads(args.threads)
    hashed = code_hash()
    M.start_ray()
    seq_len = settings["seq_len"]
    data = load_data(args, corpus_dir, model_dir, seq_len)
    tk = M.teacher_k(m for _, m, _ in todo)
    if tk:  # offline KD: the teacher's top-k of the training blocks the runs read, scored once
        used = M.blocks_read(len(data["train"]), args.batch_size, args.steps, args.seeds)
        path = args.work / "teacher" / f"{model_dir.name}-seq{seq_len}-top{tk}.safetensors"
        data["teacher"] = M.TeacherTable.make(model_dir, data["train"][used], tk, path)
    inits = M.NexusInits(
        str(model_dir),
        [M.split_path(corpus_dir, "domain")],
        args.work / "inits" / model_dir.name,
        sample_tokens=None if args.quick else 100_000,  # quick: collect from the corpus directly
        collect_tokens=20_000 if args.quick else 100_000,
        seq_len=seq_len,
    )
    for i, method, seed in todo:
        t = time.perf_counter()
        r = esft_twin(method, seed, settings, code, done, inits) or run_one(
            method, seed, data, settings, inits, model_dir
        )
        r.update(key=run_key(method, seed, settings, code), key_any=run_key(method, seed, settings),
                 code_version=code, code_hash=hashed, settings=settings)  # fmt: skip
        done[r["key_any"] if args.any_version else r["key"]] = r
        with results_path.open("a") as fh:  # locked: several processes may share --out
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(json.dumps(r) + "\n")
        print(
            f"[{i + 1}/{n_runs}] {method.name:16s} lr={method.lr:<7g} seed={seed} "
            f"domain={r['domain_ppl']:.2f} general={r['general_ppl']:.2f} "
            f"params={r['trainable_params']:,} train={r['train_seconds']:.0f}s "
            f"({time.perf_counter() - t:.0f}s)",
            flush=True,
        )
    if inits.seconds:
        print(f"NEXUS init stages: {inits.seconds}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.across:
        summaries = {}
        for item in args.across:
            domain, _, size = item.partition("@")
            path = results_dir(domain, size or args.size) / "summary.json"
            if not path.is_file():
                raise SystemExit(f"--across: no {path}; run --report-only --domain {domain} first")
            summaries[item] = json.loads(path.read_text())
        md = across_table(summaries)
        (results_dir(DEFAULT_DOMAIN, args.size) / "across.md").write_text(md + "\n")
        print(md)
        return 0
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    corpus_dir, model_dir = M.demo_inputs(args)
    corpus_dir = ensure_domain(args.domain, corpus_dir)
    seq_len = M.default_seq_len(model_dir, args.seq_len)
    settings = {
        "model": str(model_dir),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": seq_len,
        "warmup": args.warmup,
        "eval_tokens": args.eval_tokens,
        "curve_every": args.curve_every,
        "curve_tokens": args.curve_tokens,
    }
    if args.domain != DEFAULT_DOMAIN:  # (absent for docstrings: the runs recorded before keep their keys)
        settings["domain"] = corpus_dir.name  # the domain's name and content hash
    code = HARNESS_VERSION
    runs = plan(args)
    # runs of the sweep and of the main table share keys: a seed-0 run at the chosen lr is reused
    recorded = [r for f in ("sweep.jsonl", "results.jsonl") for r in load_results(args.out / f)]
    done = index_runs(recorded, args.any_version)
    lookup = [run_key(m, s, settings, None if args.any_version else code) for m, s in runs]
    t_all = time.perf_counter()
    if not args.report_only:
        todo = [(i, m, s) for i, ((m, s), key) in enumerate(zip(runs, lookup)) if key not in done]
        train_runs(args, todo, len(runs), done, settings, code, corpus_dir, model_dir)
    results = [done[key] for key in lookup if key in done]
    any_version = index_runs(recorded, any_version=True)
    stale = sum(
        key not in done and run_key(m, s, settings) in any_version for (m, s), key in zip(runs, lookup)
    )
    if stale:
        print(
            f"{stale} planned runs exist only from other code versions: not reported (--any-version reports them)"
        )
    report(args, results, settings, code, t_all)
    return 0


def report(args, results: list[dict], settings: dict, code: str, t_all: float) -> None:
    """Tables (markdown, ``summary.json``/``sweep.json``) and plots of ``results``."""
    rows = summarise(results)
    nexus_lr = scaled(M.get_method("nexus").lr, args.lr_scale)  # the variants' reference
    pairs = None  # the sweep has one seed: nothing to pair
    if not args.sweep_lr:
        pairs = {f"vs nexus@{nexus_lr:g} (paired)": paired(results, "nexus", nexus_lr)}
    ref_method, ref_lr = reference(results, nexus_lr)
    if pairs is not None and ref_method != "nexus":
        pairs[f"vs {ref_method}@{ref_lr:g} (paired)"] = paired(results, ref_method, ref_lr)
    ref = f"{ref_method}@{ref_lr:g}"
    matched = matched_forgetting(results, ref_method, ref_lr)
    ref_runs = [r["general_ppl"] for r in results if r["method"] == ref_method and r["lr"] == ref_lr]
    ref_general = statistics.fmean(ref_runs) if ref_runs else None
    brackets = lr_brackets(rows)
    md = table(rows, pairs)
    matched_md = matched_table(matched, ref, ref_general)
    seeds = args.seeds if not args.sweep_lr else args.seeds[:1]
    title = (
        f"{Path(settings['model']).name}, domain {args.domain}: {settings['steps']} steps x batch "
        f"{settings['batch_size']} x seq {settings['seq_len']}, seeds {seeds}"
    )
    stem = "sweep" if args.sweep_lr else "summary"
    summary = {
        "settings": settings,
        "domain": args.domain,
        "code_version": code,
        "result_code_hashes": sorted({str(r.get("code_hash", r.get("code_version"))) for r in results}),
        "any_version": args.any_version,
        "result_code_versions": sorted({str(r.get("code_version")) for r in results}),
        "seeds": args.seeds,
        "rows": rows,
        "table_markdown": md,
        "reference": {"method": ref_method, "lr": ref_lr, "general_ppl_mean": ref_general},
        "matched_forgetting": matched,
        "matched_markdown": matched_md,
        "lr_brackets": brackets,
        "heldout_tokens": results[-1].get("heldout_tokens") if results else None,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "seconds": time.perf_counter() - t_all,
    }
    if args.sweep_lr:
        summary["best_lrs"] = best_lrs(rows)
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    (args.out / f"{stem}.md").write_text(md + "\n\n" + matched_md + "\n")
    print(md + "\n\n" + matched_md)
    for name, b in brackets.items():
        where = "bracketed" if b["bracketed"] else "NOT bracketed"
        print(
            f"learning rate: {name} best {b['best']:g} of {' '.join(f'{lr:g}' for lr in b['lrs'])} ({where})"
        )
    warning = unbracketed_warning(brackets)
    if warning:
        print(warning)
    if args.sweep_lr:
        print(f"best learning rate per method (lowest mean NLL): {summary['best_lrs']}")
    plot_dir = Path(args.docs) if args.docs else args.out
    plot_dir.mkdir(parents=True, exist_ok=True)
    # --docs: one set of plots per domain and demo size (--out is per domain and size already)
    tag = "" if args.domain == DEFAULT_DOMAIN else f"_{args.domain}"
    tag += f"_{args.size}" if args.docs and args.size != "small" else ""
    if rows:
        if args.sweep_lr:
            sweep_plot(rows, plot_dir, title, tag)
        else:
            plots(rows, plot_dir, title, ref_general, tag)


def quick_check(summary_rows: list[dict]) -> list[str]:
    """Methods whose domain perplexity did not fall below the base's (the smoke test's check)."""
    base = next(r for r in summary_rows if r["kind"] == "base")
    return [
        r["method"] for r in summary_rows if r["kind"] != "base" and not r["domain_ppl"] < base["domain_ppl"]
    ]


if __name__ == "__main__":
    sys.exit(main())
