"""Router-statistics collection: exactness across actors and nodes, hand-computed reference, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from nexus.collect import (
    RouterCollector,
    collect,
    make_batches,
    stats_from_bytes,
    stats_to_bytes,
    token_keys,
)
from nexus.errors import NexusError
from nexus.stats import RouterStats

FIELDS = ("n", "sum_p", "sum_ppt", "topk_count", "topk_weight_sum", "entropy_sum")


def assert_stats_close(a: RouterStats, b: RouterStats, rtol: float) -> None:
    assert a.layers == b.layers and a.num_experts == b.num_experts
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        scale = np.maximum(np.abs(x), np.abs(y)).max()
        err = np.abs(x - y).max() / scale if scale > 0 else 0.0
        assert err <= rtol, f"{f}: relative difference {err:.3g} > {rtol:g}"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    from model_dirs import sample_texts

    path = tmp_path_factory.mktemp("collect_corpus") / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in sample_texts(200)) + "\n")
    return path


def _sequences(n: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, int(rng.integers(5, 40))) for _ in range(n)]


def _hand_stats(model, seqs, top_k: int, probs_kind: str, topk_by_hand: bool) -> RouterStats:
    """Statistics from ``output_router_logits=True`` of the full model, computed here from scratch."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s)
        mask[r, : len(s)] = 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    keep = mask.reshape(-1).bool()
    logits = [x for x in out.router_logits if x is not None]
    E = logits[0].shape[-1]
    stats = RouterStats(list(range(len(logits))), E)
    for pos, lg in enumerate(logits):
        lg = lg.reshape(-1, E)[keep].double()
        p = torch.sigmoid(lg) if probs_kind == "sigmoid" else torch.softmax(lg, -1)
        stats.n[pos] = p.shape[0]
        stats.sum_p[pos] = p.sum(0).numpy()
        stats.sum_ppt[pos] = (p.T @ p).numpy()
        q = p / p.sum(-1, keepdim=True)
        stats.entropy_sum[pos] = float(-(q * q.log()).sum())
        if topk_by_hand:  # GPT-OSS: top-k of the logits, weights = softmax over the chosen logits
            top, idx = lg.topk(top_k, -1)
            w = torch.softmax(top, -1)
            stats.topk_count[pos] = np.bincount(idx.reshape(-1).numpy(), minlength=E)
            stats.topk_weight_sum[pos] = (
                torch.zeros(E, dtype=torch.float64).index_add_(0, idx.reshape(-1), w.reshape(-1)).numpy()
            )
    return stats


def test_collector_matches_hand_computed_gpt_oss(tiny_model_dir):
    torch.set_num_threads(1)
    col = RouterCollector(tiny_model_dir)
    seqs = _sequences()
    got = col.collect_batch(seqs, list(range(len(seqs))))
    want = _hand_stats(col.model, seqs, col.top_k, "softmax", topk_by_hand=True)
    got.layers = want.layers = list(range(len(got.layers)))
    assert got.tokens == sum(len(s) for s in seqs)  # padding excluded
    assert_stats_close(got, want, 1e-6)


def test_collector_matches_hand_computed_sigmoid_family(tmp_path):
    from model_dirs import write_tiny_model_dir

    d = write_tiny_model_dir(tmp_path / "ds3", family="deepseek_v3")
    col = RouterCollector(d)
    assert col.family.probs == "sigmoid" and col.layers == [1, 2]  # dense first layer skipped
    seqs = _sequences(4, seed=1)
    got = col.collect_batch(seqs, list(range(len(seqs))))
    want = _hand_stats(col.model, seqs, col.top_k, "sigmoid", topk_by_hand=False)
    for f in ("n", "sum_p", "sum_ppt", "entropy_sum"):
        np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=1e-6)
    np.testing.assert_array_equal(got.topk_count.sum(1), got.n * col.top_k)


@pytest.mark.parametrize("family", sorted(__import__("tiny_models").TINY_CONFIGS))
def test_every_family_matches_router_logits(family):
    from tiny_models import tiny_model

    col = RouterCollector(tiny_model(family))
    seqs = _sequences(3, seed=2)
    got = col.collect_batch([s % 120 + 3 for s in seqs], [0, 1, 2])
    want = _hand_stats(
        col.model, [s % 120 + 3 for s in seqs], col.top_k, col.family.probs, topk_by_hand=False
    )
    for f in ("n", "sum_p", "sum_ppt", "entropy_sum"):
        np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(got.topk_count.sum(1), got.n * col.top_k)
    assert np.all(got.topk_weight_sum >= 0)


def test_partial_wire_format_roundtrip(tiny_model_dir):
    col = RouterCollector(tiny_model_dir, reservoir=7)
    s = col.collect_batch(_sequences(), list(range(6)))
    back, meta = stats_from_bytes(stats_to_bytes(s, {"node": "n1"}))
    assert meta["node"] == "n1"
    assert_stats_close(s, back, 0.0)
    np.testing.assert_array_equal(back.reservoir.keys, s.reservoir.keys)
    np.testing.assert_array_equal(back.reservoir.probs, s.reservoir.probs)


