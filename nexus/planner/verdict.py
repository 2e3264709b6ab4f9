"""Devices, verdicts and advice: does a stage fit, and which setting makes it fit if not."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from nexus.planner.model import ModelFacts
from nexus.planner.stages import PLANNERS, RUNTIME, StagePlan, frozen_weights
from nexus.planner.units import gb, gb_text
from nexus.planner.workload import STRATEGIES, Workload


@dataclass(frozen=True)
class Devices:
    """What a stage's worker may use: per GPU, and per CPU node (shared by the workers on it)."""

    gpus: int | None = None
    gpu_memory: int | None = None
    cpu_memory: int | None = None
    cpu_nodes: int = 1
    #: where the numbers come from ("given", "this machine", "the Ray cluster")
    source: str = "given"

    def available(self, w: Workload) -> float | None:
        if w.device == "gpu":
            if self.gpu_memory is None:
                return None
            return self.gpu_memory * min(1.0, w.gpus_per_worker or 1.0)
        if self.cpu_memory is None:
            return None
        return self.cpu_memory / math.ceil(w.workers / max(1, self.cpu_nodes))

    def to_dict(self) -> dict:
        return {
            "gpus": self.gpus,
            "gpu_memory_gb": None if self.gpu_memory is None else gb(self.gpu_memory),
            "cpu_memory_gb": None if self.cpu_memory is None else gb(self.cpu_memory),
            "cpu_nodes": self.cpu_nodes,
            "source": self.source,
        }


def machine_memory() -> int:
    """Physical memory of this machine (bytes)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_memory_here() -> int | None:
    """Memory of this process's first GPU (bytes); None without one."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def _candidates(f: ModelFacts, w: Workload, devices: Devices) -> list[tuple[str, list[Workload]]]:
    """Settings that lower a stage's memory, in the order we suggest them (least effect on the
    result first), each with its values from the mildest change to the strongest."""
    s = w.stage
    out: list[tuple[str, list[Workload]]] = []
    if s == "train" and w.strategy == "ddp" and w.workers > 1:  # the same training, 1/N of the base
        out.append(("train.strategy", [replace(w, strategy="fsdp")]))
    if s == "train" and not w.gradient_checkpointing:
        out.append(("train.gradient_checkpointing", [replace(w, gradient_checkpointing=True)]))
    if w.experts == "dequantized" and f.mxfp4:
        out.append(("model.experts", [replace(w, experts="packed")]))
    out.append((f"{s}.batch_size", [replace(w, batch_size=b) for b in _halvings(w.batch_size, 1)]))
    if s == "train":
        out.append(("train.loss_chunk", [replace(w, loss_chunk=c) for c in _halvings(w.loss_chunk, 32)]))
    out.append((f"{s}.seq_len", [replace(w, seq_len=n) for n in _halvings(w.seq_len, 128)]))
    if s != "collect":
        width = w.intermediate_size or f.shared_spec["intermediate_size"]
        out.append(
            ("convert.intermediate_size", [replace(w, intermediate_size=i) for i in _halvings(width, 64)])
        )
    if w.device == "cpu" and w.workers > devices.cpu_nodes:
        out.append(
            (f"{s}.workers", [replace(w, workers=n) for n in range(w.workers - 1, devices.cpu_nodes - 1, -1)])
        )
    return [(key, values) for key, values in out if values]


def _halvings(value: int, floor: int) -> list[int]:
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


#: job-config keys whose Workload field has another name
_ATTRS = {"model.experts": "experts", "convert.intermediate_size": "intermediate_size"}


def _setting_value(key: str, w: Workload):
    value = getattr(w, _ATTRS.get(key, key.split(".")[1]))
    return str(value).lower() if isinstance(value, bool) else value


def _hint(key: str, w: Workload, devices: Devices) -> str:
    if key.endswith(".batch_size") and w.stage == "train":
        return f"{key}: {w.batch_size} (raise train.grad_accum or train.workers to keep the tokens per step)"
    if key.endswith(".workers"):
        per_node = math.ceil(w.workers / max(1, devices.cpu_nodes))
        return f"{key}: {w.workers} ({per_node} per CPU node; or add nodes)"
    return f"{key}: {_setting_value(key, w)}"


def advise(f: ModelFacts, plan: StagePlan, devices: Devices) -> list[str]:
    """What to change so that ``plan`` fits: each single setting that does, at its mildest
    fitting value, in order of preference; else the smallest combination found greedily."""
    w = plan.workload
    fixes = []
    for key, values in _candidates(f, w, devices):
        for v in values:
            peak = PLANNERS[w.stage](f, v).peak
            if peak <= devices.available(v):
                fixes.append(f"set {_hint(key, v, devices)} -> {gb_text(peak)}")
                break
    if fixes:
        return fixes[:4]
    return [_combination(f, w, devices)]


