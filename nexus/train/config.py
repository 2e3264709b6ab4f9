"""Training settings, validated up front with one-line errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from nexus.errors import NexusError


@dataclass
class TrainConfig:
    """Everything ``nexus train`` needs. Sizes are per worker unless stated otherwise."""

    model: str = ""
    corpus: list[str] = field(default_factory=list)
    output: str = ""
    #: initial adapter (from ``nexus convert``); without one, experts are attached with ``init``
    adapter: str | None = None
    init: str = "zero"
    gate: str = "scalar"
    intermediate_size: int | None = None
    text_field: str = "text"
    eval_corpus: list[str] = field(default_factory=list)
    #: skip damaged documents of the corpora (counted in train_summary.json) instead of stopping
    skip_bad_documents: bool = False
    # -- scale ----------------------------------------------------------------------------
    workers: int = 1
    #: CPU threads (and Ray CPUs) per training worker
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_steps: int | None = 200
    #: stop after this many training tokens across all workers (overrides max_steps)
    max_tokens: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    max_doc_tokens: int | None = 4096
    # -- optimisation ---------------------------------------------------------------------
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    train_router: bool = False
    #: with a trainable router: weight of KL(base routing || current routing)
    router_kl_weight: float = 0.0
    gradient_checkpointing: bool = False
    loss_chunk: int = 256
    seed: int = 0
    dtype: str = "auto"
    #: how the frozen routed experts are held: auto (packed for MXFP4 checkpoints), packed, dequantized
    experts: str = "auto"
    # -- evaluation, checkpoints, fault tolerance -------------------------------------------
    eval_every: int = 0
    eval_batches: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 0
    #: Ray Train run name and storage; relaunching with the same pair resumes (default name:
    #: derived from the output path, so rerunning the same command resumes)
    name: str | None = None
    storage_path: str | None = None
    trust_remote_code: bool = False
    #: hash every frozen base tensor before and after training and record whether they are
    #: bitwise unchanged (costs one pass over the weights; on by default for small models)
    verify_base: bool = False

    def validate(self) -> TrainConfig:
        if not self.model:
            raise NexusError("no base model given; pass --model DIR")
        if not self.corpus:
            raise NexusError("no training corpus given; pass --corpus PATH")
        if not self.output:
            raise NexusError("no output directory given; pass --output DIR")
        positive = {
            "workers": self.workers,
            "cpus_per_worker": self.cpus_per_worker,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "seq_len": self.seq_len,
            "loss_chunk": self.loss_chunk,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "eval_batches": self.eval_batches,
        }
        for name, value in positive.items():
            if value is None or value <= 0:
                raise NexusError(f"{name} must be positive, got {value}")
        if self.max_steps is None and self.max_tokens is None:
            raise NexusError("give a training length: max_steps or max_tokens")
        for name in ("max_steps", "max_tokens", "intermediate_size", "max_doc_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise NexusError(f"{name} must be positive, got {value}")
        for name in ("warmup_steps", "eval_every", "max_failures"):
            if getattr(self, name) < 0:
                raise NexusError(f"{name} must be zero or more, got {getattr(self, name)}")
        if not self.lr > 0:
            raise NexusError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise NexusError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.kd_weight < 0 or self.router_kl_weight < 0 or self.weight_decay < 0:
            raise NexusError("kd_weight, router_kl_weight and weight_decay must be zero or more")
        if not self.kd_temperature > 0:
            raise NexusError(f"kd_temperature must be positive, got {self.kd_temperature}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise NexusError(f"max_grad_norm must be zero (off) or more, got {self.max_grad_norm}")
        if self.router_kl_weight > 0 and not self.train_router:
            raise NexusError("router_kl_weight needs train_router (the router is frozen otherwise)")
        if self.eval_every and not self.eval_corpus:
            raise NexusError("eval_every is set but no eval_corpus was given")
        return self

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        import hashlib
        from pathlib import Path

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NexusError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**d)
