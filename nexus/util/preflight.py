"""Checks every stage runs on the driver before it starts any work.

A problem the user can fix should cost a second, not a Ray Data pipeline or a Ray Train
run that dies on a worker: the stages call these right after reading the model's config,
before Ray starts any task. Each raises a one-line :class:`~nexus.errors.NexusError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from nexus.errors import NexusError
from nexus.method.adapter import read_adapter_config
from nexus.models.identity import check_identity, model_identity
from nexus.weights.checkpoint import Checkpoint


def max_positions(config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if it says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_seq_len(config, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse sequences longer than the model's positions.

    Rotary models (GPT-OSS, Qwen, DeepSeek...) run past their maximum without any error and
    silently produce garbage, so NEXUS checks it itself.
    """
    limit = max_positions(config)
    if limit and int(seq_len) > limit:
        raise NexusError(f"seq_len {seq_len} exceeds the model's maximum of {limit} positions; lower {flag}")


def check_weights(model: str | os.PathLike) -> None:
    """Open every safetensors header of a local model directory (reads no tensor data).

    Catches missing, truncated or corrupted files and shards listed in the index but absent,
    before workers load the model. Hub names are left to the loader.
    """
    if not Path(model).is_dir():
        return
    Checkpoint(model)


def check_adapter_matches(adapter: str | os.PathLike, config) -> None:
    """The adapter must come from this model: compare its recorded identity field by field."""
    recorded = read_adapter_config(adapter).get("base_identity", {})
    check_identity(
        recorded,
        model_identity(config),
        f"adapter {adapter}",
        "load it onto the base model it was made from",
    )
