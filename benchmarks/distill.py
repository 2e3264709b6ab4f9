"""Offline distillation: training speed with online, offline and no KD, and what top-k costs in quality.

On the demo base (``nexus train``'s own step, :func:`nexus.stages.train.core.optimizer_step`):

- **teacher pass**: ``nexus distill``'s scorer (:class:`nexus.stages.distill.TeacherScorer`) over
  the training blocks once, at the largest k; smaller k are exact truncations of it (the top-k
  of a sorted top-K, the rest's log-sum-exp widened by the dropped entries). Tokens/s of one
  scorer with ``--threads`` threads, and the stored bytes per token for each k.
- **speed**: three models (kd online, offline at the default k, off) from the same start, their
  optimizer steps interleaved turn by turn (rotating the order) on the same batches, so load
  from other jobs hits all three alike; median tokens/s and the per-turn ratio to online KD.
- **quality**: for each seed, train from the same start on the same seeded batches with kd off,
  online, and offline at each k, then held-out NLL on the demo's domain and general splits
  (general NLL is what distillation protects). The report gives each offline k's largest
  difference from online KD over the seeds.
- **actors** (``--actors``): the ``distill`` stage itself on Ray with 1 and 2 actors (tokens/s
  after the first batch, from its manifest).

    python benchmarks/distill.py --quick        # tiny demo base, seconds
    python benchmarks/distill.py                # small demo base, k 8 32 128, 3 seeds

JSON: ``benchmarks/results/distill.json`` (``--json`` overrides).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods as M  # noqa: E402

from nexus.stages.distill import bytes_per_token  # noqa: E402
from nexus.stages.evaluate import packed_blocks  # noqa: E402
from nexus.stages.train import TrainConfig  # noqa: E402
from nexus.stages.train.core import Backbone, evaluate_sums, make_optimizer, optimizer_step, prepare_model  # noqa: E402
from nexus.stages.train.data import TeacherRows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny demo base, few steps")
    p.add_argument("--size", default=None, help="demo size (default small; tiny with --quick)")
    p.add_argument("--model", default=None)
    p.add_argument("--corpus-dir", default=None)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128], help="offline top-k values")
    p.add_argument("--default-k", type=int, default=32, help="the k of the speed comparison")
    p.add_argument("--seeds", type=int, default=None, help="quality seeds (default 3; 2 with --quick)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: 256, capped at the model's positions")
    p.add_argument("--speed-steps", type=int, default=None, help="timed turns (default 12; 6 with --quick)")
    p.add_argument("--quality-steps", type=int, default=None, help="steps per quality run (default 100)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per split (default 32k)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--actors", action="store_true", help="also run the distill stage with 1 and 2 actors")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.size = args.size or ("tiny" if args.quick else "small")
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.speed_steps = args.speed_steps or (6 if args.quick else 12)
    args.quality_steps = args.quality_steps or (30 if args.quick else 100)
    args.eval_tokens = args.eval_tokens or (8_000 if args.quick else 32_000)
    return args


def _cfg(model_dir, seq_len: int, args, kd: str, seed: int, steps: int) -> TrainConfig:
    return TrainConfig(model=str(model_dir), corpus=["-"], output="-", init="random", kd=kd, seed=seed,
                       max_steps=steps, warmup_steps=2, batch_size=args.batch_size, seq_len=seq_len)  # fmt: skip


class Run:
    """One training run: a model, its optimizer, and the batches (block indices) it reads."""

    def __init__(self, cfg: TrainConfig, blocks, rows: TeacherRows | None, seed: int) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg, self.blocks, self.rows = cfg, blocks, rows
        self.model = prepare_model(cfg, torch.device("cpu"))
        self.student = Backbone(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.trainable, cfg)
        index = torch.arange(len(blocks)).unsqueeze(1)
        self.order = (b.squeeze(1) for b in M.seeded_batches(index, cfg.batch_size, seed))

    def step(self) -> float:
        idx = next(self.order)
        teachers = (
            [TeacherRows(self.rows.ids[idx], self.rows.logp[idx], self.rows.rest[idx])] if self.rows else None
        )
        t0 = time.perf_counter()
        optimizer_step(self.model, self.student, [self.blocks[idx]], self.cfg, self.optimizer, self.scheduler,
                       self.trainable, teachers=teachers)  # fmt: skip
        return time.perf_counter() - t0


def speed(model_dir, seq_len, blocks, rows, args) -> dict:
    variants = {"off": None, "online": None, "offline": M.truncate(rows, args.default_k)}
    runs = {kd: Run(_cfg(model_dir, seq_len, args, kd, 0, args.speed_steps + 2), blocks, r, 0)
            for kd, r in variants.items()}  # fmt: skip
    names = list(runs)
    times = {n: [] for n in names}
    for turn in range(args.speed_steps + 2):  # 2 warm-up turns
        k = turn % len(names)
        for name in names[k:] + names[:k]:
            seconds = runs[name].step()
            if turn >= 2:
                times[name].append(seconds)
    tokens = args.batch_size * seq_len
    # on a shared machine the fastest turn is the least disturbed one: reported beside the median
    out = {
        n: {"tokens_per_s": tokens / statistics.median(t), "best_tokens_per_s": tokens / min(t), "step_s": t}
        for n, t in times.items()
    }
    for n in names:
        out[n]["vs_online"] = statistics.median(a / b for a, b in zip(times["online"], times[n]))
    return out


def quality(model_dir, seq_len, blocks, rows, held_out, args) -> list[dict]:
    results = []
    variants = [("off", None), ("online", None)] + [(f"offline k={k}", k) for k in args.ks]
    for seed in range(args.seeds):
        for name, k in variants:
            kd = "offline" if k else name
            run = Run(_cfg(model_dir, seq_len, args, kd, seed, args.quality_steps), blocks,
                      M.truncate(rows, k) if k else None, seed)  # fmt: skip
            for _ in range(args.quality_steps):
                run.step()
            nll = {}
            for split, data in held_out.items():
                total, n = evaluate_sums(run.model, (data[i : i + 8] for i in range(0, len(data), 8)))
                nll[split] = total / n
            results.append({"variant": name, "k": k, "seed": seed, **{f"nll_{s}": v for s, v in nll.items()}})
            print(
                f"  seed {seed} {name:<16} domain {nll['domain']:.4f}  general {nll['general']:.4f}",
                flush=True,
            )
    return results


def summarise(results: list[dict], ks: list[int]) -> list[dict]:
    rows = []
    online = {r["seed"]: r for r in results if r["variant"] == "online"}
    for name in ["off", "online"] + [f"offline k={k}" for k in ks]:
        rs = [r for r in results if r["variant"] == name]
        row = {"variant": name, "bytes_per_token": bytes_per_token(rs[0]["k"]) if rs[0]["k"] else None}
        for split in ("domain", "general"):
            row[f"nll_{split}"] = statistics.mean(r[f"nll_{split}"] for r in rs)
            row[f"max_abs_diff_{split}"] = max(
                abs(r[f"nll_{split}"] - online[r["seed"]][f"nll_{split}"]) for r in rs
            )
        rows.append(row)
    return rows


def actors(model_dir, corpus, seq_len, args) -> dict:
    """The distill stage with 1 and 2 actors (Ray), tokens/s after the first batch."""
    from nexus.stages import distill

    M.start_ray()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            path = distill.run(model=model_dir, corpus=[corpus], output=Path(tmp) / f"a{n}", seq_len=seq_len,
                               batch_size=args.batch_size, steps=args.quality_steps, top_k=args.default_k,
                               workers=n)  # fmt: skip
            m = distill.read_manifest(str(path))
            out[n] = {k: m[k] for k in ("tokens", "elapsed_s", "tokens_per_s", "steady_tokens_per_s")}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus_dir, model_dir = M.demo_inputs(args)
    seq_len = M.default_seq_len(model_dir, args.seq_len)
    started = M.start_ray()
    domain = M.split_path(corpus_dir, "domain")
    need = args.batch_size * max(args.quality_steps, args.speed_steps + 2)
    blocks = packed_blocks([domain], model_dir, seq_len, max_tokens=need * seq_len)
    held_out = {
        s: packed_blocks(
            [M.split_path(corpus_dir, f"{s}_heldout")], model_dir, seq_len, max_tokens=args.eval_tokens
        )
        for s in ("domain", "general")
    }
    act = actors(model_dir, domain, seq_len, args) if args.actors else None
    if started:
        import ray

        ray.shutdown()  # its processes would otherwise share the CPUs with the measurements
    vocab = int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
    args.ks = [k for k in args.ks if k < vocab] + [vocab]  # k = V: must train exactly like online KD
    rows, teacher_tps = M.teacher_pass(model_dir, blocks, max(args.ks), args.batch_size)
    print(
        f"teacher pass: {teacher_tps:.0f} tokens/s ({args.threads} threads), {len(blocks)} blocks x {seq_len}"
    )
    sp = speed(model_dir, seq_len, blocks, rows, args)
    for n, r in sp.items():
        print(f"  {n:<8} {r['tokens_per_s']:8.0f} tokens/s (best turn {r['best_tokens_per_s']:.0f})  "
              f"{r['vs_online']:.2f}x online KD")  # fmt: skip
    results = quality(model_dir, seq_len, blocks, rows, held_out, args)
    summary = summarise(results, args.ks)
    lines = [
        "| variant | bytes/token | domain NLL | general NLL | max abs diff vs online (domain / general) |",
        "|---|---|---|---|---|",
    ]
    for r in summary:
        b = r["bytes_per_token"] if r["bytes_per_token"] is not None else "-"
        lines.append(f"| {r['variant']} | {b} | {r['nll_domain']:.4f} | {r['nll_general']:.4f} | "
                     f"{r['max_abs_diff_domain']:.4f} / {r['max_abs_diff_general']:.4f} |")  # fmt: skip
    print("\n".join(lines))
    record = {
        "command": "python benchmarks/distill.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "model": str(model_dir),
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "teacher_tokens_per_s": teacher_tps,
        "speed": sp,
        "quality": results,
        "summary": summary,
        "actors": act,
    }
    out = args.json or ROOT / "benchmarks" / "results" / (
        "distill_quick.json" if args.quick else "distill.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
