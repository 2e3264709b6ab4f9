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
