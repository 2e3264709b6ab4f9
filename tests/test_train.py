"""Stage 5: losses, schedule, and real Ray Train runs (2 workers, resume, teacher check)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from model_dirs import sample_texts

import nexus
from nexus.stages import train
from nexus.stages.train import TrainConfig
from nexus.stages.train.core import compute_losses, evaluate_sums, prepare_model
from nexus.stages.train.losses import chunked_lm_losses


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    texts = sample_texts(600)
    cut = len(texts) * 4 // 5
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:cut]))
    (d / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[cut:]))
    return d


def _cfg(model_dir, corpus, out, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        corpus=[str(corpus / "train.jsonl")],
        output=str(out),
        workers=2,
        max_steps=8,
        batch_size=2,
        seq_len=32,
        lr=5e-3,
        warmup_steps=2,
        checkpoint_every=3,
        init="random",
        kd_weight=0.5,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _ids(shape=(2, 24)):
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(0))


def test_chunked_losses_equal_the_models_own_loss(tiny_model_dir):
    model = nexus.load_model(tiny_model_dir)
    ids = _ids()
    with torch.no_grad():
        reference = model(ids, labels=ids).loss
        hidden = model.base_model(input_ids=ids).last_hidden_state
        for chunk in (1, 5, 1000):
            parts = chunked_lm_losses(model, hidden, ids, hidden, chunk_size=chunk, temperature=2.0)
            torch.testing.assert_close(parts.ce_sum / parts.tokens, reference, rtol=1e-5, atol=1e-6)
            assert parts.kd_sum.item() == 0.0  # teacher == student


def test_chunked_gradients_match_unchunked(tiny_model_dir):
    cfg = TrainConfig(
        model=str(tiny_model_dir), corpus=["x"], output="o", init="random", kd_weight=1.0, kd_temperature=2.0
    )
    grads = []
    for chunk in (4, 1000):
        cfg.loss_chunk = chunk
        model = prepare_model(cfg, torch.device("cpu"))
        from nexus.stages.train.core import Backbone

        compute_losses(model, Backbone(model), _ids(), cfg).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_teacher_check_kd_is_exactly_zero_at_step_zero(tiny_model_dir):
    cfg = TrainConfig(model=str(tiny_model_dir), corpus=["x"], output="o", init="zero", kd_weight=1.0)
    model = prepare_model(cfg, torch.device("cpu"))
    from nexus.stages.train.core import Backbone

    out = compute_losses(model, Backbone(model), _ids(), cfg)
    assert out.kd == 0.0
    out.loss.backward()  # the student still gets a CE gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_checkpointed_step_leaves_no_shared_expert_output_behind(tiny_model_dir):
    """A checkpointed layer's recomputation must run to the shared expert's post-hook: stopped
    early, each MoE block kept its shared expert's output and recomputed graph until its next
    forward (the shared experts' activations of every layer, held through the next step)."""
    from nexus.models import find_moe_blocks
    from nexus.stages.train.core import Backbone

    cfg = TrainConfig(
        model=str(tiny_model_dir), corpus=["x"], output="o", init="random", gradient_checkpointing=True
    )
    model = prepare_model(cfg, torch.device("cpu"))
    compute_losses(model, Backbone(model), _ids(), cfg).loss.backward()
    assert [b.layer for b in find_moe_blocks(model) if "_nexus_out" in b.module.__dict__] == []


def test_config_rejects_bad_values():
    def rejects(match: str, **kw) -> None:
        with pytest.raises(nexus.NexusError, match=match) as info:
            TrainConfig.build(model="m", corpus=["c"], output="o", **kw)
        assert "\n" not in str(info.value)

    rejects("train setting 'batch_size': Input should be greater than 0", batch_size=0)
    rejects("train setting 'max_steps': Input should be greater than 0", max_steps=-3)
    rejects("unknown train setting 'learning_rate'", learning_rate=1)
    rejects("router_kl_weight needs train_router", router_kl_weight=0.1)
    rejects("give a training length", max_steps=None)


@pytest.mark.slow
def test_two_worker_run_trains_only_the_adapter_and_ranks_agree(ray_cluster, demo_tiny, tmp_path):
    corpus_dir, model_dir = demo_tiny
    eval_corpus = str(corpus_dir / "domain_heldout.parquet")
    train_corpus = str(corpus_dir / "domain.parquet")
    cfg = TrainConfig(
        model=str(model_dir),
        corpus=[train_corpus],
        output=str(tmp_path / "out"),
        workers=2,
        max_steps=30,
        batch_size=4,
        seq_len=64,
        lr=3e-3,
        warmup_steps=3,
        checkpoint_every=15,
        kd_weight=0.5,
        eval_every=15,
        eval_corpus=[eval_corpus],
        eval_batches=2,
        storage_path=str(tmp_path / "ray"),
        verify_base=True,
    )
    out = train.run(cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(0, 31))
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"] - 0.01, (metrics[0], metrics[-1])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["checks"]["replicas_identical"] and len(summary["checks"]["replica_digests"]) == 2
    assert summary["checks"]["base_unchanged"] is True
    assert (out / "train_curves.png").stat().st_size > 0

    # The two ranks consumed disjoint data: exactly their shares of the packed blocks (global
    # micro-batches 0, 2, 4, ... and 1, 3, 5, ...), as recorded by their data digests.
    from test_train_data import expected_data_digests

    from nexus.stages.train.data import packed_dataset, rank_batches

    train_ds = packed_dataset([train_corpus], str(model_dir), seq_len=cfg.seq_len)
    blocks = np.stack([np.asarray(r["input_ids"], dtype=np.int64) for r in train_ds.take_all()])
    digests = summary["checks"]["data_digests"]
    assert digests == expected_data_digests(blocks, world=2, batch_size=4, micro_batches=30)
    assert digests[0] != digests[1]

    # The saved adapter reproduces the trained model: same held-out loss on the same blocks.

    model = nexus.load_model(model_dir)
    nexus.load_adapter(model, out / "adapter")
    eval_ds = packed_dataset([eval_corpus], str(model_dir), seq_len=cfg.seq_len)
    nll = n = 0.0
    for rank in range(2):
        batches = [b for b, _ in rank_batches(eval_ds, batch_size=4, rank=rank, world=2, cycle=False)][:2]
        s, k = evaluate_sums(model, batches)
        nll, n = nll + s, n + k
    assert math.isclose(nll / n, metrics[-1]["eval_loss"], rel_tol=1e-5)


@pytest.mark.slow
def test_relaunch_resumes_from_the_last_checkpoint(
    ray_cluster, tiny_model_dir, corpus, tmp_path, monkeypatch
):
    from fault_hooks import failing_training

    reference = train.run(
        _cfg(tiny_model_dir, corpus, tmp_path / "ref", storage_path=str(tmp_path / "ray"), name="ref")
    )
    ref = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]

    cfg = _cfg(
        tiny_model_dir,
        corpus,
        tmp_path / "out",
        storage_path=str(tmp_path / "ray"),
        name="interrupted",
        report_to=["tensorboard"],
    )
    loop = failing_training(
        step=5,
        rank=1,
        mode="raise",
        marker=str(tmp_path / "fault-fired"),
        await_checkpoint=str(tmp_path / "ray" / "interrupted"),  # the step-3 one is committed
    )
    monkeypatch.setattr(train, "train_loop_per_worker", loop)
    with pytest.raises(Exception, match="injected training fault"):
        train.run(cfg)
    assert not (tmp_path / "out").exists()  # nothing half-written
    out = train.run(cfg)  # same name and storage: resumes from the step-3 checkpoint
    got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got] == list(range(1, 9))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumes"] == [3]
    # the resumed ranks continued their data exactly where the checkpoint left them
    ref_summary = json.loads((reference / "train_summary.json").read_text())
    assert summary["checks"]["data_digests"] == ref_summary["checks"]["data_digests"]
    for a, b in zip(ref[3:], got[3:]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a["loss"], b["loss"])
    # TensorBoard shows the resumed curve: the failed attempt's steps 4-5 are purged, not doubled
    loss = [(m["step"], float(np.float32(m["loss"]))) for m in got]
    assert _event_scalars(out / "tensorboard")["loss"] == loss
    # one event file per attempt, written by rank 0 alone (of 2 workers)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2


def _event_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve TensorBoard itself reads back from the event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_holds_the_metrics_jsonl_curves(ray_cluster, tiny_model_dir, corpus, tmp_path):
    """report_to=[tensorboard]: one point per step of every metric, equal to metrics.jsonl (as
    float32, TensorBoard's scalar type), held-out metrics at the steps that evaluated (and
    step 0), and the run's events land in <output>/tensorboard. One worker keeps it cheap; the
    relaunch test above checks that only rank 0 of two writes."""
    cfg = _cfg(
        tiny_model_dir,
        corpus,
        tmp_path / "out",
        workers=1,
        max_steps=4,
        checkpoint_every=2,
        eval_every=2,
        eval_batches=1,
        eval_corpus=[str(corpus / "eval.jsonl")],
        storage_path=str(tmp_path / "ray"),
        report_to=["tensorboard"],
    )
    out = train.run(cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curves = _event_scalars(out / "tensorboard")

    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    expected: dict[str, list] = {}
    for row in metrics:
        for key, value in row.items():
            if key != "step":
                expected.setdefault(key, []).append((row["step"], float(np.float32(value))))
    assert curves == expected
    assert [s for s, _ in curves["loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in curves["eval_loss"]] == [0, 2, 4]
