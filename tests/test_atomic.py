"""Atomic artifacts: a stage that fails half-way through writing leaves neither a partial
artifact nor a manifest that claims it finished, keeps the previous artifact intact, and a
temporary directory left by a killed writer is removed by the next writer."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess

import numpy as np
import pytest

from nexus.job.runner import MANIFEST, Stage, read_manifest, run_stages
from nexus.util.artifacts import atomic_dir


def _hidden(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_stage_failing_mid_write_never_looks_finished(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    import nexus.job.runner
    import nexus.stages.analyze
    from nexus.job.config import parse_config
    from nexus.job.run import JobContext, build_stages
    from nexus.models.identity import model_identity
    from nexus.stages.collect import RouterCollector

    out = tmp_path / "run"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "unused: the statistics come from the stand-in below"}) + "\n")
    cfg = parse_config(
        {
            "output": str(out),
            "model": {"path": str(tiny_model_dir)},
            "data": {"train": [str(corpus)], "eval": {}},
            "analyze": {"top_k": 2, "plots": True},
        }
    )
    analyze = next(s for s in build_stages(JobContext(cfg)) if s.name == "analyze")  # the real stage

    def collect_stand_in(directory, fingerprint):  # real statistics of the model, without Ray Data
        collector = RouterCollector(tiny_model_dir)
        rng = np.random.default_rng(0)
        stats = collector.collect_batch([rng.integers(3, 300, 40) for _ in range(4)], [0, 1, 2, 3])
        stats.meta = {"identity": model_identity(collector.model.config)}
        stats.save(directory)

    pipeline = [Stage("collect", [], lambda: {"stand-in": 1}, collect_stand_in), analyze]

    def disk_full_after_one_plot(selection, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "explained_variance.png").write_bytes(b"\x89PNG half a plot")
        raise OSError(errno.ENOSPC, "No space left on device")

    # 1. the stage's writer fails after writing part of its artifact
    monkeypatch.setattr(nexus.stages.analyze, "write_plots", disk_full_after_one_plot)
    with pytest.raises(OSError, match="No space left"):
        run_stages(pipeline, out)
    assert read_manifest(out / "collect")  # the stage before it finished and says so
    assert not (out / "analyze").exists()
    assert _hidden(out) == []  # no temporary directory either

    # 2. the artifact is complete, but writing the manifest (always last) fails half-way
    monkeypatch.undo()
    real_write_json = nexus.job.runner.write_json

    def manifest_cut_short(path, obj):
        path.write_text(json.dumps(obj)[:20])
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(nexus.job.runner, "write_json", manifest_cut_short)
    with pytest.raises(OSError, match="Input/output error"):
        run_stages(pipeline, out)
    assert not (out / "analyze").exists() and _hidden(out) == []

    # 3. without faults the stage runs and its manifest comes last
    monkeypatch.setattr(nexus.job.runner, "write_json", real_write_json)
    statuses = {r.name: r.status for r in run_stages(pipeline, out)}
    assert statuses == {"collect": "up to date", "analyze": "ran"}
    finished = read_manifest(out / "analyze")
    selection = json.loads((out / "analyze" / "selection.json").read_text())
    assert selection["rule"] == {"top_k": 2} and (out / "analyze" / "plots" / "topk_fraction.png").is_file()

    # 4. a changed setting whose run fails keeps the previous artifact, whose manifest does not
    #    match the new settings: the rerun runs the stage instead of taking the old one as done
    cfg.analyze.top_k = 3
    monkeypatch.setattr(nexus.stages.analyze, "write_plots", disk_full_after_one_plot)
    with pytest.raises(OSError):
        run_stages(pipeline, out)
    assert read_manifest(out / "analyze") == finished
    assert json.loads((out / "analyze" / "selection.json").read_text()) == selection
    assert _hidden(out) == []
    monkeypatch.undo()
    statuses = {r.name: r.status for r in run_stages(pipeline, out)}
    assert statuses == {"collect": "up to date", "analyze": "ran"}
    assert read_manifest(out / "analyze")["fingerprint"] != finished["fingerprint"]
    assert json.loads((out / "analyze" / "selection.json").read_text())["rule"] == {"top_k": 3}
    assert sorted(p.name for p in (out / "analyze").iterdir()) == [MANIFEST, "plots", "selection.json"]


def test_a_killed_writers_temporary_directory_is_removed_by_the_next_writer(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}-k3q8x1za"  # left by a SIGKILLed writer
    stale.mkdir()
    (stale / "adapter.safetensors").write_bytes(b"half")
    replaced = tmp_path / f".out.old-{host}-{dead.pid}"  # killed between its two renames
    replaced.mkdir()
    busy = tmp_path / f".out.tmp-{host}-{os.getpid()}-a1b2c3d4"  # a writer that is still alive
    busy.mkdir()
    elsewhere = tmp_path / f".out.tmp-another-host-{dead.pid}-a1b2c3d4"  # cannot tell: kept
    elsewhere.mkdir()

    with atomic_dir(tmp_path / "out") as d:
        (d / "result.txt").write_text("done")
    assert (tmp_path / "out" / "result.txt").read_text() == "done"
    assert not stale.exists() and not replaced.exists()
    assert busy.exists() and elsewhere.exists()

    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out", overwrite=True) as d:
        (d / "result.txt").write_text("half")
        raise RuntimeError("failed mid-write")
    assert (tmp_path / "out" / "result.txt").read_text() == "done"
    assert _hidden(tmp_path) == sorted([busy.name, elsewhere.name])


# -- output claims --------------------------------------------------------------------------------
def _claim_record(tmp_path, name: str, **fields) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01 00:00:00", **fields}
    (tmp_path / f".{name}.claim").write_text(json.dumps(record) + "\n")


def test_a_claim_is_held_for_the_whole_stage_and_released_however_it_ends(tmp_path):
    import threading

    from nexus.errors import NexusError
    from nexus.util.artifacts import claim, claim_file, claim_output, claims_released

    out = tmp_path / "out"

    @claims_released()
    def stage(fail_before_writing: bool) -> None:
        claim_output(out, overwrite=True)
        holder = json.loads(claim_file(out).read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        refused = []

        def other_writer():  # another thread of this process is another writer
            try:
                with atomic_dir(out, overwrite=True):
                    pass
            except NexusError as exc:
                refused.append(str(exc))

        t = threading.Thread(target=other_writer)
        t.start()
        t.join()
        assert (
            refused and f"output {out} is being written by another process (pid {os.getpid()}" in refused[0]
        )
        if fail_before_writing:
            raise RuntimeError("failed before writing")
        with atomic_dir(out, overwrite=True) as d:  # the stage's own write keeps its claim
            (d / "result.txt").write_text("done")
            assert claim_file(out).exists()
        assert not claim_file(out).exists()  # released when atomic_dir finished

    with pytest.raises(RuntimeError, match="failed before writing"):
        stage(fail_before_writing=True)
    assert not claim_file(out).exists()
    stage(fail_before_writing=False)
    assert (out / "result.txt").read_text() == "done"
    assert _hidden(tmp_path) == []
    with pytest.raises(RuntimeError, match="claims_released"):
        claim(out)  # outside a scope nothing would release it


def test_stale_claims_are_taken_over_and_live_ones_refused(tmp_path):
    from nexus.errors import NexusError
    from nexus.util.artifacts import _process_start, claim_output, claims_released

    dead = subprocess.Popen(["true"])
    dead.wait()
    parent = os.getppid()  # alive for the whole test
    cases = {
        "dead": ({"pid": dead.pid}, None),
        "reused-pid": ({"pid": parent, "start": (_process_start(parent) or 0) + 1}, None),
        "alive": (
            {"pid": parent, "start": _process_start(parent)},
            rf"output {tmp_path}/alive is being written by another process \(pid {parent} on "
            rf"{socket.gethostname()}, since 2026-01-01 00:00:00\); wait for it to finish or choose another output$",
        ),
        "elsewhere": (
            {"host": "another-host", "pid": dead.pid},
            rf"\(pid {dead.pid} on another-host, since 2026-01-01 00:00:00\); wait for it to finish or choose "
            rf"another output; if that process is gone, delete {tmp_path}/\.elsewhere\.claim$",
        ),
    }
    for name, (fields, refusal) in cases.items():
        _claim_record(tmp_path, name, **fields)
        with claims_released():
            if refusal is None:
                claim_output(tmp_path / name, overwrite=False)
                assert json.loads((tmp_path / f".{name}.claim").read_text())["pid"] == os.getpid()
            else:
                with pytest.raises(NexusError, match=refusal):
                    claim_output(tmp_path / name, overwrite=False)
        if refusal is None:
            assert not (tmp_path / f".{name}.claim").exists()  # taken over, then released
        else:
            assert (tmp_path / f".{name}.claim").exists()  # not ours to remove


def test_a_second_writer_is_refused_at_once_and_a_killed_writer_does_not_block(
    ray_cluster, tiny_model_dir, tmp_path, capsys
):
    """Two real ``nexus sample`` writers of one output: the second (in-process) is refused within
    seconds, naming the first; the first still finishes. Then a writer killed with SIGKILL
    while it holds the claim does not block the next run. The first writer is paused (SIGSTOP)
    once its claim exists, so that the second surely starts while the first is at work."""
    import re
    import signal
    import sys
    import time
    from pathlib import Path

    from model_dirs import sample_texts

    from nexus.cli import main
    from nexus.util.artifacts import claim_file

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(120)))
    out = tmp_path / "sample"
    argv = ["sample", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--output", str(out)]
    argv += ["--target-tokens", "500"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "NEXUS_RAY_LOGS": "0"}

    def start_writer(*extra: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nexus", *argv, *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 180
        while not claim_file(out).is_file() or not claim_file(out).read_text().endswith("\n"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the writer never claimed its output"
            time.sleep(0.005)
        return proc

    first = start_writer()
    os.kill(first.pid, signal.SIGSTOP)
    try:
        capsys.readouterr()
        t0 = time.monotonic()
        status = main(argv)
        seconds = time.monotonic() - t0
        err = capsys.readouterr().err
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert status == 2 and seconds < 10, (status, seconds, err)
    assert err.count("\n") == 1 and "Traceback" not in err
    line = err.strip()
    shown = re.sub(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "since TIME", line)
    shown = shown.replace(f"pid {first.pid} on {socket.gethostname()}", "pid PID on HOST")
    assert (
        shown
        == f"nexus: error: output {out} is being written by another process (pid PID on HOST, since TIME); wait for it to finish or choose another output"
    )
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    assert shown.replace(str(tmp_path), "WORK") in doc
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr.decode()[-3000:]
    assert json.loads((out / "sample.json").read_text())["kind"] == "nexus-sample"
    assert not claim_file(out).exists()

    killed = start_writer("--overwrite")
    killed.kill()  # SIGKILL: no chance to release its claim
    killed.wait()
    assert claim_file(out).exists()
    assert main([*argv, "--overwrite"]) == 0
    assert not claim_file(out).exists()
    assert _hidden(tmp_path) == []
