"""Coverage sampling: quality at a fixed budget, and speed on a million candidates.

Part 1, the demo corpus (domain split, demo tokenizer), one budget, every method side by side:
lazy greedy, two-round distributed greedy (GreeDi, in-process shards), a random sample of
the same token count, and the reference criterion (greedy on KL(sample || pool) minus a
length bonus). Distinct tokens covered, share of the pool's, KL to the pool, seconds.

Part 2, a synthetic pool of ``--candidates`` documents (Zipf-distributed tokens, log-normal
lengths): lazy greedy on one machine; GreeDi as the ``sample`` stage runs it on Ray Data
(``map_batches`` shards, round two on the driver); the random baseline; and the reference
criterion's time per step (it scores every document against the pool every step), with
its projected total.

    python benchmarks/sampling.py
    python benchmarks/sampling.py --candidates 1000000 --json benchmarks/results/sampling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="tokenizer/model directory (default: the small demo base)")
    p.add_argument("--corpus", default=None, help="corpus for part 1 (default: the demo domain split)")
    p.add_argument("--demo-budget", type=int, default=50_000, help="token budget in part 1")
    p.add_argument("--max-doc-tokens", type=int, default=1024)
    p.add_argument("--demo-shards", type=int, default=8)
    p.add_argument("--candidates", type=int, default=1_000_000, help="synthetic pool size (part 2)")
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--mean-len", type=float, default=64.0)
    p.add_argument("--budget-frac", type=float, default=0.002, help="part 2 budget, share of pool tokens")
    p.add_argument("--shard-docs", type=int, default=62_500, help="documents per GreeDi shard (part 2)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--reference-steps", type=int, default=3, help="reference steps timed on the big pool")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--json", default="benchmarks/results/sampling.json")
    return p.parse_args(argv)


def demo_part(args) -> dict:
    from nexus.data.corpus import cached_tokenizer, read_corpus
    from nexus.stages.sample import (
        Candidates,
        describe,
        fill_in_order,
        lazy_greedy,
        random_order,
        reference_selection,
    )

    model, corpus = args.model, args.corpus
    if not (model and corpus):
        from nexus.demo import ensure_demo

        corpus_dir, model_dir = ensure_demo("small", progress=False)
        model = model or str(model_dir)
        corpus = corpus or str(Path(corpus_dir) / "domain.parquet")
    tok = cached_tokenizer(model)
    texts = [r["text"] for r in read_corpus(corpus).take_all()]
    ids = [np.asarray(x[: args.max_doc_tokens]) for x in tok(texts)["input_ids"]]
    ids = [x for x in ids if len(x)]
    c = Candidates.from_sequences(ids)
    vocab = max(len(tok), int(c.tokens.max()) + 1)
    pool = c.unigram(None, vocab)
    B = args.demo_budget
    out: dict = {
        "corpus": corpus,
        "tokenizer": model,
        "docs": len(c),
        "tokens": int(c.costs.sum()),
        "distinct": int((pool > 0).sum()),
        "budget": B,
    }
    res = {}
    t = time.perf_counter()
    g = lazy_greedy(c, B)
    res["lazy greedy"] = (g.rows, time.perf_counter() - t)
    t = time.perf_counter()
    shards = np.array_split(np.arange(len(c)), args.demo_shards)
    winners = np.concatenate([s[lazy_greedy(c.subset(s), B).rows] for s in shards])
    r2 = winners[lazy_greedy(c.subset(winners), B).rows]
    res[f"GreeDi ({args.demo_shards} shards)"] = (r2, time.perf_counter() - t)
    t = time.perf_counter()
    rnd = fill_in_order(c, random_order(c), int(c.costs[g.rows].sum()))
    res["random (same tokens)"] = (rnd, time.perf_counter() - t)
    t = time.perf_counter()
    ref = reference_selection(c, pool, B)
    res["reference (KL + length)"] = (ref, time.perf_counter() - t)
    out["methods"] = {}
    print(
        f"\npart 1: {corpus}: {len(c)} docs, {out['tokens']} tokens, {out['distinct']} distinct; budget {B}"
    )
    print(
        f"{'method':<26} {'docs':>6} {'tokens':>8} {'distinct':>9} {'coverage':>9} {'KL(pool)':>9} {'seconds':>8}"
    )
    for name, (rows, sec) in res.items():
        d = describe(c, rows, pool)
        d["seconds"] = sec
        out["methods"][name] = d
        print(
            f"{name:<26} {d['docs']:>6} {d['tokens']:>8} {d['distinct_tokens']:>9} "
            f"{100 * d['coverage']:>8.1f}% {d['kl_to_pool']:>9.4f} {sec:>8.2f}"
        )
    return out


def synthetic_pool(n: int, vocab: int, mean_len: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(mean_len) - 0.245, 0.7, n)).astype(np.int64)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks**-1.1
    p /= p.sum()
    flat = rng.choice(vocab, size=int(lengths.sum()), p=p).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return flat, offsets


def big_part(args) -> dict:
    import pyarrow as pa
    import ray

    from nexus.stages.sample import (
        Candidates,
        _gather,
        _shard_udf,
        describe,
        fill_in_order,
        lazy_greedy,
        random_order,
        reference_selection,
        select,
    )

    n = args.candidates
    t = time.perf_counter()
    flat, offsets = synthetic_pool(n, args.vocab, args.mean_len)
    gen_s = time.perf_counter() - t
    pool_tokens = int(offsets[-1])
    B = int(args.budget_frac * pool_tokens)
    out: dict = {"candidates": n, "tokens": pool_tokens, "vocab": args.vocab, "budget": B}
    print(
        f"\npart 2: synthetic pool of {n} documents, {pool_tokens} tokens, vocabulary {args.vocab}; budget {B}"
    )

    t = time.perf_counter()
    c = Candidates.from_flat(flat, offsets)
    build_s = time.perf_counter() - t
    pool = c.unigram(None, args.vocab)
    t = time.perf_counter()
    g = lazy_greedy(c, B)
    greedy_s = time.perf_counter() - t
    rows = {"lazy greedy (1 process)": (g.rows, build_s + greedy_s)}
    out["lazy_greedy"] = {"build_s": build_s, "select_s": greedy_s, "evaluations": g.evaluations}

    # GreeDi the way the sample stage runs it: Ray Data shards, round two on the driver
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    lengths = np.diff(offsets).astype(np.int64)
    offsets32 = offsets.astype(np.int32)
    table = pa.table(
        {
            "text": pa.nulls(n, pa.string()),
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets32), pa.array(flat)),
            "num_tokens": pa.array(lengths),
        }
    )
    chunks = [table.slice(i, args.shard_docs) for i in range(0, n, args.shard_docs)]
    t = time.perf_counter()
    ds = ray.data.from_arrow(chunks)
    res = ds.map_batches(
        _shard_udf,
        batch_format="pyarrow",
        batch_size=args.shard_docs,
        fn_kwargs={"budget": B, "vocab": args.vocab, "weights": None, "seed": 0, "keep_random": B},
    )
    tables = list(res.iter_batches(batch_format="pyarrow", batch_size=None))
    round1_s = time.perf_counter() - t
    t = time.perf_counter()
    gathered = _gather(tables, args.vocab, 0)
    picked, baseline, details = select(gathered, B, None, "greedi", fill=False)
    round2_s = time.perf_counter() - t
    gc = gathered.cands
    out["greedi"] = {
        "shards": gathered.shards,
        "ray_cpus": args.ray_cpus,
        "round1_s": round1_s,
        "round2_s": round2_s,
        "union_docs": len(gc),
        "value": details["greedy_value"],
    }
    # report GreeDi's sample against the full pool
    keys = gc.keys[picked]
    pos = {int(k): i for i, k in enumerate(c.keys.tolist())}
    picked_full = np.asarray([pos[int(k)] for k in keys], dtype=np.int64)
    rows[f"GreeDi on Ray ({gathered.shards} shards, {args.ray_cpus} CPUs)"] = (
        picked_full,
        round1_s + round2_s,
    )
    t = time.perf_counter()
    rnd = fill_in_order(c, random_order(c), int(c.costs[g.rows].sum()))
    rows["random (same tokens)"] = (rnd, time.perf_counter() - t)

    # the reference criterion: time a few steps on the full pool, project the total
    t = time.perf_counter()
    few = reference_selection_steps(c, pool, B, args.reference_steps, reference_selection)
    per_step = (time.perf_counter() - t) / max(len(few), 1)
    mean_len = float(c.costs[few].mean()) if len(few) else args.mean_len
    steps = B / mean_len
    out["reference"] = {
        "seconds_per_step": per_step,
        "steps_timed": len(few),
        "mean_chosen_len": mean_len,
        "projected_steps": steps,
        "projected_s": per_step * steps,
    }

    print(f"{'method':<40} {'docs':>7} {'tokens':>9} {'distinct':>9} {'coverage':>9} {'seconds':>9}")
    out["methods"] = {}
    for name, (r, sec) in rows.items():
        d = describe(c, r, pool)
        d["seconds"] = sec
        out["methods"][name] = d
        print(
            f"{name:<40} {d['docs']:>7} {d['tokens']:>9} {d['distinct_tokens']:>9} {100 * d['coverage']:>8.2f}% {sec:>9.1f}"
        )
    ref = out["reference"]
    print(
        f"{'reference (KL + length), projected':<40} {'':>7} {'':>9} {'':>9} {'':>9} {ref['projected_s']:>9.0f}"
        f"   ({ref['seconds_per_step']:.2f} s/step x ~{ref['projected_steps']:.0f} steps)"
    )
    print(
        f"(pool generation {gen_s:.1f}s; candidate build {build_s:.1f}s; lazy greedy {greedy_s:.1f}s, "
        f"{g.evaluations} gain evaluations; GreeDi round 1 {round1_s:.1f}s, round 2 {round2_s:.1f}s "
        f"over {len(gc)} documents)"
    )
    out["greedi_over_greedy"] = out["greedi"]["value"] / g.value
    return out


def reference_selection_steps(c, pool, budget, steps, reference_selection):
    """The first ``steps`` choices of the reference criterion (same code, stopped early)."""
    # run the reference on the full pool but with a budget that stops it after ~steps choices
    chosen = reference_selection(c, pool, budget, max_steps=steps)
    return chosen


def main(argv=None) -> int:
    args = parse_args(argv)
    result = {
        "command": "python benchmarks/sampling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    if not args.skip_demo:
        import ray

        if not ray.is_initialized():
            ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        result["demo"] = demo_part(args)
    result["synthetic"] = big_part(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
