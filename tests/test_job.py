"""The job (jobs/specialize.py): config validation, resumable stages, and an end-to-end run
on the tiny demo (report, rerun up to date, a changed training length reruns only train and
evaluate)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml

from nexus.errors import NexusError
from nexus.job.config import load_config, parse_config
from nexus.job.runner import MANIFEST, Stage, run_stages

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


# -- example configs ----------------------------------------------------------------------


def test_every_example_config_validates():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "gpt-oss-20b", "gpt-oss-120b", "qwen3-30b-a3b"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        if path.stem == "demo":
            continue
        # meant for `ray job submit`, whose working directory is a temporary copy
        assert Path(cfg.output).is_absolute(), path
        assert Path(cfg.model.path).is_absolute(), path
        assert cfg.model.dtype == "bfloat16", path
        assert cfg.train.use_gpu and cfg.train.gradient_checkpointing, path


def test_example_configs_have_the_advertised_resources():
    small = load_config(ROOT / "jobs/configs/gpt-oss-20b.yaml")
    assert (small.collect.workers, small.collect.gpus_per_worker) == (1, 1)
    assert small.train.workers == 1 and small.evaluate.gpus == 1

    big = load_config(ROOT / "jobs/configs/gpt-oss-120b.yaml")
    # packed MXFP4 experts: one GPU per collector and for evaluation, two GPUs for training
    # (tests/test_planner.py checks that each stage fits those GPUs)
    assert big.model.experts == "packed" and small.model.experts == "packed"
    assert big.collect.gpus_per_worker == 1 and big.collect.workers == 2
    assert big.train.workers == 2 and big.train.use_gpu
    assert big.evaluate.gpus == 1
    # two training nodes share checkpoints
    assert big.storage_path and "://" in big.storage_path

    qwen = load_config(ROOT / "jobs/configs/qwen3-30b-a3b.yaml")
    assert qwen.train.workers == 2 and qwen.collect.gpus_per_worker == 1


# -- bad configs: one line naming the key ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colect: {workers: 2}\n", "'colect'"),
        ("train: {max_step: 3}\n", "'train.max_step'"),
        ("model: {path: x, dtipe: bf16}\n", "'model.dtipe'"),
        ("collect: {workers: 0}\n", "'collect.workers'"),
        ("sample: {target_tokens: lots}\n", "'sample.target_tokens'"),
        ("convert: {init: magic}\n", "'convert.init'"),
        ("model: {dtype: f32}\n", "'model.dtype'"),
        ("train: {max_steps: -3}\n", "'train.max_steps'"),
        ("train: {lr: 0}\n", "'train.lr'"),
        ("evaluate: {gpus: -1}\n", "'evaluate.gpus'"),
        ("analyze: {threshold: 1.5}\n", "'analyze.threshold'"),
        ("data: {train: []}\n", "'data.train'"),
        ("output: ' '\n", "'output'"),
        ("train: {router_kl_weight: 0.5}\n", "router_kl_weight"),
        ("train: {eval_every: 5}\ndata: {eval: {general: [x]}}\n", "data.eval.domain"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(tmp_path, text, key):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(NexusError) as info:
        load_config(path)
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_config_file_errors_and_overrides(tmp_path, capsys):
    from nexus.cli import main

    with pytest.raises(NexusError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(NexusError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: {max_steps: [\n")
    with pytest.raises(NexusError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")

    cfg = load_config(None, ["train.max_steps=7", "collect.seq_len=64", "seed=3", "data.text_field=body"])
    assert (cfg.train.max_steps, cfg.collect.seq_len, cfg.seed, cfg.data.text_field) == (7, 64, 3, "body")
    with pytest.raises(NexusError, match="unknown config key 'train.seed'"):  # one seed, at the top
        load_config(None, ["seed=3", "train.seed=5"])
    with pytest.raises(NexusError, match="'train.max_steps'"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(NexusError, match="bad override"):
        load_config(None, ["train.max_steps"])

    # the command line: exit status and one line on stderr, before Ray or any stage starts
    (tmp_path / "bad.yaml").write_text("train: {max_step: 3}\n")
    assert main(["specialize", "--config", str(tmp_path / "bad.yaml")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("nexus: error:") and "'train.max_step'" in err
    assert len(err.splitlines()) == 1
    assert main(["specialize", "--config", str(tmp_path / "ok.yaml")]) != 0
    assert "not found" in capsys.readouterr().err


def test_defaults_are_the_demo():
    cfg = parse_config({})
    assert cfg.model.path == "demo" and cfg.data.train == ["demo:domain"]
    assert yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())["model"]["path"] == "demo"


# -- the stage runner ------------------------------------------------------------------------


def _fake_pipeline(settings: dict, calls: list, fail: set | None = None) -> list[Stage]:
    def make(name):
        def run(out: Path, fingerprint: str) -> None:
            if name in (fail or ()):
                (out / "partial.txt").write_text("half")
                raise RuntimeError(f"{name} failed")
            calls.append(name)
            (out / "result.txt").write_text(f"{name}:{settings[name]}")

        return run

    return [
        Stage("a", [], lambda: {"v": settings["a"]}, make("a")),
        Stage("b", ["a"], lambda: {"v": settings["b"]}, make("b")),
        Stage("c", ["b"], lambda: {"v": settings["c"]}, make("c")),
        Stage("d", ["a"], lambda: {"v": settings["d"]}, make("d"), enabled=False),
    ]


def _statuses(results) -> dict:
    return {r.name: r.status for r in results}


def test_runner_skips_finished_stages_and_reruns_what_changed(tmp_path):
    settings = {"a": 1, "b": 1, "c": 1, "d": 1}
    calls: list = []
    first = run_stages(_fake_pipeline(settings, calls), tmp_path)
    assert _statuses(first) == {"a": "ran", "b": "ran", "c": "ran", "d": "skipped"}
    assert json.loads((tmp_path / "b" / MANIFEST).read_text())["fingerprint"]

    calls.clear()
    assert set(_statuses(run_stages(_fake_pipeline(settings, calls), tmp_path)).values()) <= {
        "up to date",
        "skipped",
    }
    assert calls == []

    settings["b"] = 2  # a changed setting reruns that stage and everything downstream
    assert _statuses(run_stages(_fake_pipeline(settings, calls), tmp_path))["a"] == "up to date"
    assert calls == ["b", "c"]

    calls.clear()  # forcing a stage reruns it and what depends on it, not what it depends on
    run_stages(_fake_pipeline(settings, calls), tmp_path, force={"b"})
    assert calls == ["b", "c"]

    calls.clear()  # a deleted artifact is rebuilt, and so is everything downstream of it
    import shutil

    shutil.rmtree(tmp_path / "a")
    run_stages(_fake_pipeline(settings, calls), tmp_path)
    assert calls == ["a", "b", "c"]

    calls.clear()  # a new package version reruns everything
    run_stages(_fake_pipeline(settings, calls), tmp_path, version="9.9")
    assert calls == ["a", "b", "c"]


def test_uri_output_is_mirrored_manifest_last_and_pulled_on_rerun(tmp_path):
    """A ``file://`` URI exercises the object-store path (pyarrow filesystems) end to end."""
    from nexus.job.remote import RemoteOutput

    uri = f"file://{tmp_path / 'bucket' / 'run'}"
    settings = {"a": 1, "b": 1, "c": 1, "d": 1}
    calls: list = []
    first = RemoteOutput(uri, staging_root=tmp_path / "staging1")
    first.pull()  # nothing there yet
    run_stages(_fake_pipeline(settings, calls), first.local, on_done=first.push)
    remote = tmp_path / "bucket" / "run"
    assert (remote / "c" / "result.txt").read_text() == "c:1" and (remote / "c" / MANIFEST).is_file()

    # a half-uploaded stage (no manifest) is not pulled, so it is not mistaken for finished
    (remote / "zz").mkdir()
    (remote / "zz" / "result.txt").write_text("partial")

    # another machine (empty staging) pulls the finished stages and skips them
    calls.clear()
    second = RemoteOutput(uri, staging_root=tmp_path / "staging2")
    second.pull()
    assert not (second.local / "zz").exists()
    results = run_stages(_fake_pipeline(settings, calls), second.local, on_done=second.push)
    assert calls == [] and {r.status for r in results} <= {"up to date", "skipped"}

    settings["c"] = 2  # a change reruns and re-uploads only that stage
    run_stages(_fake_pipeline(settings, calls), second.local, on_done=second.push)
    assert calls == ["c"] and (remote / "c" / "result.txt").read_text() == "c:2"


