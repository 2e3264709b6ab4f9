"""Stage 5: train the shared experts with Ray Train (DDP or FSDP2), distilling from the frozen base.

``run(cfg)`` builds the packed training data on Ray Data, runs a ``TorchTrainer`` with
``workers`` workers (gloo on CPU, nccl on GPU), and writes the output directory:

- ``adapter/``: the trained adapter (``nexus.load_adapter`` format)
- ``metrics.jsonl``: one line per optimizer step (loss, CE, KD, LR, grad norm, tokens/s,
  held-out perplexity where evaluated)
- ``train_curves.png`` and ``train_summary.json``
- ``tensorboard/``: with ``report_to: [tensorboard]``, the event files (see
  :mod:`.reporting` for the trackers)

Ray Train keeps its checkpoints under ``storage_path/name``; relaunching with the same pair
resumes from the latest checkpoint (the default name is derived from the output path, so
rerunning the same command resumes an interrupted run; ``restart`` discards it instead).

The package: :mod:`.config` (the settings), :mod:`.data` (packed blocks, the fixed order each
rank reads), :mod:`.losses` (chunked CE and KD), :mod:`.core` (model set-up and one optimizer
step, shared with the benchmarks), :mod:`.schedule`, :mod:`.state` (pickle-free checkpoints),
:mod:`.parallel` (DDP or FSDP2 over the workers), :mod:`.loop` (the per-worker loop Ray Train runs),
:mod:`.reporting` (experiment trackers).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.fs
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from nexus.data.corpus import skipped_documents
from nexus.errors import NexusError, user_errors
from nexus.method.adapter import read_adapter_config
from nexus.models.loading import load_config, resolve_experts
from nexus.stages.train.config import TrainConfig
from nexus.stages.train.data import blocks_consumed, packed_dataset, packing
from nexus.stages.train.loop import ADAPTER_DIR, train_loop_per_worker
from nexus.stages.train.reporting import check_trackers, copy_logs, tensorboard_dir
from nexus.util.artifacts import atomic_dir, claim_output, claims_released, is_uri, write_json
from nexus.util.cluster import check_gpus, ensure_ray
from nexus.util.preflight import check_adapter_matches, check_seq_len, check_weights

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "run"]


def default_storage(output: str) -> str:
    out = Path(output).resolve()
    return str(out.parent / ".nexus_ray")


def _plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [(m["step"], m["eval_ppl"]) for m in metrics if "eval_ppl" in m]
    metrics = [m for m in metrics if "loss" in m]  # step 0 holds only the initial evaluation
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [m["loss"] for m in metrics], label="loss")
    axes[0].plot(steps, [m["ce"] for m in metrics], label="CE")
    axes[0].plot(steps, [m["kd"] for m in metrics], label="KD")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(steps, [m["lr"] for m in metrics])
    axes[1].set_title("learning rate")
    if evals:
        axes[2].plot(*zip(*evals), marker="o")
        axes[2].set_title("held-out perplexity")
    else:
        axes[2].plot(steps, [m["grad_norm"] for m in metrics])
        axes[2].set_title("gradient norm")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@claims_released()
def run(cfg: TrainConfig | None = None, /, **kwargs) -> Path:
    """Train the shared experts and write ``cfg.output``; returns the output directory."""
    cfg = TrainConfig.build(cfg, **kwargs)
    if cfg.eval_every and not cfg.eval_corpus:
        raise NexusError("eval_every is set but no eval_corpus was given; pass --eval-corpus PATH")
    check_trackers(cfg.report_to)  # a missing extra: here, not on the rank-0 worker
    if cfg.kd == "offline" and cfg.kd_weight > 0 and not cfg.teacher:
        raise NexusError(
            "--kd offline needs --teacher DIR, the output of `nexus distill`; or use --kd online"
        )
    claim_output(cfg.output, cfg.overwrite)
    config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    experts = resolve_experts(config, cfg.experts, model=cfg.model)
    check_seq_len(config, cfg.seq_len)
    check_weights(cfg.model)  # damaged or missing files: here, not on every worker
    if cfg.adapter:
        check_adapter_matches(cfg.adapter, config)  # another model's adapter: before any worker starts
    recorded = read_adapter_config(cfg.adapter).get("init") if cfg.adapter else None
    init_meta = recorded or {"method": cfg.init, "gate": cfg.gate}
    ensure_ray()
    if cfg.use_gpu:
        check_gpus(cfg.workers, "training", "drop --use-gpu (train on CPU) or add GPU nodes")
    skipped = skipped_documents(cfg.skip_bad_documents)
    data = packing(cfg, skipped)
    datasets = {"train": packed_dataset(cfg.corpus, cfg.model, **data)}
    if cfg.kd == "offline" and cfg.kd_weight > 0:
        datasets["train"] = offline_dataset(cfg, config, datasets["train"])
    if cfg.eval_every:
        datasets["eval"] = packed_dataset(cfg.eval_corpus, cfg.model, **data)
    skip_record = skipped.finish() if skipped else None  # logs how many were skipped
    storage = cfg.storage_path or default_storage(cfg.output)
    if cfg.restart:
        delete_run(storage, cfg.run_name)
    events = tensorboard_dir(storage, cfg.run_name)
    if "tensorboard" in cfg.report_to:
        log.info("TensorBoard: tensorboard --logdir %s", events)
    threads = cfg.cpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(),
            "init_meta": init_meta,
            "threads": threads,
            "tensorboard_dir": events,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": threads}
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    with user_errors("training"):
        result = trainer.fit()
    if result.checkpoint is None:
        raise NexusError("training finished without a checkpoint; see the Ray logs above")
    with atomic_dir(cfg.output, overwrite=cfg.overwrite) as tmp, result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        if not (ckpt / ADAPTER_DIR).is_dir():
            raise NexusError("the last checkpoint holds no adapter; the run did not reach its final step")
        shutil.copytree(ckpt / ADAPTER_DIR, tmp / ADAPTER_DIR)
        shutil.copy2(ckpt / "metrics.jsonl", tmp / "metrics.jsonl")
        if "tensorboard" in cfg.report_to:
            copy_logs(events, tmp / "tensorboard")
        metrics = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line]
        state = json.loads((ckpt / "state.json").read_text())
        _plot(metrics, tmp / "train_curves.png")
        write_json(
            tmp / "train_summary.json",
            {
                "steps": metrics[-1]["step"] if metrics else 0,
                "tokens": sum(m.get("tokens", 0) for m in metrics),
                "final": metrics[-1] if metrics else {},
                "checks": {
                    k: state[k]
                    for k in (
                        "replicas_identical",
                        "replica_digests",
                        "base_unchanged",
                        "data_digests",
                        "placement",
                    )
                    if k in state
                },
                "config": cfg.model_dump(),
                "experts": experts,
                # steps at which the run restarted from a checkpoint (worker failures, relaunches)
                "resumes": state.get("resumes", []),
                "ray_run": str(Path(storage) / cfg.run_name),
                **({"skipped_documents": skip_record} if skip_record is not None else {}),
            },
        )
    log.info("trained adapter written to %s", Path(cfg.output) / ADAPTER_DIR)
    return Path(cfg.output)


def offline_dataset(cfg: TrainConfig, config, blocks):
    """Training's blocks zipped with ``nexus distill``'s teacher rows, after checking that the
    distill output was made for this model, data and settings (:mod:`nexus.stages.distill`)."""
    from nexus.stages import distill

    manifest = distill.read_manifest(cfg.teacher)
    distill.check_matches(cfg.teacher, manifest, cfg, config)
    needed = blocks_consumed(
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, workers=cfg.workers, steps=cfg.total_steps
    )
    return distill.aligned_dataset(blocks, cfg.teacher, manifest, needed)


def delete_run(storage_path: str, name: str) -> None:
    """Remove the Ray Train run ``<storage_path>/<name>`` (local path or URI), if there is one."""
    if not is_uri(storage_path):
        shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
        return
    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    path = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


def summary_lines(out: Path, cfg: TrainConfig) -> list[str]:
    return [f"adapter: {out / ADAPTER_DIR}"]


def job_inputs(job) -> dict:
    """In the job: the training corpus, convert's adapter, the held-out domain corpus (for
    ``eval_every``) and the job's Ray Train storage."""
    eval_corpus = job.eval_corpora.get("domain", []) if job.section("train").eval_every else []
    return {
        "model": job.model_dir,
        "corpus": job.train_corpus,
        "adapter": job.stage_dir("convert"),
        "teacher": job.stage_dir("distill") if job.enabled("distill") else None,
        "eval_corpus": eval_corpus,
        "storage_path": job.storage_path,
    }


def job_run_options(job, fingerprint: str) -> dict:
    """One Ray Train run per fingerprint: an interrupted job resumes it when rerun with the same
    settings and inputs, a changed one starts its own, and a forced stage starts afresh (the same
    fingerprint names the same run, which would resume at its final step)."""
    return {"name": f"train-{fingerprint[:12]}", "restart": job.forced("train")}
