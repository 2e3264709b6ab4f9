"""Training settings: ``TrainConfig``, the one declaration of ``nexus train``'s flags, the job's
``train:`` section and :func:`nexus.stages.train.run`'s keywords. Sizes are per worker unless
stated otherwise."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from nexus.config import (
    UNLESS_DEFAULT,
    CorpusFormat,
    ExpertsLayout,
    ModelDtype,
    RemoteCode,
    Seeded,
    input_,
    setting,
)


class TrainConfig(ModelDtype, ExpertsLayout, CorpusFormat, Seeded, RemoteCode):
    """``nexus train``: train the shared experts on Ray Train (DDP or FSDP2), distilling from the frozen base."""

    model: str = input_(help="base model directory", identity="model")
    corpus: list[str] = input_(
        help="training corpus: files, directories, globs or URIs (text, JSONL, Parquet)", identity="corpus"
    )
    output: str = input_(
        help="output directory: adapter/, metrics.jsonl, train_curves.png, train_summary.json"
    )
    overwrite: bool = input_(False, help="replace the output directory if it exists")
    #: initial adapter (from ``nexus convert``); without one, experts are attached with ``init``
    adapter: str | None = input_(
        None, help="initial adapter from `nexus convert` (none: attach fresh experts)"
    )
    # without --adapter only (the job always starts from convert's adapter, so no YAML keys)
    init: Literal["zero", "random"] = input_(
        "zero", help="without --adapter: zero (starts equal to the base) or random"
    )
    gate: Literal["scalar", "sigmoid", "none"] = input_("scalar", help="without --adapter: the output gate")
    intermediate_size: int | None = input_(
        None, help="without --adapter: the shared-expert width (none: the experts')"
    )
    eval_corpus: list[str] = input_(
        [], help="held-out corpus for periodic perplexity (with --eval-every)", identity="corpus"
    )
    teacher: str | None = input_(
        None, help="with --kd offline: the output of `nexus distill` for this model, corpus and settings"
    )
    #: Ray Train run name and storage; relaunching with the same pair resumes
    name: str | None = input_(
        None, help="Ray Train run name; the same name and storage resume (none: derived from the output path)"
    )
    storage_path: str | None = input_(
        None,
        help="Ray Train storage, local path or URI; shared storage for multi-node (none: next to the output)",
    )
    restart: bool = input_(
        False, help="discard an earlier run of this name and storage instead of resuming it"
    )
    # -- scale ----------------------------------------------------------------------------
    workers: int = setting(1, help="Ray Train workers (DDP or FSDP ranks)", gt=0)
    strategy: Literal["ddp", "fsdp"] = setting(
        "ddp",
        help="ddp: a full base on every worker; fsdp: the base sharded 1/workers (FSDP2) for bases that "
        "do not fit one device",
    )
    cpus_per_worker: int = setting(1, help="CPU threads (and Ray CPUs) per worker", gt=0)
    use_gpu: bool = setting(False, help="one GPU per worker (nccl + bf16 autocast)")
    max_steps: int | None = setting(200, help="optimizer steps", gt=0)
    max_tokens: int | None = setting(
        None, help="stop after this many training tokens across all workers instead of max_steps", gt=0
    )
    batch_size: int = setting(8, help="sequences per micro-batch per worker", gt=0)
    grad_accum: int = setting(1, help="micro-batches per optimizer step", gt=0)
    seq_len: int = setting(256, help="tokens per packed training sequence", gt=0)
    max_doc_tokens: int | None = setting(
        4096, help="documents are cut to this many tokens before packing", gt=0
    )
    # -- optimisation ---------------------------------------------------------------------
    #: lr and kd_weight: the matched-forgetting study of benchmarks/quality.py (docs/benchmarks.md):
    #: KD weight 1 at lr 3e-3 forgets as much as KD 0.5 at 1e-3 and specialises more, every seed
    lr: float = setting(3e-3, help="peak learning rate (AdamW)", gt=0)
    warmup_steps: int = setting(20, help="linear warmup steps", ge=0)
    min_lr_ratio: float = setting(0.1, help="cosine decay floor as a fraction of the peak LR", ge=0, le=1)
    weight_decay: float = setting(0.0, help="AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, help="gradient clipping norm (0: off)", ge=0)
    kd: Literal["online", "offline", "off"] = setting(
        "online",
        fingerprint=UNLESS_DEFAULT,  # runs from before this setting stay up to date
        help="distillation from the frozen base: online (a teacher forward every step), offline (the "
        "top-k rows of `nexus distill`, --teacher; no teacher forward) or off",
    )
    kd_weight: float = setting(1.0, help="weight of T^2 KL(base || student) distillation", ge=0)
    kd_temperature: float = setting(1.0, help="distillation temperature T", gt=0)
    train_router: bool = setting(False, help="train the routers too")
    router_kl_weight: float = setting(
        0.0, help="with train_router: weight of KL(initial routing || routing)", ge=0
    )
    gradient_checkpointing: bool = setting(False, help="recompute decoder-layer activations in backward")
    loss_chunk: int = setting(256, help="sequence positions per chunk of the vocabulary projection", gt=0)
    # -- evaluation, checkpoints, fault tolerance -------------------------------------------
    eval_every: int = setting(0, help="held-out evaluation interval in steps (0: off)", ge=0)
    eval_batches: int = setting(8, help="held-out micro-batches per evaluation and worker", gt=0)
    checkpoint_every: int = setting(50, help="checkpoint interval in steps", gt=0)
    keep_checkpoints: int = setting(2, fingerprint=False, help="checkpoints kept by Ray Train", gt=0)
    max_failures: int = setting(
        0,
        fingerprint=False,
        help="worker failures Ray Train recovers from (restart from the last checkpoint)",
        ge=0,
    )
    # -- experiment trackers (nexus/stages/train/reporting.py): where the metrics go, not what is
    # trained, so outside the fingerprint (adding a tracker neither reruns nor restarts a run)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = setting(
        [],
        fingerprint=False,
        help="experiment trackers rank 0 logs every metrics.jsonl row to (each an optional extra)",
    )
    report_project: str | None = setting(
        None,
        fingerprint=False,
        help="MLflow experiment / W&B project (none: MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT)",
    )
    verify_base: bool = setting(
        False,
        help="hash every frozen base tensor before and after training and record whether they are bitwise "
        "unchanged (one pass over the weights)",
    )

    def check(self) -> None:
        if self.strategy == "fsdp" and self.workers < 2:
            raise ValueError(
                "strategy fsdp shards the base over the workers and needs at least 2; "
                "set workers to 2 or more, or strategy ddp"
            )
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("give a training length: max_steps or max_tokens")
        if self.router_kl_weight > 0 and not self.train_router:
            raise ValueError("router_kl_weight needs train_router (the router is frozen otherwise)")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        out = Path(self.output).resolve()
        return f"train-{out.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len * self.workers

    @property
    def total_steps(self) -> int:
        if self.max_tokens is not None:
            return max(1, -(-self.max_tokens // self.tokens_per_step))
        return int(self.max_steps)
