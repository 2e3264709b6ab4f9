"""Vocabulary-coverage sampling: lazy greedy, GreeDi, the baselines, and the `sample` stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexus.errors import NexusError
from nexus.stages import sample
from nexus.stages.sample import (
    Candidates,
    coverage_value,
    describe,
    fill_in_order,
    lazy_greedy,
    random_order,
    reference_selection,
)


def stdlib_paragraphs(n: int = 2500) -> list[str]:
    """Real text that exists wherever Python does: paragraphs of the standard library's sources."""
    import os

    root = Path(os.__file__).parent
    out: list[str] = []
    for f in sorted(root.glob("*.py")):
        for p in f.read_text(encoding="utf-8", errors="ignore").split("\n\n"):
            p = p.strip()
            if len(p) > 40:
                out.append(p[:3000])
        if len(out) >= n:
            break
    return out[:n]


@pytest.fixture(scope="module")
def text_pool(tmp_path_factory):
    """A real-text corpus (Parquet) and a 2000-token BPE tokenizer trained on it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("sampling")
    texts = stdlib_paragraphs()
    pq.write_table(pa.table({"text": texts}), d / "pool.parquet")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=2000, min_frequency=2, special_tokens=["<|pad|>", "<|eos|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|eos|>")
    tok.save_pretrained(str(d / "tok"))
    ids = [np.asarray(x[:512], dtype=np.int64) for x in tok(texts)["input_ids"]]
    return {"dir": d, "texts": texts, "tokenizer": d / "tok", "ids": ids, "vocab": len(tok)}


def _naive_greedy(c: Candidates, budget: int) -> float:
    covered: set[int] = set()
    remaining, chosen = budget, set()
    while True:
        best = None
        for i in range(len(c)):
            if i in chosen or c.costs[i] > remaining:
                continue
            gain = len(set(c.tokens[c.row(i)].tolist()) - covered)
            if gain <= 0:
                continue
            score = (gain / c.costs[i], -int(c.keys[i]))
            if best is None or score > best[0]:
                best = (score, i)
        if best is None:
            return float(len(covered))
        i = best[1]
        chosen.add(i)
        covered |= set(c.tokens[c.row(i)].tolist())
        remaining -= int(c.costs[i])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_greedy_equals_plain_greedy(seed):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 200, rng.integers(1, 40)) for _ in range(120)]
    c = Candidates.from_sequences(seqs)
    for budget in (50, 400, 5000):
        sel = lazy_greedy(c, budget)
        assert sel.tokens <= budget
        assert sel.value == coverage_value(c, sel.rows)
        assert sel.value >= _naive_greedy(c, budget)  # equal, or the best-single fallback won
        # order of the candidates does not matter (ties break by content)
        perm = rng.permutation(len(c))
        again = lazy_greedy(c.subset(perm), budget)
        assert sorted(perm[again.rows].tolist()) == sorted(sel.rows.tolist())


def test_candidates_from_sequences_counts():
    c = Candidates.from_sequences([np.array([3, 1, 3, 3]), np.array([2])])
    assert c.tokens[c.row(0)].tolist() == [1, 3] and c.counts[c.row(0)].tolist() == [1, 3]
    assert c.costs.tolist() == [4, 1]
    assert c.unigram(None, 5).tolist() == [0, 1, 1, 3, 0]
    assert c.keys[0] == Candidates.from_sequences([np.array([3, 1, 3, 3])]).keys[0]


@pytest.fixture(scope="module")
def demo_pool(request, text_pool):
    """The demo corpus's domain split with the demo tokenizer when the demo fixture exists, else
    the stdlib paragraphs with their own tokenizer."""
    try:
        corpus_dir, model_dir = request.getfixturevalue("demo_tiny")
    except pytest.FixtureLookupError:
        return text_pool["ids"], text_pool["vocab"]
    from nexus.data.corpus import cached_tokenizer

    tok = cached_tokenizer(str(model_dir))
    texts = pq.read_table(Path(corpus_dir) / "domain.parquet").column("text").to_pylist()
    ids = [np.asarray(x[:512], dtype=np.int64) for x in tok(texts)["input_ids"]]
    return [x for x in ids if len(x)], len(tok)


def test_coverage_beats_random_and_reference_and_greedi_is_close(demo_pool):
    ids, vocab = demo_pool
    c = Candidates.from_sequences(ids)
    pool_counts = c.unigram(None, vocab)
    for budget in (2_000, 20_000):
        greedy = lazy_greedy(c, budget)
        rnd = fill_in_order(c, random_order(c), greedy.tokens)
        ref = reference_selection(c, pool_counts, budget)
        g, r, f = (describe(c, rows, pool_counts) for rows in (greedy.rows, rnd, ref))
        assert g["distinct_tokens"] >= r["distinct_tokens"]
        assert g["distinct_tokens"] >= f["distinct_tokens"]
        assert g["tokens"] <= budget and int(c.costs[ref].sum()) <= budget
        if g["coverage"] < 1:
            assert g["distinct_tokens"] > r["distinct_tokens"]
        # two-round distributed greedy over 8 shards
        shards = np.array_split(np.random.default_rng(0).permutation(len(c)), 8)
        winners = np.concatenate([s[lazy_greedy(c.subset(s), budget).rows] for s in shards])
        second = lazy_greedy(c.subset(winners), budget)
        best_shard = max(lazy_greedy(c.subset(s), budget).value for s in shards)
        assert max(second.value, best_shard) >= 0.97 * greedy.value


def test_idf_weighting_prefers_rare_tokens():
    # doc 0 covers three common tokens, doc 1 two rare ones; budget fits only one
    seqs = [np.array([0, 1, 2])] + [np.array([0, 1, 2])] * 20 + [np.array([7, 8, 7])]
    c = Candidates.from_sequences(seqs)
    df = np.bincount(c.tokens, minlength=9)
    from nexus.stages.sample import idf_weights

    w = idf_weights(df, len(seqs))
    assert lazy_greedy(c, 3).rows.tolist()[0] in range(21)
    assert lazy_greedy(c, 3, w).rows.tolist() == [21]


def test_sample_stage_greedy_and_greedi(ray_cluster, text_pool, tmp_path):
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"text": text_pool["texts"][:800]}), pool)
    kw = dict(max_doc_tokens=512)
    exact = sample.run(
        corpus=pool,
        model=text_pool["tokenizer"],
        output=tmp_path / "greedy",
        target_tokens=6000,
        method="greedy",
        **kw,
    )
    dist = sample.run(
        corpus=pool,
        model=text_pool["tokenizer"],
        output=tmp_path / "greedi",
        target_tokens=6000,
        shard_docs=100,
        **kw,
    )
    assert dist["shards"] >= 4 and exact["shards"] == 1
    for rep in (exact, dist):
        assert rep["sample"]["tokens"] <= 6000
        assert rep["sample"]["distinct_tokens"] > rep["random"]["distinct_tokens"]
        assert rep["pool"] == exact["pool"]
        # the random baseline in the report has the sample's token count (up to one document)
        assert abs(rep["random"]["tokens"] - rep["sample"]["tokens"]) <= 512
    assert dist["details"]["greedy_value"] >= 0.97 * exact["details"]["greedy_value"]
    # the artifact: a Parquet sample that the corpus reader (and hence `nexus collect`) reads as it is
    out = tmp_path / "greedi"
    assert json.loads((out / "sample.json").read_text())["sample"] == dist["sample"]
    from nexus.data.corpus import read_corpus

    texts = [r["text"] for r in read_corpus(out).take_all()]
    assert len(texts) == dist["sample"]["docs"] and set(texts) <= set(text_pool["texts"])
    table = pq.read_table(out / "sample.parquet")
    assert int(np.sum(table.column("num_tokens"))) == dist["sample"]["tokens"]


def test_sample_idf_and_small_corpus_warning(ray_cluster, text_pool, tmp_path, caplog):
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(json.dumps({"text": t}) for t in text_pool["texts"][:20]) + "\n")
    with caplog.at_level(logging.WARNING, logger="nexus.stages.sample"):
        rep = sample.run(
            corpus=small,
            model=text_pool["tokenizer"],
            output=tmp_path / "s",
            target_tokens=10**7,
            weighting="idf",
        )
    assert "not more than the" in caplog.text
    assert rep["sample"]["docs"] == 20 and rep["sample"]["coverage"] == 1.0
    assert 0 < rep["sample"]["weighted_coverage"] <= 1


def test_sample_errors(ray_cluster, text_pool, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(NexusError, match="empty"):
        sample.run(corpus=empty, model=text_pool["tokenizer"], output=tmp_path / "o1", target_tokens=100)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(NexusError, match="no documents"):
        sample.run(corpus=blank, model=text_pool["tokenizer"], output=tmp_path / "o2", target_tokens=100)
    with pytest.raises(
        NexusError, match="sample setting 'method': Input should be 'greedi', 'greedy' or 'random'"
    ):
        sample.run(
            corpus=blank,
            model=text_pool["tokenizer"],
            output=tmp_path / "o3",
            target_tokens=100,
            method="best",
        )
    (tmp_path / "exists").mkdir()
    with pytest.raises(NexusError, match="already exists"):
        sample.run(corpus=blank, model=text_pool["tokenizer"], output=tmp_path / "exists", target_tokens=100)


def test_sample_cli(ray_cluster, text_pool, tmp_path, capsys):
    from nexus.cli import main

    rc = main(
        [
            "sample",
            "--model",
            str(text_pool["tokenizer"]),
            "--corpus",
            str(text_pool["dir"] / "pool.parquet"),
            "--target-tokens",
            "3000",
            "--output",
            str(tmp_path / "cli"),
        ]
    )
    assert rc == 0
    assert "random" in capsys.readouterr().out
    assert (tmp_path / "cli" / "sample.parquet").is_file()
