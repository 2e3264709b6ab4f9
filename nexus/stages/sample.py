"""Vocabulary-coverage sampling: the ``sample`` stage.

Pick documents that together cover as many distinct tokens as possible (optionally
IDF-weighted) without exceeding a token budget. Weighted coverage is monotone submodular,
so greedy by marginal gain per token (with the best single document as a fallback) is the
standard knapsack-constrained approximation, and *lazy* greedy evaluates it fast: a
document's gain can only shrink as the sample grows, so stale gains in a max-heap are upper
bounds and most documents are never re-scored.

On Ray, the two-round distributed greedy ("GreeDi", Mirzasoleiman et al. 2013): Ray Data
streams the tokenised corpus in shards of ``shard_docs`` documents; each shard runs lazy
greedy under the full budget and returns its winners (plus a random-key prefix used for the
random baseline and for filling); the driver runs lazy greedy again over the union of the
winners and keeps the better of that and the best single shard. Every document is sent
once, to one worker.

Once no document adds coverage, the remaining budget is filled with documents in a
deterministic random order (``fill``), so the sample uses the budget it was given.

The report compares the sample with a random sample of the same token count: distinct
tokens covered, share of the pool's distinct tokens, and KL(sample unigram || pool unigram).
:func:`reference_selection` implements the reference criterion we replace (greedy on KL to
the pool plus a length bonus) for the tests and benchmarks.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nexus.config import CorpusFormat, RemoteCode, Seeded, input_, setting
from nexus.data.arrow import list_column
from nexus.data.corpus import (
    cached_tokenizer,
    corpus_record,
    read_corpus,
    resolve_corpus,
    skipped_documents,
    tokenize_corpus,
)
from nexus.errors import NexusError, user_errors
from nexus.util.artifacts import atomic_dir, claim_output, claims_released, sha256_json, write_json
from nexus.util.cluster import ensure_ray

log = logging.getLogger(__name__)

SAMPLE_FILE = "sample.parquet"
REPORT_FILE = "sample.json"


# -- candidates ---------------------------------------------------------------------------------
@dataclass
class Candidates:
    """Documents as sparse token-count rows (CSR): row i has tokens[indptr[i]:indptr[i+1]]."""

    indptr: np.ndarray  # int64 [n+1]
    tokens: np.ndarray  # int64 [nnz], sorted and unique within a row
    counts: np.ndarray  # int64 [nnz], occurrences of each token in the document
    costs: np.ndarray  # int64 [n], document lengths in tokens
    keys: np.ndarray  # uint64 [n], content hashes (tie-breaking and random order)

    def __len__(self) -> int:
        return len(self.costs)

    @classmethod
    def from_sequences(cls, seqs: Sequence[np.ndarray], seed: int = 0) -> Candidates:
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        flat = (
            np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if seqs else np.zeros(0, np.int64)
        )
        return cls.from_flat(flat, offsets, seed=seed)

    @classmethod
    def from_flat(cls, flat: np.ndarray, offsets: np.ndarray, seed: int = 0) -> Candidates:
        """From concatenated token ids and document offsets (as in an Arrow list array)."""
        flat = np.asarray(flat, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        n = len(offsets) - 1
        costs = np.diff(offsets)
        if flat.size and flat.min() < 0:
            raise NexusError("negative token id in the corpus")
        width = int(flat.max()) + 1 if flat.size else 1
        doc = np.repeat(np.arange(n, dtype=np.int64), costs)
        pairs, counts = np.unique(doc * width + flat, return_counts=True)
        rows = pairs // width
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        keys = doc_keys(flat, offsets, seed)
        return cls(indptr, pairs % width, counts.astype(np.int64), costs.astype(np.int64), keys)

    def subset(self, rows: np.ndarray) -> Candidates:
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        take = _ranges(starts, lengths)
        return Candidates(indptr, self.tokens[take], self.counts[take], self.costs[rows], self.keys[rows])

    def row(self, i: int) -> slice:
        return slice(int(self.indptr[i]), int(self.indptr[i + 1]))

    def unigram(self, rows: np.ndarray | None, vocab: int) -> np.ndarray:
        """Token counts (length ``vocab``) summed over ``rows`` (all rows when None)."""
        if rows is None:
            return np.bincount(self.tokens, weights=self.counts, minlength=vocab)[:vocab]
        sub = self.subset(np.asarray(rows, dtype=np.int64))
        return np.bincount(sub.tokens, weights=sub.counts, minlength=vocab)[:vocab]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for each (s, l), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    out = np.ones(total, dtype=np.int64)
    nz = lengths > 0
    s, e, le = starts[nz], ends[nz], lengths[nz]
    out[0] = s[0]
    if len(s) > 1:
        out[e[:-1]] = s[1:] - (s[:-1] + le[:-1] - 1)
    return np.cumsum(out)


def doc_keys(flat: np.ndarray, offsets: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 64-bit content hash per document (seeded): the same document gets the same key anywhere."""
    data = np.ascontiguousarray(np.asarray(flat, dtype=np.int32)).view(np.uint8)
    seed_b = int(seed).to_bytes(8, "little", signed=False)
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    for i in range(len(offsets) - 1):
        chunk = data[offsets[i] * 4 : offsets[i + 1] * 4]
        out[i] = int.from_bytes(
            hashlib.blake2b(chunk.tobytes(), digest_size=8, key=seed_b).digest(), "little"
        )
    return out


