"""The specialisation job: sample, collect, analyze, convert, train, evaluate, export, report.

:func:`run_job` turns every stage of :data:`nexus.stages.STAGES` into a resumable
:class:`~nexus.job.runner.Stage`. A stage's config is built from three places only: its YAML
section (its settings), the job's shared settings (``model.dtype``, ``data.text_field``,
``seed``...), and its module's ``job_inputs(job)`` (where its inputs come from: the model, the
corpus, upstream artifacts). What the stage fingerprints is that same config
(:meth:`~nexus.config.StageConfig.fingerprint`), so a rerun skips exactly what is done and
redoes what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from nexus import __version__
from nexus.commands import DEFAULT_JOB, SpecializeConfig
from nexus.config import StageConfig
from nexus.data.corpus import corpus_fingerprint, resolve_corpus
from nexus.demo import ensure_demo
from nexus.demo.corpus import SPLITS
from nexus.errors import NexusError
from nexus.job.config import DEMO, load_config, shared_values
from nexus.job.remote import RemoteOutput
from nexus.job.report import write_report
from nexus.job.runner import Stage, StageResult, run_stages
from nexus.models.loading import load_config as load_model_config
from nexus.models.loading import resolve_experts
from nexus.stages import BY_NAME, STAGES, StageSpec
from nexus.stages.collect import resolve_seq_len
from nexus.stages.evaluate import format_tables
from nexus.util.artifacts import is_uri
from nexus.util.cluster import check_gpus, ensure_ray, warn_if_local_storage_on_cluster
from nexus.util.preflight import check_seq_len

log = logging.getLogger(__name__)


class JobContext:
    """A job's resolved inputs; each stage's ``job_inputs(job)`` reads them from here."""

    def __init__(self, cfg, force: set[str] | frozenset[str] = frozenset()) -> None:
        self.cfg = cfg
        #: for a URI output, stages run in a local staging directory mirrored to the URI
        self.remote = RemoteOutput(cfg.output) if is_uri(cfg.output) else None
        self.output = self.remote.local if self.remote else Path(cfg.output).resolve()
        self.force = set(force)
        self._demo: tuple[Path, Path] | None = None
        self._config = None
        self._reading: StageSpec | None = None  # the stage whose inputs are being wired

    # -- what job_inputs(job) reads ------------------------------------------------------------
    @property
    def model_dir(self) -> str:
        path = self.cfg.model.path
        return str(self.demo()[1]) if path == DEMO else path

    @property
    def train_corpus(self) -> list[str]:
        return self.corpus(self.cfg.data.train)

    @property
    def eval_corpora(self) -> dict[str, list[str]]:
        return {name: self.corpus(paths) for name, paths in self.cfg.data.eval.items()}

    @property
    def storage_path(self) -> str:
        if self.cfg.storage_path:
            return self.cfg.storage_path
        return f"{self.remote.uri}/.ray" if self.remote else str(self.output / ".ray")

    def stage_dir(self, name: str, *parts: str) -> str:
        """The artifact of stage ``name`` (which the reading stage must list in its ``after``)."""
        if self._reading is not None and name not in self._reading.after:
            raise RuntimeError(f"stage {self._reading.name} reads {name}'s artifact; add it to its `after`")
        return str(self.output.joinpath(name, *parts))

    def section(self, name: str):
        return getattr(self.cfg, name)

    def enabled(self, name: str) -> bool:
        spec = BY_NAME[name]
        if spec.enabled_by is not None:
            stage, setting, value = spec.enabled_by
            return getattr(self.section(stage), setting) == value
        switch = spec.switch
        if switch is not None:
            return getattr(self.section(name), switch) is not None
        return self.section(name).enabled

    def forced(self, name: str) -> bool:
        return name in self.force

    # -- resolving -----------------------------------------------------------------------------
    def demo(self) -> tuple[Path, Path]:
        if self._demo is None:
            model = self.cfg.model
            self._demo = ensure_demo(model.demo_size, seed=self.cfg.seed, format=model.demo_format)
        return self._demo

    def corpus(self, specs: list[str]) -> list[str]:
        """``demo:<split>`` names a split of the built-in corpus; anything else is a path/URI."""
        out = []
        for spec in specs:
            if spec.startswith(f"{DEMO}:"):
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
    def model_config(self):
        if self._config is None:
            self._config = load_model_config(
                self.model_dir, trust_remote_code=self.cfg.model.trust_remote_code
            )
        return self._config

    def stage_config(self, spec: StageSpec) -> StageConfig:
        """The stage's config: its section's settings, the shared settings, its inputs."""
        section = self.section(spec.name).model_dump(exclude={"enabled"})
        self._reading = spec
        try:
            inputs = spec.module.job_inputs(self)
        finally:
            self._reading = None
        # an input the job wires in wins over a shared setting (collect reads the sample's `text` column)
        values = {
            **section,
            **shared_values(self.cfg, spec.config),
            "output": self.stage_dir(spec.name),
            **inputs,
        }
        return spec.config.build(**values)

    def identity(self, kind: str, value):
        """What the fingerprint records of an input: a model's files, a corpus's files; an upstream
        stage's artifact only by name (that stage's fingerprint covers it)."""
        if kind == "value":  # a setting the job copies from another stage's section
            return value
        if isinstance(value, dict):
            return {k: self.identity(kind, v) for k, v in value.items()}
        if kind == "model":
            return model_identity_inputs(value)
        if kind == "task_files":  # evaluate.task_dir: a changed task YAML or data file reruns evaluate
            from nexus.stages.evaluate_tasks import task_files_hash

            return {"task_files_sha256": task_files_hash(value)}
        paths = [value] if isinstance(value, str) else list(value)
        inside = [_relative_to(p, self.output) for p in paths]
        if all(rel is not None for rel in inside):
            return {"artifacts": inside}
        return corpus_fingerprint(resolve_corpus(paths))

    def preflight(self) -> None:
        """What every stage will need, checked against the model and the cluster before the first
        stage runs: a bad setting for evaluation should not surface after an hour of training."""
        cfg = self.cfg
        resolve_experts(self.model_config, cfg.model.experts, model=self.model_dir)
        collect_seq_len = resolve_seq_len(cfg.collect.seq_len, self.model_config)
        check_seq_len(self.model_config, collect_seq_len, "collect.seq_len")
        check_seq_len(self.model_config, cfg.train.seq_len, "train.seq_len")
        if cfg.evaluate.enabled:
            check_seq_len(self.model_config, cfg.evaluate.seq_len, "evaluate.seq_len")
            check_gpus(cfg.evaluate.gpus, "evaluate.gpus", "set evaluate.gpus: 0 or add GPU nodes")
        if cfg.evaluate.enabled and cfg.evaluate.tasks:
            from nexus.stages.evaluate_tasks import resolve_tasks, task_manager

            # an unknown task or a missing extra: before the first stage, not after the training
            e = cfg.evaluate
            task_manager(*resolve_tasks(e.tasks, e.task_dir, seed=cfg.seed))
        from nexus.stages.train.reporting import check_trackers

        check_trackers(cfg.train.report_to)
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


def _relative_to(path: str, root: Path) -> str | None:
    if is_uri(path):
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return None


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


def _stage(job: JobContext, spec: StageSpec) -> Stage:
    """A stage of the job: fingerprinted and run with the config :meth:`JobContext.stage_config`
    builds. The runner asks for the settings first, then the inputs, then runs it: the config is
    built afresh at the first (the job's config may have changed since the last run) and reused
    by the other two, so what is fingerprinted is what runs."""
    built: dict = {}

    def settings() -> dict:
        built["cfg"] = job.stage_config(spec)
        built["record"] = built["cfg"].fingerprint(job.identity)
        return built["record"]["settings"]

    def inputs() -> dict:
        if not built:
            settings()
        return built["record"]["inputs"]

    def run(out: Path, fingerprint: str) -> None:
        if not built:
            settings()
        options = getattr(spec.module, "job_run_options", None)
        extra = options(job, fingerprint) if options else {}
        spec.module.run(spec.config.build(built["cfg"], output=str(out), overwrite=True, **extra))

    return Stage(
        spec.name, list(spec.after), settings=settings, run=run, inputs=inputs, enabled=job.enabled(spec.name)
    )


def build_stages(job: JobContext) -> list[Stage]:
    """Every stage of the pipeline, as the job runs it."""
    return [_stage(job, spec) for spec in STAGES]


def run_job(cfg, *, force: set[str] | None = None) -> list[StageResult]:
    """Run the whole pipeline for ``cfg``; returns each stage's status."""
    unknown = sorted(set(force or ()) - set(BY_NAME))
    if unknown:
        raise NexusError(
            f"unknown stage(s) to force: {', '.join(unknown)}; stages: {', '.join(s.name for s in STAGES)}"
        )
    ensure_ray()
    job = JobContext(cfg, force=set(force or ()))
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and not job.remote and not Path(cfg.output).is_absolute():
        # under `ray job submit` the working directory is a temporary copy of the upload
        log.warning(
            "output '%s' is relative to the job's working directory, a temporary copy Ray deletes later; "
            "artifacts go to %s: give an absolute path (shared storage on a multi-node cluster)",
            cfg.output,
            job.output,
        )
    warn_if_local_storage_on_cluster(job.storage_path)
    job.preflight()
    if job.remote:
        job.remote.pull()
    push = job.remote.push if job.remote else None
    results = run_stages(build_stages(job), job.output, force=job.force, version=__version__, on_done=push)
    write_report(job, results)
    if job.remote:
        for rel in ("report_assets", "report.md", "stages.json"):
            job.remote.push(rel)
    return results


def specialize(cfg: SpecializeConfig) -> int:
    """``nexus specialize``: load the job config, run it, print the stage summary and the table."""
    path = cfg.config or (str(DEFAULT_JOB) if DEFAULT_JOB.is_file() else None)
    overrides = list(cfg.set) + ([f"output={cfg.output}"] if cfg.output else [])
    job = load_config(path, overrides)
    results = run_job(job, force=set(cfg.force))
    out = Path(job.output)
    print("\nstage      status")
    for r in results:
        print(f"{r.name:<10} {r.status}" + (f" ({r.seconds:.1f}s)" if r.status == "ran" else ""))
    evaluation = out / "evaluate" / "evaluation.json"
    if evaluation.is_file():
        print("\n" + format_tables(json.loads(evaluation.read_text())))
    print(f"\nreport: {out / 'report.md'}\nadapter: {out / 'train' / 'adapter'}")
    return 0
