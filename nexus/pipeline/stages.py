"""The specialisation job: sample, collect, analyze, convert, train, evaluate, export, report.

:func:`run_job` wires the stage functions (each also a CLI subcommand and a Python API)
into resumable :class:`~nexus.pipeline.runner.Stage` objects. Everything a stage reads is
named in its fingerprint, so a rerun skips what is done and redoes what changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from nexus import __version__
from nexus.artifacts import is_uri
from nexus.errors import NexusError, user_error
from nexus.pipeline.config import DEMO, JobConfig, section_dict
from nexus.pipeline.runner import Stage, StageResult, run_stages

log = logging.getLogger(__name__)
STAGES = ("sample", "collect", "analyze", "convert", "train", "evaluate", "export")


class JobContext:
    """Resolved inputs of a job: model directory, corpus paths, output locations."""

    def __init__(self, cfg: JobConfig, force: set[str] | frozenset[str] = frozenset()) -> None:
        from nexus.pipeline.remote import RemoteOutput

        self.cfg = cfg
        #: for a URI output, stages run in a local staging directory mirrored to the URI
        self.remote = RemoteOutput(cfg.output) if is_uri(cfg.output) else None
        self.output = self.remote.local if self.remote else Path(cfg.output).resolve()
        self.force = set(force)
        self._demo: tuple[Path, Path] | None = None
        self._config = None

    def demo(self) -> tuple[Path, Path]:
        if self._demo is None:
            from nexus.demo import ensure_demo

            model = self.cfg.model
            self._demo = ensure_demo(model.demo_size, seed=self.cfg.seed, format=model.demo_format)
        return self._demo

    @property
    def model_dir(self) -> str:
        path = self.cfg.model.path
        return str(self.demo()[1]) if path == DEMO else path

    def corpus(self, specs: list[str]) -> list[str]:
        """``demo:<split>`` names a split of the built-in corpus; anything else is a path/URI."""
        out = []
        for spec in specs:
            if spec.startswith(f"{DEMO}:"):
                from nexus.demo.corpus import SPLITS

                split = spec.split(":", 1)[1]
                if split not in SPLITS:
                    raise NexusError(
                        f"unknown demo split '{split}' in '{spec}'; choose one of {', '.join(SPLITS)}"
                    )
                out.append(str(self.demo()[0] / f"{split}.parquet"))
            else:
                out.append(spec)
        return out

    @property
    def storage_path(self) -> str:
        if self.cfg.storage_path:
            return self.cfg.storage_path
        return f"{self.remote.uri}/.ray" if self.remote else str(self.output / ".ray")

    def stage_dir(self, name: str) -> Path:
        return self.output / name

    @property
    def model_config(self):
        from nexus.loading import load_config

        if self._config is None:
            self._config = load_config(self.model_dir, trust_remote_code=self.cfg.model.trust_remote_code)
        return self._config

    @property
    def collect_seq_len(self) -> int:
        from nexus.preflight import max_positions

        return self.cfg.collect.seq_len or min(max_positions(self.model_config) or 1024, 1024)

    def preflight(self) -> None:
        """What every stage will need, checked against the model and the cluster before the first
        stage runs: a bad setting for evaluation should not surface after an hour of training."""
        from nexus.loading import resolve_experts
        from nexus.preflight import check_seq_len
        from nexus.ray_utils import check_gpus

        cfg = self.cfg
        resolve_experts(self.model_config, cfg.model.experts, model=self.model_dir)
        check_seq_len(self.model_config, self.collect_seq_len, "collect.seq_len")
        check_seq_len(self.model_config, cfg.train.seq_len, "train.seq_len")
        if cfg.evaluate.enabled:
            check_seq_len(self.model_config, cfg.evaluate.seq_len, "evaluate.seq_len")
            check_gpus(cfg.evaluate.gpus, "evaluate.gpus", "set evaluate.gpus: 0 or add GPU nodes")
        check_gpus(
            cfg.collect.gpus_per_worker,
            "collect.gpus_per_worker",
            "set collect.gpus_per_worker: 0 or add GPU nodes",
        )
        if cfg.train.use_gpu:
            check_gpus(cfg.train.workers, "train.use_gpu", "set train.use_gpu: false or add GPU nodes")
        if cfg.plan.check:
            # every stage's predicted peak memory per worker against its device (nexus plan)
            from nexus.planner import check_job, job_devices

            check_job(cfg, self.model_config, job_devices(cfg))


def model_identity_inputs(model_dir: str) -> dict:
    """Cheap identity of a model directory: config.json content and the weight files' sizes/mtimes."""
    p = Path(model_dir)
    if not p.is_dir():
        return {"model": model_dir}
    h = hashlib.sha256((p / "config.json").read_bytes() if (p / "config.json").is_file() else b"")
    for f in sorted(p.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {"model": str(p), "model_hash": h.hexdigest()}


def corpus_inputs(paths: list[str]) -> str:
    from nexus.corpus import corpus_fingerprint, resolve_corpus

    return corpus_fingerprint(resolve_corpus(paths))


def _gib(gb: float) -> int:
    return int(gb * 1024**3)


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _delete_train_run(storage_path: str, name: str) -> None:
    """Remove the Ray Train run ``<storage_path>/<name>`` (local path or URI), if there is one."""
    if not is_uri(storage_path):
        shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
        return
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    path = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


def _evaluate_task(kwargs: dict, device: str) -> dict:
    from nexus.evaluate import evaluate

    return evaluate(**kwargs, device=device)


def _evaluate_remote(kwargs: dict, *, gpus: float, cpus: float, memory_gb: float | None) -> dict:
    """Run the evaluation in a Ray task (on a GPU node when ``gpus`` > 0); returns its results."""
    import ray

    from nexus.ray_utils import check_gpus

    check_gpus(gpus, "evaluation", "set evaluate.gpus: 0 or add GPU nodes")
    options: dict = {"num_cpus": cpus, "name": "nexus-evaluate"}
    if gpus:
        options["num_gpus"] = gpus
    if memory_gb:
        options["memory"] = _gib(memory_gb)
    ref = ray.remote(_evaluate_task).options(**options).remote(kwargs, "cuda" if gpus else "cpu")
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = user_error(exc)
        if cause is not None:
            raise cause from None
        raise


def build_stages(ctx: JobContext) -> list[Stage]:
    cfg = ctx.cfg
    train_corpus = lambda: ctx.corpus(cfg.data.train)  # noqa: E731
    # in a stage's settings only when set, so that existing runs stay up to date
    skip_setting = lambda: {"skip_bad_documents": True} if cfg.data.skip_bad_documents else {}  # noqa: E731
    train_settings = lambda: {**section_dict(cfg.train), "seed": cfg.train_seed}  # noqa: E731
    model_in = lambda: model_identity_inputs(ctx.model_dir)  # noqa: E731

    def run_sample(out: Path, fingerprint: str) -> None:
        from nexus.sampling import sample

        s = cfg.sample
        sample(
            train_corpus(),
            ctx.model_dir,
            out,
            s.budget_tokens,
            text_field=cfg.data.text_field,
            max_doc_tokens=s.max_doc_tokens,
            weighting="idf" if s.idf else "uniform",
            seed=cfg.seed,
            overwrite=True,
            trust_remote_code=cfg.model.trust_remote_code,
            skip_bad_documents=cfg.data.skip_bad_documents,
        )

    def run_collect(out: Path, fingerprint: str) -> None:
        from nexus.collect import collect

        c = cfg.collect
        sampled = cfg.sample.enabled
        collect(
            ctx.model_dir,
            str(ctx.stage_dir("sample")) if sampled else train_corpus(),
            out,
            c.target_tokens,
            workers=c.workers,
            gpus_per_worker=c.gpus_per_worker,
            cpus_per_worker=c.cpus_per_worker,
            ray_remote_args={"memory": _gib(c.memory_gb)} if c.memory_gb else None,
            batch_size=c.batch_size,
            seq_len=ctx.collect_seq_len,
            dtype=cfg.model.dtype,
            experts=cfg.model.experts,
            text_field="text" if sampled else cfg.data.text_field,
            seed=cfg.seed,
            overwrite=True,
            trust_remote_code=cfg.model.trust_remote_code,
            skip_bad_documents=cfg.data.skip_bad_documents,
        )

    def run_analyze(out: Path, fingerprint: str) -> None:
        from nexus.analyze import analyze

        a = cfg.analyze
        analyze(
            ctx.stage_dir("collect"),
            out,
            top_k=a.top_k if a.threshold is None else None,
            importance=a.importance,
            threshold=a.threshold,
            plots=a.plots,
            overwrite=True,
            model=ctx.model_dir,
        )

    def run_convert(out: Path, fingerprint: str) -> None:
        from nexus.convert import convert

        c = cfg.convert
        convert(
            ctx.model_dir,
            out,
            ctx.stage_dir("analyze"),
            init=c.init,
            weighting=c.weighting,
            intermediate_size=c.intermediate_size,
            gate=c.gate,
            scale=c.scale,
            seed=cfg.seed,
            overwrite=True,
        )

    def run_train(out: Path, fingerprint: str) -> None:
        from nexus.train import TrainConfig, train

        settings = train_settings()
        name = f"train-{fingerprint[:12]}"
        if "train" in ctx.force:
            # the same settings name the same Ray Train run, which would resume at its last
            # checkpoint (the final step); a forced rerun starts afresh
            _delete_train_run(ctx.storage_path, name)
        tc = TrainConfig(
            model=ctx.model_dir,
            corpus=train_corpus(),
            output=str(out),
            adapter=str(ctx.stage_dir("convert")),
            eval_corpus=ctx.corpus(cfg.data.eval.get("domain", [])) if settings.get("eval_every") else [],
            text_field=cfg.data.text_field,
            skip_bad_documents=cfg.data.skip_bad_documents,
            storage_path=ctx.storage_path,
            # one Ray Train run per distinct setting: an interrupted run resumes, a changed one starts afresh
            name=name,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype=cfg.model.dtype,
            experts=cfg.model.experts,
            **settings,
        )
        train(tc, overwrite=True)

    def run_evaluate(out: Path, fingerprint: str) -> None:
        from nexus.artifacts import write_json
        from nexus.evaluate import EVAL_FILE, evaluate, plot_perplexity

        e = cfg.evaluate
        kwargs = dict(
            model_dir=ctx.model_dir,
            adapter_dir=str(ctx.stage_dir("train") / "adapter"),
            corpora={name: ctx.corpus(paths) for name, paths in cfg.data.eval.items()},
            seq_len=e.seq_len,
            max_tokens=e.max_tokens,
            batch_size=e.batch_size,
            text_field=cfg.data.text_field,
            prompts=e.prompts or None,
            prompt_corpus="domain",
            generate_tokens=e.generate_tokens,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            skip_bad_documents=cfg.data.skip_bad_documents,
            experts=cfg.model.experts,
        )
        if e.gpus > 0 or e.memory_gb:
            results = _evaluate_remote(kwargs, gpus=e.gpus, cpus=e.cpus, memory_gb=e.memory_gb)
        else:
            results = evaluate(**kwargs, device="cpu")
        write_json(out / EVAL_FILE, results)
        plot_perplexity(results, out / "perplexity.png")

    def run_export(out: Path, fingerprint: str) -> None:
        from nexus.serving.export import export_adapter

        export_adapter(
            ctx.model_dir,
            ctx.stage_dir("train") / "adapter",
            out,
            format=cfg.export.format,
            overwrite=True,
            trust_remote_code=cfg.model.trust_remote_code,
        )

    evaluate_inputs = lambda: {n: corpus_inputs(ctx.corpus(p)) for n, p in cfg.data.eval.items()}  # noqa: E731
    # resource requests that only steer scheduling stay out of the fingerprints
    collect_settings = lambda: _without(section_dict(cfg.collect), "cpus_per_worker", "memory_gb")  # noqa: E731
    evaluate_settings = lambda: _without(section_dict(cfg.evaluate), "cpus", "memory_gb")  # noqa: E731
    # every stage that runs the model: its dtype and how it holds the routed experts
    run_as = lambda: {"dtype": cfg.model.dtype, "experts": cfg.model.experts}  # noqa: E731
    return [
        Stage("sample", [], lambda: {**section_dict(cfg.sample), "text_field": cfg.data.text_field, "seed": cfg.seed, **skip_setting()},
              run_sample, lambda: {**model_in(), "corpus": corpus_inputs(train_corpus())}, enabled=cfg.sample.enabled),
        Stage("collect", ["sample"], lambda: {**collect_settings(), **run_as(), "seed": cfg.seed, "sampled": cfg.sample.enabled, **skip_setting()},
              run_collect, lambda: {**model_in(), "corpus": None if cfg.sample.enabled else corpus_inputs(train_corpus())}),
        Stage("analyze", ["collect"], lambda: section_dict(cfg.analyze), run_analyze),
        Stage("convert", ["analyze"], lambda: {**section_dict(cfg.convert), "seed": cfg.seed}, run_convert, model_in),
        Stage("train", ["convert"], lambda: {**train_settings(), **run_as(), **skip_setting()},
              run_train, lambda: {**model_in(), "corpus": corpus_inputs(train_corpus())}),
        Stage("evaluate", ["train"], lambda: {**evaluate_settings(), **run_as(), **skip_setting()}, run_evaluate, evaluate_inputs, enabled=cfg.evaluate.enabled),
        Stage("export", ["train"], lambda: section_dict(cfg.export), run_export, model_in, enabled=cfg.export.format is not None),
    ]  # fmt: skip


def run_job(cfg: JobConfig, *, force: set[str] | None = None) -> list[StageResult]:
    """Run the whole pipeline for ``cfg``; returns each stage's status."""
    from nexus.pipeline.report import write_report
    from nexus.ray_utils import ensure_ray, warn_if_local_storage_on_cluster

    unknown = sorted(set(force or ()) - set(STAGES))
    if unknown:
        raise NexusError(f"unknown stage(s) to force: {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    ensure_ray()
    ctx = JobContext(cfg, force=set(force or ()))
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and not ctx.remote and not Path(cfg.output).is_absolute():
        # under `ray job submit` the working directory is a temporary copy of the upload
        log.warning(
            "output '%s' is relative to the job's working directory, a temporary copy Ray deletes later; "
            "artifacts go to %s: give an absolute path (shared storage on a multi-node cluster)",
            cfg.output,
            ctx.output,
        )
    warn_if_local_storage_on_cluster(ctx.storage_path)
    ctx.preflight()
    if ctx.remote:
        ctx.remote.pull()
    push = ctx.remote.push if ctx.remote else None
    results = run_stages(build_stages(ctx), ctx.output, force=ctx.force, version=__version__, on_done=push)
    write_report(ctx, results)
    if ctx.remote:
        for rel in ("report_assets", "report.md", "stages.json"):
            ctx.remote.push(rel)
    return results
