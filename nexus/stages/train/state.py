"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint holds only what training changes: the trainable tensors (by parameter name),
the AdamW moments, the scheduler and step counters, the data position and the metrics so
far. Tensors are saved whole (gathered from FSDP's shards), so a checkpoint resumes under
either strategy and any number of workers. Everything loads with ``safetensors`` and ``json``, so a checkpoint handed to us by
someone else can never execute code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nexus.stages.train.parallel import full_tensor, like_param

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
METRICS = "metrics.jsonl"


@dataclass
class TrainingTensors:
    """What a checkpoint holds of the model and the optimizer, as whole CPU tensors."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    param_groups: list[dict]


def gather_training_state(model, optimizer, *, keep: bool = True) -> TrainingTensors | None:
    """The trainable tensors (by parameter name) and AdamW's state (``"<index>.<field>"``) in
    full. Every rank calls it: under FSDP each tensor is gathered from the shards (a
    collective); only a rank with ``keep`` holds the result, so the format does not depend on
    the strategy or the number of workers."""
    trainable = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = full_tensor(p.detach())
            if keep:
                trainable[name] = t.cpu().contiguous()
    opt = optimizer.state_dict()
    tensors = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            t = full_tensor(value.detach()) if torch.is_tensor(value) else torch.tensor(value)
            if keep:
                tensors[f"{idx}.{key}"] = t.cpu().contiguous()
    return TrainingTensors(trainable, tensors, opt["param_groups"]) if keep else None


def save_training_state(
    directory: Path,
    model,
    optimizer,
    scheduler,
    state: dict,
    metrics: list[dict],
    gathered: TrainingTensors | None = None,
) -> None:
    """Write a checkpoint; ``gathered``: :func:`gather_training_state`'s result when the caller
    gathered it on every rank already."""
    gathered = gathered or gather_training_state(model, optimizer)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(gathered.trainable, str(directory / TRAINABLE))
    save_file(gathered.optimizer, str(directory / OPTIMIZER))
    payload = {
        **state,
        "param_names": list(gathered.trainable),
        "param_groups": gathered.param_groups,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
    }
    (directory / STATE).write_text(json.dumps(payload, indent=1))
    (directory / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))


def load_training_state(directory: Path, model, optimizer, scheduler) -> tuple[dict, list[dict]]:
    directory = Path(directory)
    payload = json.loads((directory / STATE).read_text())
    params = dict(model.named_parameters())
    trainable = load_file(str(directory / TRAINABLE))
    if set(trainable) != set(payload["param_names"]) or not set(trainable) <= set(params):
        raise RuntimeError("checkpoint does not match the model's trainable parameters")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(like_param(value, params[name]))
    tensors = load_file(str(directory / OPTIMIZER))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, field = key.split(".", 1)
        # whole moments back onto this rank's shards (FSDP); any worker count reads them
        state.setdefault(int(idx), {})[field] = like_param(value, ordered[int(idx)])
    optimizer.load_state_dict({"state": state, "param_groups": payload["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **payload["scheduler"]})
    metrics = [json.loads(line) for line in (directory / METRICS).read_text().splitlines() if line]
    return payload, metrics