def _combination(f: ModelFacts, w: Workload, devices: Devices) -> str:
    """Several settings at once: each candidate at its strongest until the stage fits (the last
    one at its mildest fitting value), then each earlier one relaxed as far as it still fits."""
    applied: list[tuple[str, list[Workload], int]] = []  # (key, values, index applied)
    combo = w

    def with_values(chosen) -> Workload:
        out = w
        for key, values, i in chosen:
            out = _apply(out, key, values[i])
        return out

    fits = lambda cand: PLANNERS[w.stage](f, cand).peak <= devices.available(cand)  # noqa: E731
    for key, values in _candidates(f, w, devices):
        hit = next((i for i, v in enumerate(values) if fits(_apply(combo, key, v))), None)
        applied.append((key, values, len(values) - 1 if hit is None else hit))
        combo = with_values(applied)
        if hit is not None:
            break
    else:
        fixed = sum(frozen_weights(f, w)) * STRATEGIES[w.strategy].frozen_share(w.workers) + RUNTIME[w.device]
        return (
            f"no setting is enough: the frozen weights and the runtime alone take {gb_text(fixed)} per "
            "worker; use a device with more memory"
        )
    for n in range(len(applied) - 1):
        key, values, i = applied[n]
        for j in range(i):
            trial = applied[:n] + [(key, values, j)] + applied[n + 1 :]
            if fits(with_values(trial)):
                applied[n] = (key, values, j)
                break
    final = with_values(applied)
    hints = ", ".join(_hint(key, final, devices) for key, _, _ in applied)
    return f"set {hints} together -> {gb_text(PLANNERS[w.stage](f, final).peak)}"


def _apply(current: Workload, key: str, value: Workload) -> Workload:
    """``current`` with the setting ``key`` taken from ``value``."""
    attr = _ATTRS.get(key, key.split(".")[1])
    return replace(current, **{attr: getattr(value, attr)})


def judge(f: ModelFacts, plan: StagePlan, devices: Devices) -> StagePlan:
    """Fill in the device memory, the verdict and, when it does not fit, the advice."""
    plan.available = devices.available(plan.workload)
    if plan.available is None:
        what = "--gpu-memory" if plan.workload.device == "gpu" else "--cpu-memory"
        plan.notes.append(f"device memory unknown: pass {what}")
        return plan
    plan.fits = plan.peak <= plan.available
    if not plan.fits:
        plan.advice = advise(f, plan, devices)
        note = larger_than_a_device(f, plan, devices)
        if note:
            plan.notes.append(note)
    return plan


#: worker counts tried for FSDP (GPUs: one node of 8, then whole nodes)
FSDP_WORKERS = (2, 4, 8, 16, 24, 32, 48, 64)


def larger_than_a_device(f: ModelFacts, plan: StagePlan, devices: Devices) -> str | None:
    """What a stage whose frozen base alone does not fit one worker's device needs instead.

    Training: ``train.strategy: fsdp`` over enough workers (the smallest count that fits, from
    :data:`FSDP_WORKERS`). Collection and evaluation run forward only and have no FSDP path:
    they need the model split over several GPUs of one node (transformers' ``device_map``
    pipeline split), the number of GPUs its weights take."""
    w = plan.workload
    weights = sum(frozen_weights(f, w)) * STRATEGIES[w.strategy].frozen_share(w.workers)
    available = devices.available(w)
    if available is None or weights + RUNTIME[w.device] <= available or w.device != "gpu":
        return None
    if w.stage == "train":
        for n in FSDP_WORKERS:
            fsdp = replace(w, strategy="fsdp", workers=n)
            peak = PLANNERS["train"](f, fsdp).peak
            if peak <= devices.available(fsdp):
                return (
                    f"the frozen base alone ({gb_text(weights)}) does not fit one GPU: train with "
                    f"train.strategy: fsdp and train.workers: {n} or more -> {gb_text(peak)} per GPU"
                )
        return f"the frozen base ({gb_text(weights)}) does not fit one GPU even sharded over {n} FSDP workers"
    gpus = math.ceil(weights / max(available - RUNTIME[w.device], 1))
    return (
        f"the frozen base alone ({gb_text(weights)}) does not fit one GPU: a forward-only stage needs it "
        f"split over ~{gpus} GPUs of one node (device_map pipeline split; see README, 'Bases larger than one GPU')"
    )
