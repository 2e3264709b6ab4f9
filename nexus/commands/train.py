"""``nexus train``: train the shared experts on Ray Train (flags mirror :class:`TrainConfig`)."""

from __future__ import annotations

import dataclasses

from nexus.commands.common import EXPERTS_HELP, add_config_arguments

ORDER = 60

HELP = {
    "model": "base model directory",
    "corpus": "training corpus: files, directories, globs or URIs (text, JSONL, Parquet)",
    "output": "output directory: adapter/, metrics.jsonl, train_curves.png, train_summary.json",
    "adapter": "initial adapter from `nexus convert` (default: attach fresh experts with --init)",
    "init": "init without --adapter: zero (starts equal to the base) or random",
    "gate": "output gate without --adapter: scalar, sigmoid or none",
    "eval_corpus": "held-out corpus for periodic perplexity",
    "skip_bad_documents": "skip damaged documents of the corpora (counted and reported) instead of stopping",
    "workers": "Ray Train workers (DDP ranks)",
    "cpus_per_worker": "CPU threads per worker",
    "use_gpu": "one GPU per worker (nccl + bf16 autocast)",
    "max_steps": "optimizer steps",
    "max_tokens": "train for this many tokens in total instead of --max-steps",
    "batch_size": "sequences per micro-batch per worker",
    "grad_accum": "micro-batches per optimizer step",
    "seq_len": "tokens per packed training sequence",
    "lr": "peak learning rate (AdamW)",
    "warmup_steps": "linear warmup steps",
    "min_lr_ratio": "cosine decay floor as a fraction of the peak LR",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "kd_weight": "weight of T^2 KL(base || student) distillation",
    "kd_temperature": "distillation temperature T",
    "train_router": "train the routers too",
    "router_kl_weight": "with --train-router: weight of KL(initial routing || routing)",
    "gradient_checkpointing": "recompute decoder-layer activations in backward",
    "eval_every": "held-out evaluation interval in steps (0: off)",
    "checkpoint_every": "checkpoint interval in steps",
    "keep_checkpoints": "checkpoints kept by Ray Train",
    "max_failures": "worker failures Ray Train recovers from (restart from the last checkpoint)",
    "name": "Ray Train run name (same name + storage path resumes)",
    "storage_path": "Ray Train storage (local path or URI; shared storage for multi-node)",
    "experts": EXPERTS_HELP,
}
_SKIP = {"verify_base"}


def register(sub) -> None:
    from nexus.train.config import TrainConfig

    p = sub.add_parser("train", help="train the shared experts (Ray Train, DDP)")
    add_config_arguments(p, TrainConfig, HELP, _SKIP, required=("model", "corpus", "output"))
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if values.get("max_tokens"):
        values["max_steps"] = None
    out = train(TrainConfig(**values), overwrite=args.overwrite)
    print(f"adapter: {out / 'adapter'}")
    return 0
