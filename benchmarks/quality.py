"""Specialisation quality: NEXUS against LoRA, ESFT, full fine-tuning and the untrained base.

Every method (``benchmarks/methods.py``) specialises the demo base to the demo corpus's
``domain`` split with the same data, sequence length, batch size, number of steps, warmup
and schedule, in this one process (no Ray Train per run; the loss, optimiser and schedule
code is ``nexus train``'s). For each run it records held-out domain perplexity (the goal),
held-out general perplexity (forgetting), trainable parameters, training wall time, peak
resident memory and a domain-perplexity curve; over seeds it reports mean and standard
deviation. The seed permutes the order of the training blocks (the same permutation for
every method) and seeds every random initialisation.

Methods are compared by their domain and general perplexity and by the "mean NLL" (the
average of the two held-out NLLs: specialisation and retention weighted equally), as
paired differences against a reference run with the same seed (same batches).

Runs are appended to ``<out>/results.jsonl`` (``sweep.jsonl``) as they finish; a rerun with
the same settings skips the runs already there, so an interrupted benchmark resumes, and
``--shard K/N`` splits the runs over N processes sharing ``--out``.

    python benchmarks/quality.py --sweep-lr         # 1. learning rate per method family (seed 0)
    python benchmarks/quality.py                    # 2. every method and variant, seeds 0 1 2
    python benchmarks/quality.py --report-only --docs docs/img   # tables and plots again
    python benchmarks/quality.py --quick            # smoke test: tiny demo, 1 seed, 80 steps
    python benchmarks/quality.py --methods nexus nexus-topk2 nexus@0.001 --seeds 0 1 2
    python benchmarks/quality.py --methods nexus nexus-offline-k8 nexus-offline-k32 nexus-offline-k128
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
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods as M  # noqa: E402

from nexus.stages.evaluate import packed_blocks, perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: the full run: the pipeline's default NEXUS (lr 1e-3) and the baselines, then the NEXUS
#: variants at NEXUS_LR (inits, gates, router, KD weight, top-k of the pca init: the demo has
#: 8 experts per layer), then the KD weight at the default lr
DEFAULT_METHODS = [
    "base", "nexus@0.001", "lora-r11", "lora-r2", "esft-token", "esft-gate", "full-ft",
    "nexus", "nexus-frequency", "nexus-zero", "nexus-random", "nexus-sigmoid", "nexus-router",
    "nexus-kd0", "nexus-kd1", "nexus-kd2", "nexus-topk1", "nexus-topk2", "nexus-topk8", "nexus-kd1@0.001",
    "nexus-offline-k8", "nexus-offline-k32", "nexus-offline-k128",
]  # fmt: skip
assert set(M.METHODS) <= set(DEFAULT_METHODS)
#: the pipeline's default learning rate (nexus.stages.train.config.TrainConfig.lr)
DEFAULT_LR = 1e-3
#: learning rates tried by --sweep-lr per method, in run order: the likely optima first, then the
#: edges (so a sweep cut short still brackets each method's best value)
SWEEP = [
    ("nexus", 3e-3), ("nexus", 1e-2), ("lora-r11", 1e-3), ("lora-r11", 3e-3),
    ("esft-token", 1e-3), ("esft-token", 3e-3), ("full-ft", 1e-4), ("full-ft", 3e-4),
    ("nexus", 3e-2), ("lora-r11", 1e-2), ("esft-token", 1e-2), ("full-ft", 1e-3),
    ("nexus", 1e-3), ("lora-r11", 3e-4), ("esft-token", 3e-4), ("full-ft", 3e-5),
]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny demo, one seed, a few steps")
    p.add_argument("--size", default=None, help="demo size (default: small; tiny with --quick)")
    p.add_argument("--model", default=None, help="base model directory (default: the demo base)")
    p.add_argument("--corpus-dir", default=None, help="corpus with domain/domain_heldout/general_heldout")
    p.add_argument(
        "--methods", nargs="+", default=None, help=f"methods (default: all: {' '.join(DEFAULT_METHODS)})"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; 0 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 100)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: 256, capped at the model's positions")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of the steps)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per split (default 16384)")
    p.add_argument("--curve-every", type=int, default=None, help="steps between curve points (default 20)")
    p.add_argument(
        "--curve-tokens", type=int, default=None, help="domain tokens per curve point (default 2048)"
    )
    p.add_argument(
        "--lr", nargs="*", default=[], metavar="METHOD=LR", help="override a method's learning rate"
    )
    p.add_argument(
        "--lr-scale", type=float, default=None, help="multiply every lr (default 1; 3 with --quick)"
    )
    p.add_argument("--sweep-lr", action="store_true", help="run the learning-rate sweep (seed 0) instead")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed for every run)")
    p.add_argument("--shard", default="0/1", help="K/N: run only every N-th planned run from the K-th")
    p.add_argument(
        "--out",
        default=None,
        help="results directory (default: benchmarks/results/quality; runs/quality-tiny-quick with --quick)",
    )
    p.add_argument("--work", default=None,
                   help="NEXUS initial adapters and statistics (default: runs/quality-<size>)")  # fmt: skip
    p.add_argument("--docs", default=None, help="write the plots here (e.g. docs/img) instead of --out")
    p.add_argument("--report-only", action="store_true", help="only aggregate the results already in --out")
    args = p.parse_args(argv)
    quick = args.quick
    args.size = args.size or ("tiny" if quick else "small")
    args.seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    args.steps = args.steps or (80 if quick else 100)
    args.lr_scale = args.lr_scale or (3.0 if quick else 1.0)
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    args.eval_tokens = args.eval_tokens or (2048 if quick else 16384)
    args.curve_every = args.curve_every or (6 if quick else 20)
    args.curve_tokens = args.curve_tokens or (512 if quick else 2048)
    args.methods = args.methods or (list(M.METHODS) if quick else DEFAULT_METHODS)
    name = f"quality-{args.size}{'-quick' if quick else ''}"
    args.out = Path(
        args.out or (ROOT / "runs" / name if quick else ROOT / "benchmarks" / "results" / "quality")
    )
    args.work = Path(args.work or (args.out if quick else ROOT / "runs" / name))
    return args


def plan(args) -> list[tuple[M.Method, int]]:
    """(method, seed) runs in order: seeds outermost, so a partial run covers every method."""
    lrs = dict(item.split("=", 1) for item in args.lr)
    if args.sweep_lr:
        base = [(M.get_method("base"), args.seeds[0])]
        return base + [(M.get_method(name).with_(lr=lr), args.seeds[0]) for name, lr in SWEEP]
    methods = []
    for n in args.methods:  # NAME@LR: that lr exactly; otherwise --lr, or the registry's x --lr-scale
        m = M.get_method(n)
        if "@" not in n:
            m = m.with_(lr=float(lrs[m.name]) if m.name in lrs else m.lr * args.lr_scale)
        methods.append(m)
    runs = []
    for seed in args.seeds:
        for m in methods:
            if m.kind == "base" and seed != args.seeds[0]:
                continue  # deterministic: one evaluation is enough
            runs.append((m, seed))
    return runs


#: Method fields added after results were recorded: left out of the key at their defaults, so
#: the runs already in results.jsonl keep their keys
_LATER_FIELDS = {"kd": "online", "teacher_k": 0}


def run_key(method: M.Method, seed: int, settings: dict) -> str:
    fields = {k: v for k, v in asdict(method).items() if _LATER_FIELDS.get(k, object()) != v}
    blob = json.dumps({"method": fields, "seed": seed, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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

        row = {"method": name, "label": rs[0]["label"], "kind": rs[0]["kind"], "lr": lr, "seeds": len(rs)}
        for key in ("domain_ppl", "general_ppl", "train_seconds", "tokens_per_s", "peak_rss_mb"):
            row[key], row[key + "_std"] = ms(key)
        row["trainable_params"] = rs[0]["trainable_params"]
        steps = sorted({s for r in rs for s, _ in r["curve"]})
        row["curve"] = [
            (s, statistics.fmean([p for r in rs for s2, p in r["curve"] if s2 == s])) for s in steps
        ]
        rows.append(row)
    return rows


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
    return {
        k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in diffs.items()
    }


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


def sweep_plot(rows: list[dict], out: Path, title: str) -> Path:
    """Domain vs general perplexity of each method across its learning rates (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 6))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for name, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["lr"])
        kind = rs[0]["kind"]
        if kind == "base":
            ax.plot(rs[0]["general_ppl"], rs[0]["domain_ppl"], "ks", ms=8, label="base")
            continue
        ax.plot([r["general_ppl"] for r in rs], [r["domain_ppl"] for r in rs], "-o", color=COLORS[kind],
                alpha=1.0 if kind == "nexus" else 0.75, label=name)  # fmt: skip
        for r in rs:
            ax.annotate(f"{r['lr']:g}", (r["general_ppl"], r["domain_ppl"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=COLORS[kind])  # fmt: skip
    ax.set_xlabel("held-out general perplexity (lower = less forgetting)")
    ax.set_ylabel("held-out domain perplexity (lower = better specialised)")
    ax.set_title(f"Learning-rate sweep (labels: peak lr), seed 0\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "quality_sweep.png"
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


def plots(rows: list[dict], out: Path, title: str) -> list[Path]:
    """``quality_pareto.png`` (all methods; NEXUS variants zoomed) and ``quality_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    variants = [r for r in rows if r["kind"] == "nexus"]
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1.15, 1]})
    for r in rows:  # left: every method; NEXUS variants unlabelled except the highlighted ones
        _point(ax, r, label=r["kind"] != "nexus" or r["method"] in HIGHLIGHT)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(variants):  # right: the NEXUS variants, each its own colour
        _point(zoom, r, label=True, color=cmap(i % 20))
    for a in (ax, zoom):
        a.set_xlabel("held-out general perplexity (lower = less forgetting)")
        a.set_ylabel("held-out domain perplexity (lower = better specialised)")
        a.grid(alpha=0.3)
    ax.set_title(f"Specialisation vs forgetting, mean ± std over seeds\n{title}", fontsize=9)
    zoom.set_title("NEXUS variants (zoom)", fontsize=9)
    fig.tight_layout()
    p = out / "quality_pareto.png"
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
    p = out / "quality_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / ("sweep.jsonl" if args.sweep_lr else "results.jsonl")
    corpus_dir, model_dir = M.demo_inputs(args)
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
    runs = plan(args)
    k, n = (int(x) for x in args.shard.split("/"))
    mine = {i for i in range(len(runs)) if i % n == k}
    # runs of the sweep and of the main table share keys: a seed-0 run at the chosen lr is reused
    done = {r["key"]: r for f in ("sweep.jsonl", "results.jsonl") for r in load_results(args.out / f)}
    t_all = time.perf_counter()
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        M.start_ray()
        t = time.perf_counter()
        data = {
            "train": packed_blocks([M.split_path(corpus_dir, "domain")], model_dir, seq_len),
            "domain": packed_blocks(
                [M.split_path(corpus_dir, "domain_heldout")], model_dir, seq_len, args.eval_tokens
            ),
            "general": packed_blocks(
                [M.split_path(corpus_dir, "general_heldout")], model_dir, seq_len, args.eval_tokens
            ),
        }
        print(
            f"data: {len(data['train'])} training blocks, {data['domain'].numel()} domain / "
            f"{data['general'].numel()} general held-out tokens ({time.perf_counter() - t:.0f}s)",
            flush=True,
        )
        k = M.teacher_k(m for m, _ in runs)
        if k:  # offline KD: the teacher's top-k of the training blocks the runs read, scored once
            used = M.blocks_read(len(data["train"]), args.batch_size, args.steps, args.seeds)
            path = args.work / "teacher" / f"{model_dir.name}-seq{seq_len}-top{k}.safetensors"
            data["teacher"] = M.TeacherTable.make(model_dir, data["train"][used], k, path)
        inits = M.NexusInits(
            str(model_dir),
            [M.split_path(corpus_dir, "domain")],
            args.work / "inits" / model_dir.name,
            sample_tokens=None if args.quick else 100_000,  # quick: collect from the corpus directly
            collect_tokens=20_000 if args.quick else 100_000,
            seq_len=seq_len,
        )
        for i, (method, seed) in enumerate(runs):
            key = run_key(method, seed, settings)
            if key in done or i not in mine:
                continue
            t = time.perf_counter()
            r = run_one(method, seed, data, settings, inits, model_dir)
            r["key"] = key
            r["settings"] = settings
            done[key] = r
            with results_path.open("a") as fh:  # locked: several processes may share --out
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.write(json.dumps(r) + "\n")
            print(
                f"[{i + 1}/{len(runs)}] {method.name:16s} lr={method.lr:<7g} seed={seed} "
                f"domain={r['domain_ppl']:.2f} general={r['general_ppl']:.2f} "
                f"params={r['trainable_params']:,} train={r['train_seconds']:.0f}s "
                f"({time.perf_counter() - t:.0f}s)",
                flush=True,
            )
        if inits.seconds:
            print(f"NEXUS init stages: {inits.seconds}", flush=True)
    results = [done[run_key(m, s, settings)] for m, s in runs if run_key(m, s, settings) in done]
    rows = summarise(results)
    pairs = None  # the sweep has one seed: nothing to pair
    if not args.sweep_lr:
        ref_lr = M.get_method("nexus").lr * args.lr_scale  # the variants' reference
        pairs = {f"vs nexus@{ref_lr:g} (paired)": paired(results, "nexus", ref_lr)}
        if ref_lr != DEFAULT_LR and any(r["method"] == "nexus" and r["lr"] == DEFAULT_LR for r in results):
            pairs[f"vs nexus@{DEFAULT_LR:g} (paired)"] = paired(results, "nexus", DEFAULT_LR)
    md = table(rows, pairs)
    title = (
        f"{Path(settings['model']).name}: {settings['steps']} steps x batch {settings['batch_size']} x "
        f"seq {settings['seq_len']}, seeds {args.seeds if not args.sweep_lr else args.seeds[:1]}"
    )
    stem = "sweep" if args.sweep_lr else "summary"
    summary = {
        "settings": settings,
        "seeds": args.seeds,
        "rows": rows,
        "table_markdown": md,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "seconds": time.perf_counter() - t_all,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    (args.out / f"{stem}.md").write_text(md + "\n")
    print(md)
    if args.sweep_lr:
        summary["best_lrs"] = best_lrs(rows)
        (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
        print(f"best learning rate per method (lowest mean NLL): {summary['best_lrs']}")
    plot_dir = Path(args.docs) if args.docs else args.out
    plot_dir.mkdir(parents=True, exist_ok=True)
    if rows:
        (sweep_plot if args.sweep_lr else plots)(rows, plot_dir, title)
    return 0


def quick_check(summary_rows: list[dict]) -> list[str]:
    """Methods whose domain perplexity did not fall below the base's (the smoke test's check)."""
    base = next(r for r in summary_rows if r["kind"] == "base")
    return [
        r["method"] for r in summary_rows if r["kind"] != "base" and not r["domain_ppl"] < base["domain_ppl"]
    ]


if __name__ == "__main__":
    sys.exit(main())
