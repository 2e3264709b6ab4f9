"""Offline distillation: ``nexus distill``'s teacher rows and ``train.kd: offline``.

- the offline KL equals online KD's loss and gradients when k is the vocabulary, and is below it
  (monotone in k) otherwise;
- teacher shards from 1 and 2 actors are the same bytes;
- the teacher rows a training rank reads line up with its blocks token by token, a shuffled or
  dropped row is detected, and a resumed rank reads the rows it would have read;
- a real offline training run (2 workers, a worker killed and restarted) reads the right rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from nexus.errors import NexusError
from nexus.stages import distill, train
from nexus.stages.train import TrainConfig
from nexus.stages.train.core import Backbone, compute_losses, prepare_model
from nexus.stages.train.data import (
    TeacherRows,
    block_digest,
    packed_dataset,
    rank_batches,
    rank_teacher_batches,
)

SEQ, BATCH, STEPS, WORKERS = 32, 2, 6, 2


def _ids(vocab: int, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(0))


def _losses_and_grads(model, cfg, ids, teacher=None):
    model.zero_grad(set_to_none=True)
    out = compute_losses(model, Backbone(model), ids, cfg, teacher_rows=teacher)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return out, grads


def _teacher_rows(model_dir, ids, k: int, temperature: float = 1.0) -> TeacherRows:
    scorer = distill.TeacherScorer(str(model_dir), seq_len=ids.shape[1], top_k=k, temperature=temperature)
    top, logp, rest = scorer.score(ids)
    return TeacherRows(torch.from_numpy(top).long(), torch.from_numpy(logp), torch.from_numpy(rest))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_offline_kd_with_the_whole_vocabulary_equals_online_kd(tiny_model_dir, temperature):
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        corpus=["x"],
        output="o",
        init="random",
        kd_temperature=temperature,
        loss_chunk=7,
    )
    model = prepare_model(cfg, torch.device("cpu"))
    vocab = model.config.vocab_size
    ids = _ids(vocab)
    online, g_online = _losses_and_grads(model, cfg, ids)
    rows = _teacher_rows(tiny_model_dir, ids, vocab, temperature)
    assert torch.isinf(rows.rest).all()  # k = V: nothing outside the top-k
    offline, g_offline = _losses_and_grads(model, cfg.model_copy(update={"kd": "offline"}), ids, rows)
    assert online.kd > 1e-4  # a random shared expert: the KD term is not trivially zero
    # fp32 rounding only: the same terms summed in another order (top-k order vs vocabulary order),
    # and the teacher forward run by another model object on the same weights
    assert offline.ce == pytest.approx(online.ce, rel=1e-6)
    assert offline.kd == pytest.approx(online.kd, rel=1e-5)
    assert float(offline.loss.detach()) == pytest.approx(float(online.loss.detach()), rel=1e-5)
    for a, b in zip(g_online, g_offline):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_top_k_kl_grows_with_k_up_to_the_full_kl(tiny_model_dir):
    """Merging the tokens outside the top-k into one outcome can only lose information (the
    data-processing inequality), and top-k partitions refine as k grows: KL(8) <= KL(32) <= KL(V)."""
    cfg = TrainConfig(model=str(tiny_model_dir), corpus=["x"], output="o", init="random", kd="offline")
    model = prepare_model(cfg, torch.device("cpu"))
    vocab = model.config.vocab_size
    ids = _ids(vocab)
    with torch.no_grad():
        kls = [
            compute_losses(
                model, Backbone(model), ids, cfg, teacher_rows=_teacher_rows(tiny_model_dir, ids, k)
            ).kd
            for k in (1, 8, 32, vocab)
        ]
    assert all(a <= b * (1 + 1e-6) for a, b in zip(kls, kls[1:])), kls
    assert kls[0] < kls[-1]


def test_top_k_kl_and_its_gradient_are_the_bucketed_kl():
    """offline_kl (the lean Function for the student's mass outside the top-k) against the
    textbook KL between the two (k + 1)-outcome distributions in float64: value and gradient
    with respect to the logits agree to float32 rounding (the loss runs in float32)."""
    from nexus.stages.train.losses import offline_kl

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 6, 300, generator=g, dtype=torch.float64)).requires_grad_(True)
    teacher = (3 * torch.randn(4, 6, 300, generator=g, dtype=torch.float64)).log_softmax(-1)
    logp_t, ids = teacher.topk(16, dim=-1)
    rest_t = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
    log_q = logits.log_softmax(-1)
    q_top, q_rest = log_q.gather(-1, ids), log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    ref = (logp_t.exp() * (logp_t - q_top)).sum(-1) + rest_t.exp() * (rest_t - q_rest)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits, retain_graph=True)

    z = logits.detach().float().requires_grad_(True)
    got = offline_kl(z.log_softmax(-1), ids, logp_t.float(), rest_t.float())
    got.sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)

    # the fused CE + KL of the training step (temperature 1): values and gradients of both sums,
    # with masked positions, against the same textbook formulas
    from nexus.stages.train.losses import _OfflineLosses

    labels = torch.randint(0, 300, (4, 6), generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.2
    ce_ref = -(log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum()
    kd_ref = (ref * mask).sum()
    grads_ref = [torch.autograd.grad(x, logits, retain_graph=True)[0] for x in (ce_ref, kd_ref)]
    z = logits.detach().float().requires_grad_(True)
    ce, kd = _OfflineLosses.apply(z, labels, mask, ids, logp_t.float(), rest_t.float())
    for value, expected, grad_ref in zip((ce, kd), (ce_ref, kd_ref), grads_ref):
        (grad,) = torch.autograd.grad(value, z, retain_graph=True)
        torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-6)


# -- the stage on Ray ------------------------------------------------------------------------------
def _distill(demo_tiny, out: Path, **kw) -> Path:
    corpus_dir, model_dir = demo_tiny
    args = dict(
        model=model_dir,
        corpus=[corpus_dir / "domain.parquet"],
        output=out,
        seq_len=SEQ,
        batch_size=BATCH,
        train_workers=WORKERS,
        steps=STEPS,
        top_k=16,
        shard_blocks=5,
    )
    return distill.run(**{**args, **kw})


@pytest.fixture(scope="module")
def teacher(ray_cluster, demo_tiny, tmp_path_factory) -> Path:
    return _distill(demo_tiny, tmp_path_factory.mktemp("distill") / "one", workers=1)


def _files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.parquet"))}


def test_one_and_two_actors_write_the_same_shards(teacher, demo_tiny, tmp_path):
    two = _distill(demo_tiny, tmp_path / "two", workers=2)
    m1, m2 = distill.read_manifest(teacher), distill.read_manifest(two)
    assert m1["blocks"] == BATCH * WORKERS * STEPS == 24 and len(m1["shards"]) == 5
    assert _files(teacher) == _files(two)
    assert m1["data_hash"] == m2["data_hash"] and (m1["workers"], m2["workers"]) == (1, 2)
    # the mass the top-k leaves to the rest bucket, as stored in the shards
    rest = np.concatenate(
        [
            np.concatenate(pq.read_table(f).column("rest").to_pylist())
            for f in sorted(teacher.glob("*.parquet"))
        ]
    )
    assert len(rest) == m1["tokens"]
    assert m1["mean_mass_outside_top_k"] == pytest.approx(float(np.exp(rest).mean()), abs=2e-6)
    assert 0 < m1["mean_mass_outside_top_k"] < 1


_BLOCKS: dict = {}


def _blocks(demo_tiny):
    """Training's packed blocks (built once per session)."""
    if "ds" not in _BLOCKS:
        corpus_dir, model_dir = demo_tiny
        _BLOCKS["ds"] = packed_dataset([str(corpus_dir / "domain.parquet")], str(model_dir), seq_len=SEQ)
    return _BLOCKS["ds"]


def _aligned(demo_tiny, teacher_dir: Path, cache: bool = False):
    if cache and "aligned" in _BLOCKS:
        return _BLOCKS["aligned"]
    manifest = distill.read_manifest(teacher_dir)
    ds = distill.aligned_dataset(_blocks(demo_tiny), str(teacher_dir), manifest, BATCH * WORKERS * STEPS)
    if cache:
        _BLOCKS["aligned"] = ds
    return ds


def test_each_rank_reads_the_teacher_rows_of_its_own_blocks(teacher, demo_tiny):
    _, model_dir = demo_tiny
    ds = _aligned(demo_tiny, teacher, cache=True)
    scorer = distill.TeacherScorer(str(model_dir), seq_len=SEQ, top_k=16)
    for rank in range(WORKERS):
        plain = rank_batches(_blocks(demo_tiny), batch_size=BATCH, rank=rank, world=WORKERS, cycle=False)
        paired = rank_teacher_batches(ds, batch_size=BATCH, rank=rank, world=WORKERS, cycle=False)
        n = 0
        for (ids, _), (ids2, _, rows) in zip(plain, paired):
            assert torch.equal(ids, ids2)  # the same blocks as online training reads
            top, logp, rest = scorer.score(ids)  # the teacher, token by token
            # ids exactly; log-probabilities to fp32 rounding (the actor ran with 1 thread, this
            # process with several: another summation order inside the matmuls)
            assert np.array_equal(rows.ids.numpy(), top)
            np.testing.assert_allclose(rows.logp.numpy(), logp, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(rows.rest.numpy(), rest, rtol=1e-5, atol=1e-6)
            n += 1
        assert n == STEPS


def test_resumed_rank_reads_the_rows_it_would_have_read(teacher, demo_tiny):
    ds = _aligned(demo_tiny, teacher, cache=True)
    full = list(rank_teacher_batches(ds, batch_size=BATCH, rank=1, world=WORKERS, cycle=False))
    resumed = list(rank_teacher_batches(ds, batch_size=BATCH, rank=1, world=WORKERS, skip=4, cycle=False))
    assert len(resumed) == len(full) - 4
    for (a, _, ra), (b, _, rb) in zip(full[4:], resumed):
        assert torch.equal(a, b) and torch.equal(ra.ids, rb.ids) and torch.equal(ra.logp, rb.logp)


def _rewrite(teacher: Path, dest: Path, change) -> Path:
    shutil.copytree(teacher, dest)
    shard = dest / "teacher-00000.parquet"
    pq.write_table(change(pq.read_table(shard)), shard)
    return dest


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.take([1, 0, *range(2, t.num_rows)]),  # two rows swapped
        lambda t: t.slice(1),  # a row dropped
        lambda t: t.take([0, 0, *range(2, t.num_rows)]),  # a row replaced by its neighbour
    ],
    ids=["shuffled", "dropped", "replaced"],
)
def test_a_shuffled_or_dropped_teacher_row_is_detected(teacher, demo_tiny, tmp_path, change):
    bad = _rewrite(teacher, tmp_path / "bad", change)
    with pytest.raises(NexusError, match="block [01]'s tokens differ|covers 23 blocks"):
        _aligned(demo_tiny, bad)


