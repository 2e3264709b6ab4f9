"""Faults with real Ray processes: a node lost during collection, a training worker killed, the
job's driver killed mid-pipeline. Each run has to end with the answer a fault-free run gives.

All three use the session's ``ray.cluster_utils.Cluster`` (a 4-CPU head): collection adds a
worker node and removes it while its collector is busy; training kills one Ray Train worker
process with ``os._exit``; the job runs in a subprocess that joins the same cluster through
``RAY_ADDRESS`` (so killing it leaves no Ray instance of its own behind, and the cluster
cleans up the dead driver's actors) and is killed with SIGKILL once training has written a
checkpoint, then rerun. The faults are injected from the test side (tests/fault_hooks.py).

"The answer a fault-free run gives" is checked bit for bit: collection adds per-batch sums over
batches fixed by the driver in batch order, and training on CPU is deterministic (one thread per
worker, gloo's fixed reduction order, a resume restores parameters, AdamW moments, scheduler and
data position exactly), so a resumed run must reproduce every logged loss and the final adapter
exactly. A resume that restarted the optimizer or the schedule, re-initialised the adapter, or
repeated or skipped data would change them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fault_hooks import failing_training, slow_collector
from safetensors.numpy import load_file

import nexus.stages.train
from nexus.method.stats import RouterStats
from nexus.stages import collect

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("n", "sum_p", "sum_ppt", "topk_count", "topk_weight_sum", "entropy_sum")
#: what a training step logs that does not depend on timing
LOGGED = ("loss", "ce", "kd", "router_kl", "lr", "grad_norm", "tokens", "epoch", "eval_loss")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from model_dirs import sample_texts

    d = tmp_path_factory.mktemp("fault_corpus")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(300)))
    return d


def assert_same_training(run: Path, reference: Path) -> None:
    """Every step's logged numbers and the final adapter equal the reference run's, exactly."""
    got = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert {k: a[k] for k in LOGGED if k in b} == {k: b[k] for k in LOGGED if k in b}, a["step"]
    adapter, expected = (
        load_file(str(run / "adapter" / "adapter.safetensors")),
        load_file(str(reference / "adapter" / "adapter.safetensors")),
    )
    assert sorted(adapter) == sorted(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(adapter[name], tensor, err_msg=name)


def _wait_for(condition, timeout: float, what: str, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if not alive():
            raise AssertionError(f"stopped before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- 1. a worker node removed in the middle of collection ----------------------------------------


def _hold_all_but_one_cpu_of_the_head():
    """An actor pinned to the head (where this driver runs) holding all its free CPUs but one."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = ray.get_runtime_context().get_node_id()
    cpus = int(next(n["Resources"]["CPU"] for n in ray.nodes() if n["NodeID"] == head))
    # earlier tests' actors and nodes may still be going away: wait until the head is all there is
    settled = lambda: ray.available_resources().get("CPU", 0) == cpus  # noqa: E731
    _wait_for(settled, 120, "the head to be the only node, with all its CPUs free")

    @ray.remote
    class Hold:
        def ready(self) -> bool:
            return True

    hold = Hold.options(
        num_cpus=cpus - 1, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)
    ).remote()
    ray.get(hold.ready.remote(), timeout=60)
    return hold


COMMON = dict(target_tokens=2000, batch_size=4, seq_len=64, reservoir=20, progress=False)


