"""Collection throughput and memory, measured side by side in one run.

For the same model, batches and sequence length (one process, fixed threads, the methods
interleaved over several rounds and the median kept, so load on a shared machine hits all
of them alike):

- ``plain forward``: ``model(input_ids, attention_mask)`` under ``no_grad`` (full model, LM head
  included), and ``plain decoder``: the same without the LM head;
- ``nexus collector``: :class:`nexus.stages.collect.RouterCollector` on the same batches, including
  serialising each partial and adding it up, as the Ray path does;
- ``reference``: one sequence per forward with ``output_router_logits=True``, every token's
  probabilities kept and the statistics computed from them at the end;
- ``nexus collect (Ray)``: the whole stage, :func:`nexus.stages.collect.collect` with one actor,
  steady-state rate after the first batch (actor start and model load excluded) and overall.

Memory: bytes of the statistics after 10k and after 1M tokens (ours, measured by actually
collecting that many tokens), and bytes of the per-token probabilities the reference keeps
(measured at 10k; at 1M, L x T x E x 4 bytes).

    python benchmarks/collect.py                       # the demo base (built or reused) + domain split
    python benchmarks/collect.py --model DIR --corpus PATH --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the small demo base)")
    p.add_argument("--corpus", default=None, help="corpus (default: the demo corpus's domain split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=32_768, help="tokens per throughput round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--memory-tokens", type=int, default=1_000_000, help="tokens for the memory figure")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed for every method)")
    p.add_argument("--no-ray", action="store_true", help="skip the end-to-end Ray measurement")
    p.add_argument("--json", default="benchmarks/results/collect.json", help="where to write the results")
    return p.parse_args(argv)


def default_inputs(args):
    if args.model and args.corpus:
        return args.model, args.corpus
    from nexus.demo import ensure_demo

    corpus_dir, model_dir = ensure_demo("small", progress=False)
    return args.model or str(model_dir), args.corpus or str(Path(corpus_dir) / "domain.parquet")


def to_tensors(seqs, pad_id):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s)
        mask[r, : len(s)] = 1
    return ids, mask


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    import torch

    from nexus.data.corpus import read_corpus, tokenize_corpus
    from nexus.method.stats import RouterStats
    from nexus.models.loading import load_model
    from nexus.stages.collect import (
        RouterCollector,
        make_batches,
        stats_from_bytes,
        stats_to_bytes,
        take_sequences,
    )

    torch.set_num_threads(args.threads)
    model_dir, corpus = default_inputs(args)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    tds = tokenize_corpus(read_corpus(corpus), model_dir, max_doc_tokens=args.seq_len, split_long=True)
    seqs, _ = take_sequences(tds, args.tokens)
    tokens = sum(len(s) for s in seqs)
    tables = make_batches(seqs, args.batch_size)
    batches = []
    for t in tables:
        lens = np.asarray(t.column("lengths")[0].as_py())
        ids = np.asarray(t.column("ids")[0].as_py())
        batches.append((np.split(ids, np.cumsum(lens)[:-1]), t.column("seq_ids")[0].as_py()))

    col = RouterCollector(model_dir, num_threads=args.threads)
    plain = load_model(model_dir)
    pad = col.pad_id
    L, E = len(col.layers), col.num_experts
    tensors = [to_tensors(b, pad) for b, _ in batches]

    def plain_full():
        with torch.no_grad():
            for ids, mask in tensors:
                plain(input_ids=ids, attention_mask=mask, use_cache=False)

    def plain_decoder():
        with torch.no_grad():
            for ids, mask in tensors:
                plain.base_model(input_ids=ids, attention_mask=mask, use_cache=False)

    def ours():
        total = None
        for b, sid in batches:
            part, _ = stats_from_bytes(stats_to_bytes(col.collect_batch(b, sid)))
            total = part if total is None else total.merge(part)
        return total

    def reference():
        kept = [[] for _ in range(L)]
        with torch.no_grad():
            for b, _ in batches:
                for s in b:
                    out = plain(
                        input_ids=torch.as_tensor(s)[None], output_router_logits=True, use_cache=False
                    )
                    for pos, lg in enumerate(x for x in out.router_logits if x is not None):
                        kept[pos].append(torch.softmax(lg.float(), -1).numpy())
        probs = [np.concatenate(k) for k in kept]
        stats = RouterStats(list(col.layers), E)
        for pos, p in enumerate(probs):
            p64 = p.astype(np.float64)
            stats.n[pos] = len(p)
            stats.sum_p[pos] = p64.sum(0)
            stats.sum_ppt[pos] = p64.T @ p64
            top = np.argsort(-p, axis=1)[:, : col.top_k]
            stats.topk_count[pos] = np.bincount(top.reshape(-1), minlength=E)
        return stats, sum(p.nbytes for p in probs)

    methods = {
        "plain forward": plain_full,
        "plain decoder": plain_decoder,
        "nexus collector": ours,
        "reference": reference,
    }
    for name, fn in methods.items():  # warm-up (the reference is slow and needs none)
        if name != "reference":
            fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    ref_bytes = 0
    for _ in range(args.rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "reference":
                ref_bytes = res[1]
    rates = {k: tokens / statistics.median(v) for k, v in times.items()}

    # memory: our statistics after 10k and 1M tokens, collected for real
    def stats_bytes(s: RouterStats) -> int:
        return sum(
            getattr(s, f).nbytes
            for f in ("n", "sum_p", "sum_ppt", "topk_count", "topk_weight_sum", "entropy_sum")
        )

    memory = {}
    total = None
    seen = 0
    marks = sorted({10_000, args.memory_tokens})
    t0 = time.perf_counter()
    while marks:
        for b, sid in batches:
            part = col.collect_batch(b, sid)
            total = part if total is None else total.merge(part)
            seen += sum(len(s) for s in b)
            while marks and seen >= marks[0]:
                memory[marks.pop(0)] = {"tokens": seen, "bytes": stats_bytes(total)}
            if not marks:
                break
    mem_time = time.perf_counter() - t0
    # reference memory: measured at its throughput run (``tokens`` tokens), scaled per token
    per_token = ref_bytes / tokens
    ref_memory = {m: int(round(per_token * m)) for m in sorted({10_000, args.memory_tokens})}
    assert per_token == L * E * 4

    ray_result = None
    if not args.no_ray:
        from nexus.stages import collect

        s = collect.run(
            model=model_dir,
            corpus=corpus,
            output=None,
            target_tokens=tokens,
            workers=1,
            cpus_per_worker=args.threads,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            progress=False,
        )
        ray_result = {
            "steady_tokens_per_s": s.meta["steady_tokens_per_s"],
            "overall_tokens_per_s": s.meta["tokens_per_s"],
            "elapsed_s": s.meta["elapsed_s"],
        }

    base = rates["plain forward"]
    dec = rates["plain decoder"]
    print(f"\nmodel {model_dir}: {L} MoE layers x {E} experts, top-{col.top_k}; corpus {corpus}")
    print(
        f"{tokens} tokens per round, batch {args.batch_size} x seq {args.seq_len}, {args.threads} thread(s), "
        f"{args.rounds} rounds (median)\n"
    )
    print(f"{'method':<28} {'tokens/s':>10} {'/ plain fwd':>12} {'/ plain dec':>12}")
    rows = dict(rates)
    if ray_result and ray_result["steady_tokens_per_s"]:
        rows["nexus collect (Ray, steady)"] = ray_result["steady_tokens_per_s"]
        rows["nexus collect (Ray, overall)"] = ray_result["overall_tokens_per_s"]
    for name, r in rows.items():
        print(f"{name:<28} {r:>10.0f} {r / base:>12.3f} {r / dec:>12.3f}")
    print(f"\n{'statistics memory':<28} {'10k tokens':>12} {'1M tokens':>12}")
    m10, m1m = memory[10_000]["bytes"], memory[args.memory_tokens]["bytes"]
    print(f"{'nexus (sufficient stats)':<28} {m10:>12,} {m1m:>12,}")
    print(
        f"{'reference (per-token probs)':<28} {ref_memory[10_000]:>12,} {ref_memory[args.memory_tokens]:>12,}"
    )
    print(f"(our 1M-token memory run: {seen} tokens in {mem_time:.1f}s = {seen / mem_time:.0f} tokens/s)")

    result = {
        "command": "python benchmarks/collect.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads},
        "model": str(model_dir),
        "corpus": str(corpus),
        "layers": L,
        "experts": E,
        "top_k": col.top_k,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_round": tokens,
        "rounds": args.rounds,
        "tokens_per_s": rates,
        "seconds": times,
        "ratio_to_plain_forward": {k: v / base for k, v in rows.items()},
        "ratio_to_plain_decoder": {k: v / dec for k, v in rows.items()},
        "ray": ray_result,
        "memory_bytes": {
            "nexus": {str(k): v for k, v in memory.items()},
            "reference": {str(k): v for k, v in ref_memory.items()},
            "reference_bytes_per_token": per_token,
        },
        "memory_run": {"tokens": seen, "seconds": mem_time},
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