def test_reservoir_is_split_invariant(tiny_model_dir, tmp_path):
    seqs = _sequences(12, seed=3)
    batches = make_batches(seqs, 4)

    def run(collector, tables):
        parts = []
        for t in tables:
            lens = np.asarray(t.column("lengths")[0].as_py())
            ids = np.asarray(t.column("ids")[0].as_py())
            parts.append(
                collector.collect_batch(np.split(ids, np.cumsum(lens)[:-1]), t.column("seq_ids")[0].as_py())
            )
        return RouterStats.sum(parts)

    one = run(RouterCollector(tiny_model_dir, reservoir=30), batches)
    split = run(RouterCollector(tiny_model_dir, reservoir=30), batches[1::2]).merge(
        run(RouterCollector(tiny_model_dir, reservoir=30), batches[0::2])
    )
    assert_stats_close(one, split, 1e-12)
    np.testing.assert_array_equal(one.reservoir.keys, split.reservoir.keys)
    np.testing.assert_array_equal(one.reservoir.token_ids, split.reservoir.token_ids)
    np.testing.assert_array_equal(one.reservoir.probs, split.reservoir.probs)
    # exactly the 30 tokens with the smallest keys over the whole stream
    all_keys = token_keys(np.arange(len(seqs)), np.asarray([len(s) for s in seqs]))
    np.testing.assert_array_equal(one.reservoir.keys, np.sort(all_keys)[:30])
    # and it survives save/load
    one.save(tmp_path)
    back = RouterStats.load(tmp_path)
    np.testing.assert_array_equal(back.reservoir.probs, one.reservoir.probs)
    assert back.reservoir.capacity == 30


COMMON = dict(target_tokens=3000, batch_size=8, seq_len=64, reservoir=40, progress=False)


def test_one_actor_two_actors_two_nodes_agree(
    ray_cluster, tiny_model_dir, corpus_file, tmp_path, monkeypatch
):
    import ray.data

    one = collect(tiny_model_dir, corpus_file, tmp_path / "one", workers=1, cpus_per_worker=1, **COMMON)
    # both collectors must be up before the batches are handed out, or the first one ready may
    # finish all of them while the other is still loading the model (on a busy machine)
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    two = collect(tiny_model_dir, corpus_file, None, workers=2, cpus_per_worker=1, **COMMON)
    node = ray_cluster.add_node(num_cpus=3)
    try:
        ray_cluster.wait_for_nodes()
        # 3 CPUs per actor: one fits on each node, so the two actors must run on different nodes
        nodes = collect(tiny_model_dir, corpus_file, None, workers=2, cpus_per_worker=3, **COMMON)
    finally:
        ray_cluster.remove_node(node)
    assert len(nodes.meta["nodes"]) == 2
    assert one.tokens == two.tokens == nodes.tokens == 3000
    for other in (two, nodes):
        assert_stats_close(one, other, 1e-9)
        np.testing.assert_array_equal(one.reservoir.keys, other.reservoir.keys)
        np.testing.assert_array_equal(one.reservoir.probs, other.reservoir.probs)
        assert other.meta["corpus_hash"] == one.meta["corpus_hash"]
    # the artifact
    saved = RouterStats.load(tmp_path / "one")
    assert_stats_close(one, saved, 0.0)
    meta = json.loads((tmp_path / "one" / "router_stats.json").read_text())
    assert meta["tokens"] == 3000 and meta["top_k"] == 2 and meta["num_experts"] == 4
    assert meta["identity"]["family"] == "gpt_oss" and meta["layers"] == [0, 1]
    assert len(meta["corpus_hash"]) == 64 and meta["corpus"]["files"] == 1
    assert not list(tmp_path.glob(".one.tmp-*"))


def test_cli_fewer_tokens_than_asked_warns_and_uses_all(
    ray_cluster, tiny_model_dir, corpus_file, tmp_path, caplog
):
    from nexus.cli import main

    out = tmp_path / "stats"
    argv = ["collect", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--output", str(out)]
    argv += ["--target-tokens", "100000000", "--seq-len", "128", "--batch-size", "16", "--no-progress"]
    with caplog.at_level(logging.WARNING, logger="nexus.collect"):
        assert main(argv) == 0
    assert "fewer than the 100000000 asked for" in caplog.text
    stats = RouterStats.load(out)
    assert 3000 < stats.tokens < 100000000
    assert stats.meta["target_tokens"] == 100000000
    assert main(argv) == 2  # exists, no --overwrite


def test_bad_inputs_are_one_line_errors(ray_cluster, tiny_model_dir, corpus_file, tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 16,
                "num_attention_heads": 4,
                "num_hidden_layers": 1,
                "vocab_size": 32,
            }
        )
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"content": "x"}) + "\n")
    notpq = tmp_path / "data.parquet"
    notpq.write_bytes(b"PAR1 garbage")
    cases = [
        (dict(model=dense, corpus=corpus_file), "not a Mixture-of-Experts"),
        (dict(model=tiny_model_dir, corpus=empty), "the corpus is empty"),
        (dict(model=tiny_model_dir, corpus=blank), "no text"),
        (dict(model=tiny_model_dir, corpus=nofield), "no field 'text'"),
        (dict(model=tiny_model_dir, corpus=notpq), "not a readable Parquet file"),
        (dict(model=tiny_model_dir, corpus=tmp_path / "missing.txt"), "not found"),
        (dict(model=tiny_model_dir, corpus=corpus_file, workers=64), "exceed the cluster"),
        (dict(model=tiny_model_dir, corpus=corpus_file, gpus_per_worker=1), "GPU"),
    ]
    for kwargs, message in cases:
        with pytest.raises(NexusError, match=message) as err:
            collect(output=tmp_path / "out", target_tokens=100, seq_len=64, progress=False, **kwargs)
        assert "\n" not in str(err.value)
        assert not (tmp_path / "out").exists()