# -- objective ----------------------------------------------------------------------------------
def idf_weights(df: np.ndarray, num_docs: int) -> np.ndarray:
    """Smoothed inverse document frequency, log((1+N)/(1+df)) + 1 (scikit-learn's)."""
    return np.log((1.0 + num_docs) / (1.0 + np.asarray(df, dtype=np.float64))) + 1.0


def coverage_value(cands: Candidates, rows: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted number of distinct tokens covered by ``rows``."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return 0.0
    toks = np.unique(cands.subset(rows).tokens)
    return float(len(toks)) if weights is None else float(np.asarray(weights)[toks].sum())


def _weights_for(cands: Candidates, weights: np.ndarray | None) -> np.ndarray:
    top = int(cands.tokens.max()) + 1 if cands.tokens.size else 1
    if weights is None:
        return np.ones(top, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if len(w) < top:
        w = np.concatenate([w, np.ones(top - len(w))])
    return w


@dataclass
class Selection:
    rows: np.ndarray  # chosen rows, in the order chosen
    value: float  # weighted coverage
    tokens: int  # total cost
    evaluations: int = 0  # marginal-gain evaluations (lazy greedy's work)


def lazy_greedy(
    cands: Candidates,
    budget: int,
    weights: np.ndarray | None = None,
    covered: np.ndarray | None = None,
) -> Selection:
    """Lazy greedy maximum coverage under a token budget (gain per token, best-single fallback).

    Ties break by document key, so the result does not depend on the order of ``cands``.
    """
    w = _weights_for(cands, weights)
    cov = np.zeros(len(w), dtype=bool) if covered is None else covered.copy()
    n = len(cands)
    if n == 0 or budget <= 0:
        return Selection(np.zeros(0, dtype=np.int64), 0.0, 0)
    tokw = w[cands.tokens] * ~cov[cands.tokens]
    csum = np.concatenate([[0.0], np.cumsum(tokw)])
    gains = csum[cands.indptr[1:]] - csum[cands.indptr[:-1]]
    costs = cands.costs
    fits = (costs <= budget) & (gains > 0) & (costs > 0)
    ratio = np.where(fits, gains / np.maximum(costs, 1), 0.0)
    idx = np.flatnonzero(fits)
    # heap of (-ratio, key, row); ties broken by content key
    heap = list(zip((-ratio[idx]).tolist(), cands.keys[idx].tolist(), idx.tolist()))
    heapq.heapify(heap)
    tokens, indptr = cands.tokens, cands.indptr
    remaining = int(budget)
    chosen: list[int] = []
    value = 0.0
    evals = 0
    while heap:
        neg, key, i = heapq.heappop(heap)
        c = int(costs[i])
        if c > remaining:
            continue  # never fits again: the budget only shrinks
        t = tokens[indptr[i] : indptr[i + 1]]
        new = t[~cov[t]]
        g = float(w[new].sum())
        evals += 1
        if g <= 0:
            continue
        r = g / c
        if not heap or (-r, key) <= heap[0][:2]:
            chosen.append(i)
            cov[new] = True
            value += g
            remaining -= c
        else:
            heapq.heappush(heap, (-r, key, i))
    rows = np.asarray(chosen, dtype=np.int64)
    # best single document (the classic fix that makes cost-scaled greedy a constant-factor algorithm)
    best = int(np.argmax(np.where(fits, gains, -1.0)))
    if fits[best] and gains[best] > value:
        return Selection(np.asarray([best]), float(gains[best]), int(costs[best]), evals)
    return Selection(rows, value, int(costs[rows].sum()) if len(rows) else 0, evals)


def random_order(cands: Candidates) -> np.ndarray:
    """A deterministic random order of the rows (by content key)."""
    return np.lexsort((np.arange(len(cands)), cands.keys))


def fill_in_order(
    cands: Candidates, order: np.ndarray, budget: int, taken: np.ndarray | None = None
) -> np.ndarray:
    """Rows from ``order`` (skipping ``taken``) added while they fit in ``budget`` tokens."""
    used = np.zeros(len(cands), dtype=bool)
    if taken is not None and len(taken):
        used[np.asarray(taken, dtype=np.int64)] = True
    remaining = int(budget)
    out = []
    for i in np.asarray(order, dtype=np.int64).tolist():
        if used[i]:
            continue
        c = int(cands.costs[i])
        if 0 < c <= remaining:
            out.append(i)
            used[i] = True
            remaining -= c
            if remaining == 0:
                break
    return np.asarray(out, dtype=np.int64)


def reference_selection(
    cands: Candidates,
    pool_counts: np.ndarray,
    budget: int,
    length_bonus: float = 0.1,
    max_steps: int | None = None,
) -> np.ndarray:
    """The reference criterion: repeatedly add the document that minimises
    KL(sample unigram || pool unigram) - ``length_bonus`` * len(doc) / budget.

    Every step scores every remaining document against the whole pool (vectorised here; the
    reference re-sent the pool to every worker each step), which is what makes it slow.
    """
    pool = np.asarray(pool_counts, dtype=np.float64)
    logp = np.log(np.where(pool > 0, pool / pool.sum(), 1.0))
    vocab = len(pool)
    c = np.zeros(vocab, dtype=np.float64)
    n_s = 0.0
    acc = 0.0  # sum_t F(c_t), F(x) = x (log x - log p_t)
    toks, cnts = cands.tokens, cands.counts.astype(np.float64)
    seg = cands.indptr[:-1]
    nonempty = np.diff(cands.indptr) > 0
    alive = (cands.costs > 0) & (cands.costs <= budget)
    remaining = budget
    chosen: list[int] = []

    def F(x, t):
        return np.where(x > 0, x * (np.log(np.maximum(x, 1e-300)) - logp[t]), 0.0)

    while alive.any() and (max_steps is None or len(chosen) < max_steps):
        delta_t = F(c[toks] + cnts, toks) - F(c[toks], toks)
        delta = np.zeros(len(cands))
        delta[nonempty] = np.add.reduceat(delta_t, seg[nonempty])
        total = n_s + cands.costs
        kl = (acc + delta) / total - np.log(total)
        score = kl - length_bonus * cands.costs / budget
        score = np.where(alive, score, np.inf)
        i = int(np.argmin(score))
        if not np.isfinite(score[i]):
            break
        chosen.append(i)
        sl = cands.row(i)
        t, k = toks[sl], cnts[sl]
        acc += float((F(c[t] + k, t) - F(c[t], t)).sum())
        c[t] += k
        n_s += cands.costs[i]
        remaining -= int(cands.costs[i])
        alive[i] = False
        alive &= cands.costs <= remaining
    return np.asarray(chosen, dtype=np.int64)


def kl_divergence(sample_counts: np.ndarray, pool_counts: np.ndarray) -> float:
    """KL(sample unigram || pool unigram) in nats (the sample's tokens all occur in the pool)."""
    q = np.asarray(sample_counts, dtype=np.float64)
    p = np.asarray(pool_counts, dtype=np.float64)
    if q.sum() <= 0:
        return float("nan")
    q = q / q.sum()
    p = p / p.sum()
    nz = q > 0
    return float((q[nz] * (np.log(q[nz]) - np.log(p[nz]))).sum())


def describe(
    cands: Candidates,
    rows: np.ndarray,
    pool_counts: np.ndarray,
    weights: np.ndarray | None = None,
) -> dict:
    """Coverage figures of ``rows`` against the pool."""
    vocab = len(pool_counts)
    counts = cands.unigram(rows, vocab)
    pool_distinct = int((np.asarray(pool_counts) > 0).sum())
    distinct = int((counts > 0).sum())
    out = {
        "docs": len(rows),
        "tokens": int(cands.costs[np.asarray(rows, dtype=np.int64)].sum()) if len(rows) else 0,
        "distinct_tokens": distinct,
        "coverage": distinct / max(pool_distinct, 1),
        "kl_to_pool": kl_divergence(counts, pool_counts),
    }
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)[:vocab]
        out["weighted_coverage"] = float(
            w[counts > 0].sum() / max(w[np.asarray(pool_counts) > 0].sum(), 1e-300)
        )
    return out


# -- the shard step (used by both the Ray path and the single-machine path) --------------------
def _shard_step(table, budget: int, vocab: int, weights, seed: int, keep_random: int, shard: int | None):
    """Greedy on one shard; returns winners, a random-key prefix and the shard's pool counts."""
    flat, offsets = list_column(table, "input_ids")
    cands = Candidates.from_flat(flat, offsets, seed=seed)
    n = len(cands)
    sel = lazy_greedy(cands, budget, weights)
    order = random_order(cands)
    cum = np.cumsum(cands.costs[order])
    prefix = order[: int(np.searchsorted(cum, keep_random, side="left")) + 1] if n else order
    role = np.zeros(n, dtype=np.int8)
    role[sel.rows] |= 1
    role[prefix] |= 2
    keep = np.flatnonzero(role)
    counts = np.bincount(flat, minlength=vocab).astype(np.int64)
    df = np.bincount(cands.tokens, minlength=vocab).astype(np.int64)
    if shard is None:
        shard = int(cands.keys.min()) if n else 0  # a stable shard id from its content
    rows = {
        "kind": pa.array(np.ones(len(keep), dtype=np.int8)),
        "text": table.column("text").take(pa.array(keep)) if "text" in table.column_names else None,
        "input_ids": table.column("input_ids").take(pa.array(keep)),
        "key": pa.array(cands.keys[keep]),
        "role": pa.array(role[keep]),
        "shard": pa.array(np.full(len(keep), shard, dtype=np.uint64)),
        "pool_counts": pa.nulls(len(keep), pa.list_(pa.int64())),
        "pool_df": pa.nulls(len(keep), pa.list_(pa.int64())),
        "pool_docs": pa.nulls(len(keep), pa.int64()),
    }
    stats = {
        "kind": pa.array([0], pa.int8()),
        "text": pa.nulls(1, pa.string()),
        "input_ids": pa.nulls(1, table.column("input_ids").type),
        "key": pa.array([0], pa.uint64()),
        "role": pa.array([0], pa.int8()),
        "shard": pa.array([shard], pa.uint64()),
        "pool_counts": pa.array([counts], pa.list_(pa.int64())),
        "pool_df": pa.array([df], pa.list_(pa.int64())),
        "pool_docs": pa.array([n], pa.int64()),
    }
    if rows["text"] is None:
        rows["text"] = pa.nulls(len(keep), pa.string())
    tables = [pa.table(stats), pa.table({k: v for k, v in rows.items()})]
    rows_t = tables[1].cast(tables[0].schema)
    return pa.concat_tables([tables[0], rows_t])


def _shard_udf(table, budget, vocab, weights, seed, keep_random):
    return _shard_step(table, budget, vocab, weights, seed, keep_random, None)


def _df_udf(table, vocab: int):
    flat, offsets = list_column(table, "input_ids")
    n = len(offsets) - 1
    doc = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    width = max(vocab, int(flat.max()) + 1 if flat.size else 1)
    uniq = np.unique(doc * width + flat) % width if flat.size else np.zeros(0, np.int64)
    return pa.table(
        {
            "df": pa.array([np.bincount(uniq, minlength=vocab)], pa.list_(pa.int64())),
            "docs": pa.array([n], pa.int64()),
        }
    )


# -- the stage ------------------------------------------------------------------------------------
@dataclass
class _Gathered:
    cands: Candidates
    texts: list
    ids: list
    role: np.ndarray
    shard: np.ndarray
    pool_counts: np.ndarray
    pool_df: np.ndarray
    pool_docs: int
    shards: int


def _gather(tables: list, vocab: int, seed: int) -> _Gathered:
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise NexusError("the corpus has no documents with text; check --corpus and --text-field")
    kind = np.asarray(table.column("kind").to_numpy(zero_copy_only=False))
    stats = table.filter(pa.array(kind == 0))
    docs = table.filter(pa.array(kind == 1))
    width = max([vocab] + [len(x) for x in stats.column("pool_counts").to_pylist()])
    pool_counts = np.zeros(width, dtype=np.int64)
    pool_df = np.zeros(width, dtype=np.int64)
    for c, d in zip(stats.column("pool_counts").to_pylist(), stats.column("pool_df").to_pylist()):
        pool_counts[: len(c)] += np.asarray(c, dtype=np.int64)
        pool_df[: len(d)] += np.asarray(d, dtype=np.int64)
    pool_docs = int(np.asarray(stats.column("pool_docs").to_numpy(zero_copy_only=False)).sum())
    flat, offsets = list_column(docs, "input_ids")
    cands = Candidates.from_flat(flat, offsets, seed=seed)
    return _Gathered(
        cands,
        docs.column("text").to_pylist(),
        docs.column("input_ids"),
        np.asarray(docs.column("role").to_numpy(zero_copy_only=False)),
        np.asarray(docs.column("shard").to_numpy(zero_copy_only=False)),
        pool_counts,
        pool_df,
        pool_docs,
        stats.num_rows,
    )


def _dedupe(g: _Gathered) -> np.ndarray:
    """Rows of ``g`` with distinct content keys (the same document may come from several shards)."""
    _, first = np.unique(g.cands.keys, return_index=True)
    return np.sort(first)


def select(
    g: _Gathered, budget: int, weights: np.ndarray | None, method: str, fill: bool
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Round two over gathered shard results: (sample rows, random baseline rows, details)."""
    cands = g.cands
    uniq = _dedupe(g)
    details: dict[str, Any] = {}
    winners = uniq[(g.role[uniq] & 1) > 0]
    if method == "random":
        greedy_rows = np.zeros(0, dtype=np.int64)
    else:
        sub = cands.subset(winners)
        sel = lazy_greedy(sub, budget, weights)
        greedy_rows = winners[sel.rows]
        value = sel.value
        details["round2_value"] = value
        if g.shards > 1:
            # GreeDi keeps the better of round two and the best single shard's own solution
            best_shard, best_value = None, value
            for s in np.unique(g.shard[winners]):
                rows = winners[g.shard[winners] == s]
                v = coverage_value(cands, rows, _weights_for(cands, weights))
                if v > best_value and cands.costs[rows].sum() <= budget:
                    best_shard, best_value = rows, v
            if best_shard is not None:
                greedy_rows, value = best_shard, best_value
                details["used_best_shard"] = True
        details["greedy_value"] = value
    pool_order = uniq[(g.role[uniq] & 2) > 0]
    order = pool_order[random_order(cands.subset(pool_order))]
    details["greedy_docs"] = len(greedy_rows)
    details["greedy_tokens"] = int(cands.costs[greedy_rows].sum()) if len(greedy_rows) else 0
    rows = greedy_rows
    if fill or method == "random":
        left = budget - details["greedy_tokens"]
        extra = fill_in_order(cands, order, left, taken=greedy_rows)
        rows = np.concatenate([greedy_rows, extra])
    details["fill_docs"] = len(rows) - len(greedy_rows)
    tokens = int(cands.costs[rows].sum()) if len(rows) else 0
    baseline = fill_in_order(cands, order, tokens)
    return rows, baseline, details


class SampleConfig(CorpusFormat, Seeded, RemoteCode):
    """``nexus sample``: a calibration subset of the corpus that covers its vocabulary."""

    model: str = input_(help="model directory whose tokenizer defines the tokens", identity="model")
    corpus: list[str] = input_(
        help="text/JSONL/Parquet files, directories, globs or URIs (s3://, gs://, ...)", identity="corpus"
    )
    output: str = input_(help="output directory (written atomically)")
    overwrite: bool = input_(False, help="replace the output directory if it exists")
    target_tokens: int = setting(200_000, help="token budget of the sample", gt=0)
    method: Literal["greedi", "greedy", "random"] = setting(
        "greedi",
        help="greedi: two-round distributed lazy greedy on Ray; greedy: single-machine lazy greedy; "
        "random: a random sample",
    )
    weighting: Literal["uniform", "idf"] = setting(
        "uniform", help="token weights (idf: rare tokens count more)"
    )
    max_doc_tokens: int = setting(4096, help="documents are cut to this many tokens", gt=0)
    shard_docs: int = setting(20_000, help="documents per first-round shard (greedi)", gt=0)
    fill: bool = setting(True, help="fill the budget with random documents once coverage stops growing")


@claims_released()
def run(cfg: SampleConfig | None = None, /, **kwargs) -> dict:
    """Choose a calibration subset of ``cfg.corpus`` with at most ``cfg.target_tokens`` tokens.

    Writes ``sample.parquet`` (``text``, ``num_tokens``; a corpus for ``nexus collect --corpus
    OUTPUT``) and ``sample.json`` (the report) into ``cfg.output``, atomically, and returns the
    report.
    """
    cfg = SampleConfig.build(cfg, **kwargs)
    claim_output(cfg.output, cfg.overwrite)
    t0 = time.perf_counter()
    ensure_ray()
    tok = cached_tokenizer(cfg.model, cfg.trust_remote_code)
    vocab = len(tok)
    files = resolve_corpus(cfg.corpus, cfg.corpus_format)
    skipped = skipped_documents(cfg.skip_bad_documents)
    ds = read_corpus(
        cfg.corpus, cfg.text_field, file_format=cfg.corpus_format, text_unit=cfg.text_unit, skipped=skipped
    )
    tds = tokenize_corpus(
        ds,
        cfg.model,
        max_doc_tokens=cfg.max_doc_tokens,
        keep_text=True,
        trust_remote_code=cfg.trust_remote_code,
    )
    budget = cfg.target_tokens
    weights = None
    with user_errors():
        if cfg.weighting == "idf":
            weights, vocab = _idf(tds, vocab)
        # each shard keeps its random-order prefix of `budget` tokens: the union then holds the whole
        # pool's prefix of that length, enough for the baseline and for filling the budget
        if cfg.method == "greedi":
            out = tds.map_batches(
                _shard_udf,
                batch_format="pyarrow",
                batch_size=cfg.shard_docs,
                fn_kwargs={
                    "budget": budget,
                    "vocab": vocab,
                    "weights": weights,
                    "seed": cfg.seed,
                    "keep_random": budget,
                },
            )
            tables = list(out.iter_batches(batch_format="pyarrow", batch_size=None))
        else:
            docs = list(tds.iter_batches(batch_format="pyarrow", batch_size=None))
            if not docs or sum(t.num_rows for t in docs) == 0:
                raise NexusError("the corpus has no documents with text; check --corpus and --text-field")
            table = pa.concat_tables([t.select(["text", "input_ids"]) for t in docs])
            round_one = budget if cfg.method == "greedy" else 0
            tables = [_shard_step(table, round_one, vocab, weights, cfg.seed, budget, 0)]
    skip_record = skipped.finish() if skipped else None  # logs how many were skipped
    g = _gather(tables, vocab, cfg.seed)
    pool_tokens = int(g.pool_counts.sum())
    if pool_tokens == 0:
        raise NexusError("the corpus has no tokens; check --corpus and --text-field")
    if weights is not None and len(weights) < len(g.pool_counts):
        weights = np.concatenate([weights, np.ones(len(g.pool_counts) - len(weights))])
    if pool_tokens <= budget:
        log.warning(
            "the corpus has %d tokens, not more than the %d asked for; the sample is the whole corpus",
            pool_tokens,
            budget,
        )
    rows, baseline, details = select(g, budget, weights, cfg.method, cfg.fill)

    chosen_ids = g.ids.take(pa.array(rows))
    report = {
        "kind": "nexus-sample",
        "method": cfg.method,
        "weighting": cfg.weighting,
        "target_tokens": budget,
        "max_doc_tokens": cfg.max_doc_tokens,
        "seed": cfg.seed,
        "shards": g.shards,
        "pool": {
            "docs": g.pool_docs,
            "tokens": pool_tokens,
            "distinct_tokens": int((g.pool_counts > 0).sum()),
        },
        "sample": describe(g.cands, rows, g.pool_counts, weights),
        "random": describe(g.cands, baseline, g.pool_counts, weights),
        "details": details,
        "corpus": corpus_record(cfg.corpus, files, cfg.text_field, cfg.text_unit),
        "tokenizer": cfg.model,
        "sample_hash": sha256_json([np.asarray(x, dtype=np.int64).tolist() for x in chosen_ids.to_pylist()])[
            :16
        ],
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    if skip_record is not None:
        report["skipped_documents"] = skip_record
    with atomic_dir(cfg.output, cfg.overwrite) as tmp:
        texts = pa.array([g.texts[i] for i in rows.tolist()], pa.string())
        lengths = pa.array(g.cands.costs[rows], pa.int64())
        pq.write_table(pa.table({"text": texts, "num_tokens": lengths}), str(Path(tmp) / SAMPLE_FILE))
        write_json(Path(tmp) / REPORT_FILE, report)
    s, r = report["sample"], report["random"]
    log.info(
        "sample: %d docs, %d tokens, %d distinct tokens (%.1f%% of the pool's), KL to pool %.4f; "
        "random sample of equal size: %d distinct (%.1f%%), KL %.4f",
        s["docs"],
        s["tokens"],
        s["distinct_tokens"],
        100 * s["coverage"],
        s["kl_to_pool"],
        r["distinct_tokens"],
        100 * r["coverage"],
        r["kl_to_pool"],
    )
    return report


def _idf(tds, vocab: int) -> tuple[np.ndarray, int]:
    """IDF weights of the tokenised corpus (one pass of ``_df_udf`` over it) and the vocabulary size."""
    parts = list(
        tds.map_batches(
            _df_udf, batch_format="pyarrow", batch_size=4096, fn_kwargs={"vocab": vocab}
        ).iter_rows()
    )
    df = np.zeros(vocab, dtype=np.int64)
    for p in parts:
        d = np.asarray(p["df"], dtype=np.int64)
        if len(d) > len(df):
            df = np.concatenate([df, np.zeros(len(d) - len(df), np.int64)])
        df[: len(d)] += d
    return idf_weights(df, sum(int(p["docs"]) for p in parts)), len(df)


def summary_lines(report: dict, cfg: SampleConfig) -> list[str]:
    """The sample against a random sample of the same size, and the pool."""
    lines = [f"{'':<8} {'docs':>8} {'tokens':>10} {'distinct':>9} {'coverage':>9} {'KL(pool)':>9}"]
    for name in ("sample", "random"):
        d = report[name]
        lines.append(
            f"{name:<8} {d['docs']:>8} {d['tokens']:>10} {d['distinct_tokens']:>9} "
            f"{100 * d['coverage']:>8.1f}% {d['kl_to_pool']:>9.4f}"
        )
    pool = report["pool"]
    lines.append(
        f"pool: {pool['docs']} docs, {pool['tokens']} tokens, {pool['distinct_tokens']} distinct; wrote {cfg.output}"
    )
    return lines


def job_inputs(job) -> dict:
    """In the job: the base model's tokenizer and the training corpus (``data.train``)."""
    return {"model": job.model_dir, "corpus": job.train_corpus}