def test_workers_check_every_row_they_read(teacher, demo_tiny):
    """The driver's check aside, a rank refuses a row whose digest is not its block's (here the
    teacher rows are zipped one block off)."""
    blocks = _blocks(demo_tiny)
    rows = distill.teacher_dataset(str(teacher), distill.read_manifest(teacher))
    aligned = blocks.limit(12).zip(rows.limit(12)).materialize()
    assert len(list(rank_teacher_batches(aligned, batch_size=BATCH, rank=0, world=1, cycle=False))) == 6
    skewed = blocks.limit(12).zip(rows.filter(lambda r: r["block"] > 0).limit(12)).materialize()
    with pytest.raises(NexusError, match="does not line up with the training block"):
        next(rank_teacher_batches(skewed, batch_size=BATCH, rank=0, world=1))


@pytest.mark.slow
@pytest.mark.extended  # Ray Train's restart is the fault test's; the rows a resumed rank reads: above
def test_offline_training_survives_a_killed_worker_on_the_right_rows(
    teacher, demo_tiny, tmp_path, monkeypatch
):
    """Two workers, kd offline; rank 1 dies at step 4 and Ray Train restarts both from the step-3
    checkpoint. Every row they read is checked against its block (a wrong row fails the run), and
    the data hash chains equal those of the blocks the assignment rule gives each rank."""
    from fault_hooks import failing_training

    from nexus.stages.train.loop import _chain_digest

    corpus_dir, model_dir = demo_tiny
    cfg = TrainConfig(
        model=str(model_dir),
        corpus=[str(corpus_dir / "domain.parquet")],
        output=str(tmp_path / "out"),
        storage_path=str(tmp_path / "ray"),
        name="offline",
        kd="offline",
        teacher=str(teacher),
        workers=WORKERS,
        max_steps=STEPS,
        batch_size=BATCH,
        seq_len=SEQ,
        checkpoint_every=3,
        max_failures=1,
        init="random",
    )
    loop = failing_training(
        step=4,
        rank=1,
        mode="exit",
        marker=str(tmp_path / "fired"),
        await_checkpoint=str(tmp_path / "ray" / "offline"),
    )
    monkeypatch.setattr(train, "train_loop_per_worker", loop)
    out = train.run(cfg)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumes"] == [3] and (tmp_path / "fired").exists()
    expected = []
    for rank in range(WORKERS):
        chain = ""
        mine = rank_batches(_blocks(demo_tiny), batch_size=BATCH, rank=rank, world=WORKERS, cycle=False)
        for ids, _ in itertools.islice(mine, STEPS):
            chain = _chain_digest(chain, ids)
        expected.append(chain)
    assert summary["checks"]["data_digests"] == expected
    assert summary["final"]["kd"] > 0