def test_collection_survives_losing_a_node(ray_cluster, tiny_model_dir, corpus, tmp_path, monkeypatch):
    import ray
    import ray.data

    reference = collect.run(
        model=tiny_model_dir, corpus=corpus / "train.jsonl", workers=1, cpus_per_worker=1, **COMMON
    )
    # both collectors must be up before the batches are handed out, or the head's collector
    # may finish them all while the one on the new node is still loading the model
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    # every batch takes 0.3 s longer and leaves a file named after its node
    markers = tmp_path / "busy"
    markers.mkdir()
    monkeypatch.setattr(collect, "RouterCollector", slow_collector(0.3, str(markers)))

    # exactly one collector slot on the head and one on the new node, so that one collector runs
    # where the node will be lost (SPREAD is only best effort: both may land on the head);
    # releasing the head's other CPUs when the node goes gives the lost collector room to restart
    hold = _hold_all_but_one_cpu_of_the_head()
    node = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    result: dict = {}

    def run() -> None:
        try:
            result["stats"] = collect.run(
                model=tiny_model_dir,
                corpus=corpus / "train.jsonl",
                output=tmp_path / "stats",
                workers=2,
                cpus_per_worker=1,
                **COMMON,
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    worker = threading.Thread(target=run)
    t0 = time.monotonic()
    worker.start()
    removed = False
    try:
        # the node's collector is in the middle of a batch: remove the node under it
        busy = lambda: any(p.name.startswith(node.node_id) for p in markers.iterdir())  # noqa: E731
        _wait_for(busy, 300, "the worker node's collector to start a batch", alive=worker.is_alive)
        batches_before = len(list(markers.iterdir()))
        ray_cluster.remove_node(node)
        removed = True
        ray.kill(hold)
        worker.join(timeout=300)
    finally:
        ray.kill(hold)
        if not removed:
            ray_cluster.remove_node(node)
    assert not worker.is_alive(), "collection did not finish after the node was removed"
    assert "error" not in result, result.get("error")
    stats = result["stats"]
    print(
        f"collection with a lost node: {time.monotonic() - t0:.1f}s, node removed after {batches_before} batches"
    )

    # the node was lost with a batch in flight, which ran again on the head ...
    executions = [p.name for p in markers.iterdir()]
    batches = -(-stats.meta["sequences"] // COMMON["batch_size"])
    assert any(name.startswith(node.node_id) for name in executions)
    assert len(executions) > batches, (len(executions), batches)
    # ... and the answer is the fault-free one, bit for bit
    assert stats.tokens == reference.tokens == 2000
    assert stats.meta["corpus_hash"] == reference.meta["corpus_hash"]
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(stats, f), getattr(reference, f), err_msg=f)
    np.testing.assert_array_equal(stats.reservoir.keys, reference.reservoir.keys)
    np.testing.assert_array_equal(stats.reservoir.probs, reference.reservoir.probs)
    saved = RouterStats.load(tmp_path / "stats")
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(saved, f), getattr(stats, f))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "stats"]  # no temporary left


# -- 2. a training worker process killed mid-run -------------------------------------------------


def _killed_worker_config(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, name: str, strategy: str
) -> dict:
    return dict(
        model=str(tiny_model_dir),
        corpus=[str(corpus / "train.jsonl")],
        output=str(tmp_path / name),
        workers=2,
        strategy=strategy,
        max_steps=4,
        batch_size=2,
        seq_len=32,
        lr=5e-3,
        warmup_steps=1,
        checkpoint_every=2,
        init="random",
        max_failures=1,
        storage_path=str(tmp_path / "ray"),
        name=name,
    )


# fsdp: extended (NEXUS_EXTENDED=1); a one-worker run loading an fsdp checkpoint exactly is in
# tests/test_fsdp.py
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.extended)])
def test_training_survives_a_killed_worker(
    ray_cluster, tiny_model_dir, corpus, tmp_path, monkeypatch, strategy
):
    """Under FSDP too: the restarted workers re-shard the gathered checkpoint and continue
    exactly (same reduction order in a fault-free run and a resumed one)."""
    config = lambda name: _killed_worker_config(tiny_model_dir, corpus, tmp_path, name, strategy)  # noqa: E731
    reference = nexus.stages.train.run(**config("reference"))

    marker = tmp_path / "killed"
    # rank 1 exits at step 3, once Ray Train has committed the step-2 checkpoint (its controller
    # polls the workers' reports, every 0.1 s in the tests; a worker dying before that loses the
    # checkpoint)
    loop = failing_training(
        step=3,
        rank=1,
        mode="exit",
        marker=str(marker),
        await_checkpoint=str(tmp_path / "ray" / "killed-worker"),
        wait_s=1,
    )
    monkeypatch.setattr(nexus.stages.train, "train_loop_per_worker", loop)
    t0 = time.monotonic()
    out = nexus.stages.train.run(**config("killed-worker"))
    print(f"training with a killed worker ({strategy}): {time.monotonic() - t0:.1f}s")

    assert marker.read_text() == "3"  # rank 1 really died (os._exit) at step 3
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["resumes"] == [2]  # restarted once, from the step-2 checkpoint
    assert summary["checks"]["replicas_identical"]
    assert_same_training(out, reference)


# -- 3. the driver killed mid-pipeline, then the job rerun -----------------------------------------