def test_runner_failed_stage_leaves_previous_artifact_and_no_manifest(tmp_path):
    settings = {"a": 1, "b": 1, "c": 1, "d": 1}
    calls: list = []
    run_stages(_fake_pipeline(settings, calls), tmp_path)
    settings["b"] = 2
    with pytest.raises(RuntimeError, match="b failed"):
        run_stages(_fake_pipeline(settings, calls, fail={"b"}), tmp_path)
    # the old artifact is intact, no half-written directory is left behind
    assert (tmp_path / "b" / "result.txt").read_text() == "b:1"
    assert not any(p.name.startswith(".b.") for p in tmp_path.iterdir())
    calls.clear()
    run_stages(_fake_pipeline(settings, calls), tmp_path)
    assert calls == ["b", "c"]


def test_forced_training_starts_a_fresh_ray_train_run(tmp_path):
    """Same settings name the same Ray Train run (which would resume at its final step), so a
    forced train stage deletes that run first, on local storage and on URIs alike."""
    from nexus.stages.train import delete_run

    for storage in (str(tmp_path / "local"), (tmp_path / "uri").as_uri()):
        root = Path(storage.removeprefix("file://"))
        (root / "train-abc" / "checkpoint_0").mkdir(parents=True)
        (root / "train-abc" / "checkpoint_0" / "state.json").write_text("{}")
        (root / "train-other").mkdir()
        delete_run(storage, "train-abc")
        assert not (root / "train-abc").exists() and (root / "train-other").is_dir()
        delete_run(storage, "train-abc")  # nothing there: no error


