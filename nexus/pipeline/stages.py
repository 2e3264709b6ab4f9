"""The specialisation job: sample, collect, analyze, convert, train, evaluate, export, report.

:func:`run_job` wires the stage functions (each also a CLI subcommand and a Python API)
into resumable :class:`~nexus.pipeline.runner.Stage` objects. Everything a stage reads is
named in its fingerprint, so a rerun skips what is done and redoes what changed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from nexus import __version__
from nexus.errors import NexusError
from nexus.pipeline.config import DEMO, JobConfig, section_dict
from nexus.pipeline.runner import Stage, StageResult, run_stages

log = logging.getLogger(__name__)
STAGES = ("sample", "collect", "analyze", "convert", "train", "evaluate", "export")


class JobContext:
    """Resolved inputs of a job: model directory, corpus paths, output locations."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.output = Path(cfg.output).resolve()
        self._demo: tuple[Path, Path] | None = None

    def demo(self) -> tuple[Path, Path]:
        if self._demo is None:
            from nexus.demo import ensure_demo

            self._demo = ensure_demo(self.cfg.model.demo_size, seed=self.cfg.seed)
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
        return self.cfg.storage_path or str(self.output / ".ray")

    def stage_dir(self, name: str) -> Path:
        return self.output / name


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


def build_stages(ctx: JobContext) -> list[Stage]:
    cfg = ctx.cfg
    train_corpus = lambda: ctx.corpus(cfg.data.train)  # noqa: E731
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
            batch_size=c.batch_size,
            seq_len=c.seq_len,
            dtype=cfg.model.dtype,
            text_field="text" if sampled else cfg.data.text_field,
            seed=cfg.seed,
            overwrite=True,
            trust_remote_code=cfg.model.trust_remote_code,
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

        settings = section_dict(cfg.train)
        tc = TrainConfig(
            model=ctx.model_dir,
            corpus=train_corpus(),
            output=str(out),
            adapter=str(ctx.stage_dir("convert")),
            eval_corpus=ctx.corpus(cfg.data.eval.get("domain", [])) if settings.get("eval_every") else [],
            text_field=cfg.data.text_field,
            storage_path=ctx.storage_path,
            # one Ray Train run per distinct setting: an interrupted run resumes, a changed one starts afresh
            name=f"train-{fingerprint[:12]}",
            trust_remote_code=cfg.model.trust_remote_code,
            dtype=cfg.model.dtype,
            **settings,
        )
        train(tc, overwrite=True)

    def run_evaluate(out: Path, fingerprint: str) -> None:
        from nexus.evaluate import evaluate

        e = cfg.evaluate
        evaluate(
            ctx.model_dir,
            ctx.stage_dir("train") / "adapter",
            {name: ctx.corpus(paths) for name, paths in cfg.data.eval.items()},
            out,
            seq_len=e.seq_len,
            max_tokens=e.max_tokens,
            batch_size=e.batch_size,
            text_field=cfg.data.text_field,
            prompts=e.prompts or None,
            prompt_corpus="domain",
            generate_tokens=e.generate_tokens,
            dtype=cfg.model.dtype,
            overwrite=True,
        )

    def run_export(out: Path, fingerprint: str) -> None:
        from nexus.merge import merge_adapter

        merge_adapter(ctx.model_dir, ctx.stage_dir("train") / "adapter", out, overwrite=True)

    evaluate_inputs = lambda: {n: corpus_inputs(ctx.corpus(p)) for n, p in cfg.data.eval.items()}  # noqa: E731
    return [
        Stage("sample", [], lambda: {**section_dict(cfg.sample), "text_field": cfg.data.text_field, "seed": cfg.seed},
              run_sample, lambda: {**model_in(), "corpus": corpus_inputs(train_corpus())}, enabled=cfg.sample.enabled),
        Stage("collect", ["sample"], lambda: {**section_dict(cfg.collect), "dtype": cfg.model.dtype, "seed": cfg.seed, "sampled": cfg.sample.enabled},
              run_collect, lambda: {**model_in(), "corpus": None if cfg.sample.enabled else corpus_inputs(train_corpus())}),
        Stage("analyze", ["collect"], lambda: section_dict(cfg.analyze), run_analyze),
        Stage("convert", ["analyze"], lambda: {**section_dict(cfg.convert), "seed": cfg.seed}, run_convert, model_in),
        Stage("train", ["convert"], lambda: {**section_dict(cfg.train), "dtype": cfg.model.dtype},
              run_train, lambda: {**model_in(), "corpus": corpus_inputs(train_corpus())}),
        Stage("evaluate", ["train"], lambda: section_dict(cfg.evaluate), run_evaluate, evaluate_inputs, enabled=cfg.evaluate.enabled),
        Stage("export", ["train"], lambda: section_dict(cfg.export), run_export, model_in, enabled=cfg.export.merge),
    ]  # fmt: skip


def run_job(cfg: JobConfig, *, force: set[str] | None = None) -> list[StageResult]:
    """Run the whole pipeline for ``cfg``; returns each stage's status."""
    from nexus.pipeline.report import write_report
    from nexus.ray_utils import ensure_ray, warn_if_local_storage_on_cluster

    ensure_ray()
    ctx = JobContext(cfg)
    warn_if_local_storage_on_cluster(ctx.storage_path)
    unknown = sorted(set(force or ()) - set(STAGES))
    if unknown:
        raise NexusError(f"unknown stage(s) to force: {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    results = run_stages(build_stages(ctx), ctx.output, force=set(force or ()), version=__version__)
    write_report(ctx, results)
    return results