STEPS, CHECKPOINT_EVERY = 12, 5


def _job_config(corpus_dir: Path, model_dir: Path, output: Path) -> dict:
    """The tiny job without sampling and evaluation, training long enough to be killed mid-run."""
    from test_job import tiny_job_config

    return tiny_job_config(
        corpus_dir,
        model_dir,
        output,
        data={"eval": {"domain": [str(corpus_dir / "domain_heldout.parquet")]}},
        sample={"enabled": False},
        collect={"target_tokens": 1000, "cpus_per_worker": 1},
        train={"max_steps": STEPS, "batch_size": 2, "warmup_steps": 2, "checkpoint_every": CHECKPOINT_EVERY},
        evaluate={"enabled": False},
    )


def _committed_checkpoints(storage: Path) -> list:
    """Checkpoints Ray Train has committed (listed in its run's checkpoint manager snapshot)."""
    found = []
    for snapshot in storage.glob("train-*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(OSError, ValueError):  # being written
            found += json.loads(snapshot.read_text()).get("checkpoint_results", [])
    return found


def _fault_free_training(config: Path, tmp_path: Path) -> Path:
    """The job's train stage run again without a fault, on the same inputs (the job's convert
    adapter), with its own output and Ray Train run."""
    from nexus.job.config import load_config
    from nexus.job.run import JobContext
    from nexus.stages import BY_NAME

    cfg = JobContext(load_config(config)).stage_config(BY_NAME["train"])
    return nexus.stages.train.run(
        cfg,
        output=str(tmp_path / "reference"),
        storage_path=str(tmp_path / "reference-ray"),
        name="reference",
    )


def test_job_killed_during_training_resumes_on_rerun(ray_cluster, demo_tiny, tmp_path, capsys):
    from nexus.cli import main

    corpus_dir, model_dir = demo_tiny
    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_job_config(corpus_dir, model_dir, out)))
    log = tmp_path / "driver.log"
    # The driver joins the session's cluster. Its job's runtime environment installs a worker
    # setup hook (tests/fault_hooks.py) that holds training at the step after the first
    # checkpoint, so the kill lands mid-training at a known step on any machine.
    runtime_env = {
        "worker_process_setup_hook": "fault_hooks.pause_training",
        "env_vars": {"PYTHONPATH": str(ROOT / "tests"), "NEXUS_TEST_PAUSE_STEP": str(CHECKPOINT_EVERY)},
    }
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.address,
        "NEXUS_RAY_LOGS": "0",
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": runtime_env}),
    }
    t0 = time.monotonic()
    with open(log, "w") as f:
        driver = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "specialize.py"), "--config", str(config)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        alive = lambda: driver.poll() is None  # noqa: E731
        _wait_for(lambda: _committed_checkpoints(out / ".ray"), 420, "a training checkpoint", alive=alive)
        # training is held at the next step, so waiting costs nothing: let Ray Train finish
        # persisting the checkpoint's bookkeeping (its controller polls every 0.1 s in the
        # tests, conftest.py) on a busy machine too
        time.sleep(3)
    except AssertionError:
        driver.kill()
        raise AssertionError(log.read_text()[-3000:]) from None
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    killed_at = time.monotonic() - t0
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-3000:]

    # the finished stages are complete, the interrupted one left no artifact that looks finished
    for stage in ("collect", "analyze", "convert"):
        assert (out / stage / "manifest.json").is_file(), stage
    assert not (out / "train").exists()
    assert any(p.name.startswith(".train.tmp-") for p in out.iterdir())  # what SIGKILL left behind

    capsys.readouterr()
    t1 = time.monotonic()
    assert main(["specialize", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    print(f"driver killed after {killed_at:.1f}s; rerun {time.monotonic() - t1:.1f}s\n{printed}")
    for stage in ("collect", "analyze", "convert"):
        assert f"{stage:<10} up to date" in printed, printed
    assert f"{'train':<10} ran" in printed, printed

    summary = json.loads((out / "train" / "train_summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["resumes"] == [CHECKPOINT_EVERY]  # resumed from the checkpoint before the kill
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert not any(p.name.startswith(".train.") for p in out.iterdir())  # the stale temporary is gone

    # and it ends where a run that was never interrupted ends
    assert_same_training(out / "train", _fault_free_training(config, tmp_path))