# -- end to end on the tiny demo ---------------------------------------------------------------


#: documents per split in the small corpus the job tests train and evaluate on
SMALL_SPLITS = {"domain": 120, "domain_heldout": 30, "general_heldout": 30}


def small_corpus(corpus_dir: Path, dest: Path) -> Path:
    """The first documents of the demo corpus's splits, so every stage tokenises little."""
    import pyarrow.parquet as pq

    dest.mkdir(parents=True, exist_ok=True)
    for split, rows in SMALL_SPLITS.items():
        table = pq.read_table(corpus_dir / f"{split}.parquet")
        pq.write_table(table.slice(0, rows), dest / f"{split}.parquet")
    return dest


def tiny_job_config(corpus_dir: Path, model_dir: Path, output: Path, **sections) -> dict:
    """A job config for the tiny demo model (64 positions) that runs in seconds.

    ``corpus_dir`` holds ``domain``, ``domain_heldout`` and ``general_heldout`` parquet files
    (the demo corpus, or :func:`small_corpus` of it).
    """
    cfg = {
        "output": str(output),
        "seed": 0,
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {
            "train": [str(corpus_dir / "domain.parquet")],
            "eval": {
                "domain": [str(corpus_dir / "domain_heldout.parquet")],
                "general": [str(corpus_dir / "general_heldout.parquet")],
            },
        },
        "sample": {"target_tokens": 3000, "max_doc_tokens": 64},
        "collect": {"target_tokens": 1500, "batch_size": 8, "seq_len": 64},
        "analyze": {"top_k": 2, "plots": False},
        "convert": {"init": "pca"},
        "train": {
            "workers": 1,
            "cpus_per_worker": 1,
            "max_steps": 3,
            "batch_size": 4,
            "seq_len": 64,
            "warmup_steps": 1,
            "lr": 0.003,
            "checkpoint_every": 3,
        },
        "evaluate": {"seq_len": 64, "max_tokens": 1024, "batch_size": 8, "generate_tokens": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def _check_artifacts(out: Path) -> dict:
    report = (out / "report.md").read_text()
    assert "## Held-out perplexity" in report
    assert "base ppl" in report and "specialised ppl" in report
    assert "| domain |" in report and "| general |" in report
    evaluation = json.loads((out / "evaluate" / "evaluation.json").read_text())
    for name in ("domain", "general"):
        row = evaluation["corpora"][name]
        assert row["tokens"] > 0
        assert math.isfinite(row["base_ppl"]) and math.isfinite(row["specialised_ppl"])
    assert evaluation["generations"] and "specialised" in evaluation["generations"][0]
    assert list((out / "train" / "adapter").glob("*.safetensors"))
    for stage in ("sample", "collect", "analyze", "convert", "train", "evaluate"):
        assert (out / stage / MANIFEST).is_file(), stage
    return evaluation


@pytest.mark.ray
def test_job_end_to_end_rerun_and_changed_training(ray_cluster, demo_tiny, demo_tiny_mxfp4, tmp_path, capsys):
    """The whole job, its rerun (every stage up to date) and a changed training, on the demo base
    stored like a published GPT-OSS checkpoint (MXFP4 experts): every stage takes the path a real
    one takes (collect, train and evaluate hold the experts packed, conversion decodes the
    selected experts' MXFP4 slices). The dequantised path runs the job in tests/test_faults.py
    and tests/test_cluster.py."""
    from nexus.cli import main
    from nexus.job.run import run_job

    corpus_dir = small_corpus(demo_tiny[0], tmp_path / "corpus")
    model_dir = demo_tiny_mxfp4
    out = tmp_path / "run"
    cfg = parse_config(tiny_job_config(corpus_dir, model_dir, out))
    assert cfg.model.experts == "auto"  # auto = packed for an MXFP4 checkpoint

    results = run_job(cfg)
    assert {r.name: r.status for r in results} == {
        "sample": "ran",
        "collect": "ran",
        "analyze": "ran",
        "convert": "ran",
        "distill": "skipped",  # runs only for train.kd: offline
        "train": "ran",
        "evaluate": "ran",
        "export": "skipped",
    }
    first = _check_artifacts(out)
    domain = first["corpora"]["domain"]
    assert domain["specialised_ppl"] != domain["base_ppl"]  # the trained adapter is in use
    summary = json.loads((out / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 3
    assert first["experts"] == summary["experts"] == "packed"
    assert json.loads((out / "collect" / "router_stats.json").read_text())["experts"] == "packed"

    # the same config again, through the command line: every stage up to date, in seconds
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job_config(corpus_dir, model_dir, out)))
    t0 = time.perf_counter()
    assert main(["specialize", "--config", str(path)]) == 0
    seconds = time.perf_counter() - t0
    printed = capsys.readouterr().out
    for stage in ("sample", "collect", "analyze", "convert", "train", "evaluate"):
        assert f"{stage:<10} up to date" in printed
    assert "base ppl" in printed  # the table, at the end
    assert seconds < 60, seconds  # the acceptance bound; seconds when the machine is idle
    assert json.loads((out / "evaluate" / "evaluation.json").read_text()) == first

    # a longer training reruns only train and evaluate
    longer = parse_config(tiny_job_config(corpus_dir, model_dir, out, train={"max_steps": 5}))
    statuses = {r.name: r.status for r in run_job(longer)}
    assert statuses == {
        "sample": "up to date",
        "collect": "up to date",
        "analyze": "up to date",
        "convert": "up to date",
        "distill": "skipped",
        "train": "ran",
        "evaluate": "ran",
        "export": "skipped",
    }
    assert json.loads((out / "train" / "train_summary.json").read_text())["steps"] == 5
    _check_artifacts(out)
    stages = json.loads((out / "stages.json").read_text())
    assert {s["stage"]: s["status"] for s in stages}["train"] == "ran"
