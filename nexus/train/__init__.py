"""Stage 5: train the shared experts with Ray Train (DDP), distilling from the frozen base.

``train(cfg)`` builds the packed training data on Ray Data, runs a ``TorchTrainer`` with
``num_workers`` workers (gloo on CPU, nccl on GPU), and writes the output directory:

- ``adapter/``: the trained adapter (``nexus.load_adapter`` format)
- ``metrics.jsonl``: one line per optimizer step (loss, CE, KD, LR, grad norm, tokens/s,
  held-out perplexity where evaluated)
- ``train_curves.png`` and ``train_summary.json``

Ray Train keeps its checkpoints under ``storage_path/name``; relaunching with the same pair
resumes from the latest checkpoint (the default name is derived from the output path, so
rerunning the same command resumes an interrupted run).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from nexus.artifacts import claims_released
from nexus.errors import NexusError, user_error
from nexus.train.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train"]


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
def train(
    cfg: TrainConfig, *, overwrite: bool = False, init_meta: dict | None = None, fault: dict | None = None
) -> Path:
    """Run stage 5 and write ``cfg.output``; returns the output directory.

    ``fault`` is a test hook (``{"step", "rank", "mode": "raise"|"exit", "marker",
    "await_checkpoint", "wait_s"}``) that fails one worker once, to exercise Ray Train's
    restart-from-checkpoint path.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from nexus.adapter import read_adapter_config
    from nexus.artifacts import atomic_dir, claim_output, write_json
    from nexus.corpus import skipped_documents
    from nexus.loading import load_config, resolve_experts
    from nexus.preflight import check_adapter_matches, check_seq_len, check_weights
    from nexus.ray_utils import check_gpus, ensure_ray
    from nexus.train.data import packed_dataset
    from nexus.train.loop import ADAPTER_DIR, train_loop_per_worker

    cfg.validate()
    claim_output(cfg.output, overwrite)
    config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    experts = resolve_experts(config, cfg.experts, model=cfg.model)
    check_seq_len(config, cfg.seq_len)
    check_weights(cfg.model)  # damaged or missing files: here, not on every worker
    if cfg.adapter:
        check_adapter_matches(cfg.adapter, config)  # another model's adapter: before any worker starts
        init_meta = init_meta or read_adapter_config(cfg.adapter).get("init")
    init_meta = init_meta or {"method": cfg.init, "gate": cfg.gate}
    ensure_ray()
    if cfg.use_gpu:
        check_gpus(cfg.workers, "training", "drop --use-gpu (train on CPU) or add GPU nodes")
    skipped = skipped_documents(cfg.skip_bad_documents)
    datasets = {
        "train": packed_dataset(
            cfg.corpus,
            cfg.model,
            seq_len=cfg.seq_len,
            text_field=cfg.text_field,
            max_doc_tokens=cfg.max_doc_tokens,
            trust_remote_code=cfg.trust_remote_code,
            skipped=skipped,
        )
    }
    if cfg.eval_every:
        datasets["eval"] = packed_dataset(
            cfg.eval_corpus,
            cfg.model,
            seq_len=cfg.seq_len,
            text_field=cfg.text_field,
            max_doc_tokens=cfg.max_doc_tokens,
            trust_remote_code=cfg.trust_remote_code,
            skipped=skipped,
        )
    skip_record = skipped.finish() if skipped else None  # logs how many were skipped
    storage = cfg.storage_path or default_storage(cfg.output)
    threads = cfg.cpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(),
            "init_meta": init_meta,
            "threads": threads,
            "fault": fault,
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
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface user errors as one line
        cause = user_error(exc)
        if cause is not None:
            raise cause from exc
        raise
    if result.checkpoint is None:
        raise NexusError("training finished without a checkpoint; see the Ray logs above")
    with atomic_dir(cfg.output, overwrite=overwrite) as tmp, result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        if not (ckpt / ADAPTER_DIR).is_dir():
            raise NexusError("the last checkpoint holds no adapter; the run did not reach its final step")
        shutil.copytree(ckpt / ADAPTER_DIR, tmp / ADAPTER_DIR)
        shutil.copy2(ckpt / "metrics.jsonl", tmp / "metrics.jsonl")
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
                    for k in ("replicas_identical", "replica_digests", "base_unchanged", "data_digests")
                    if k in state
                },
                "config": cfg.to_dict(),
                "experts": experts,
                # steps at which the run restarted from a checkpoint (worker failures, relaunches)
                "resumes": state.get("resumes", []),
                "ray_run": str(Path(storage) / cfg.run_name),
                **({"skipped_documents": skip_record} if skip_record is not None else {}),
            },
        )
    log.info("trained adapter written to %s", Path(cfg.output) / ADAPTER_DIR)
    return Path(cfg.output)