def test_block_digest_is_of_the_tokens():
    a = np.arange(8, dtype=np.int32)
    assert block_digest(a) == block_digest(a.astype(np.int64)) != block_digest(a[::-1])


def test_the_planner_counts_teacher_rows_instead_of_a_teacher_forward(tiny_model_dir):
    from nexus.models.loading import load_config
    from nexus.planner import Workload, model_facts, training_phases
    from nexus.planner.terms import teacher_bytes_per_token

    f = model_facts(load_config(tiny_model_dir))
    w = Workload("train", "cpu", 1, 4, 32, "float32", "dequantized", teacher="online")
    online = training_phases(f, w)
    offline = training_phases(f, replace(w, teacher="offline", teacher_k=32))
    assert teacher_bytes_per_token(32) == 32 * (4 + 4) + 4  # int32 id + float32 log-prob each, one rest
    assert "teacher forward" in online and "teacher forward" not in offline
    assert offline["loss"]["teacher rows"] == 4 * 32 * teacher_bytes_per_token(32)
    assert "teacher hidden states" not in offline["loss"]


def test_the_job_runs_distill_for_offline_kd_over_trains_blocks(tiny_model_dir, tmp_path):
    from nexus.job.config import parse_config
    from nexus.job.run import JobContext
    from nexus.stages import BY_NAME

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a b c"}\n')
    base = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": [str(corpus)]},
        "output": str(tmp_path / "o"),
    }
    train_section = {"max_steps": 7, "batch_size": 3, "workers": 2, "seq_len": 64, "kd_temperature": 2.0}
    job = JobContext(
        parse_config({**base, "train": {**train_section, "kd": "offline"}, "distill": {"top_k": 8}})
    )
    assert job.enabled("distill")
    d = job.stage_config(BY_NAME["distill"])
    assert (d.steps, d.batch_size, d.train_workers, d.seq_len, d.kd_temperature, d.top_k) == (
        7,
        3,
        2,
        64,
        2.0,
        8,
    )
    # training's block layout is fingerprinted: changing train.max_steps reruns distill
    assert d.fingerprint(job.identity)["inputs"]["steps"] == 7
    assert job.stage_config(BY_NAME["train"]).teacher == job.stage_dir("distill")
    online = JobContext(parse_config({**base, "train": train_section}))
    assert not online.enabled("distill") and online.stage_config(BY_NAME["train"]).teacher is None
