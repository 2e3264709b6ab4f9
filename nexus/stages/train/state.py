"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint holds only what training changes: the trainable tensors (by parameter name),
the AdamW moments, the scheduler and step counters, the data position and the metrics so
far. Everything loads with ``safetensors`` and ``json``, so a checkpoint handed to us by
someone else can never execute code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
METRICS = "metrics.jsonl"


def save_training_state(
    directory: Path, model, optimizer, scheduler, state: dict, metrics: list[dict]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(directory / TRAINABLE))
    opt = optimizer.state_dict()
    tensors = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    save_file(tensors, str(directory / OPTIMIZER))
    payload = {
        **state,
        "param_names": names,
        "param_groups": opt["param_groups"],
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
            params[name].copy_(value)
    tensors = load_file(str(directory / OPTIMIZER))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, field = key.split(".", 1)
        state.setdefault(int(idx), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": payload["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **payload["scheduler"]})
    metrics = [json.loads(line) for line in (directory / METRICS).read_text().splitlines() if line]
    return payload, metrics
