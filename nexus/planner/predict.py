"""``nexus.plan`` / ``nexus plan``: a model, a job config or plain settings, and a device description."""

from __future__ import annotations

import os

from nexus.errors import NexusError
from nexus.planner.job import job_model_config, job_overrides, make_plan, on_gpu
from nexus.planner.report import Plan
from nexus.planner.units import parse_size
from nexus.planner.verdict import Devices, gpu_memory_here, machine_memory
from nexus.planner.workload import STAGES, STRATEGIES


def plan(
    model: str | os.PathLike | None = None,
    *,
    config=None,
    overrides: list[str] | tuple[str, ...] = (),
    gpus: int | None = None,
    gpu_memory: str | float | None = None,
    cpu_memory: str | float | None = None,
    cpu_nodes: int = 1,
    strategy: str | None = None,
    stages: tuple[str, ...] = STAGES,
    **settings,
) -> Plan:
    """Predict every stage's peak memory per worker, from the model's ``config.json`` alone.

    Args:
        model: model directory (only ``config.json`` is read) or Hub name; overrides the job's.
        config: a job YAML path or a loaded ``JobConfig``; default: the built-in job defaults.
        overrides: ``section.key=value`` job-config overrides (as ``--set``).
        gpus, gpu_memory: GPUs in the cluster and memory per GPU (``80GB``, ``79GiB``, GB as a
            number). Without ``config``, giving them runs every stage on GPUs.
        cpu_memory, cpu_nodes: memory per CPU node (default: this machine's) and node count;
            CPU workers of one stage share their node's memory.
        strategy: training strategy, ``ddp`` or ``fsdp`` (sets ``train.strategy``; none: the job's).
        settings: ``batch_size``, ``seq_len``, ``workers``, ``gradient_checkpointing``,
            ``intermediate_size``, ``dtype``, ``experts`` (auto/packed/dequantized),
            ``kd_weight``, ``loss_chunk``, ``grad_accum`` (see :data:`SETTING_KEYS`).
    """
    from nexus.job.config import JobConfig, apply_overrides, load_config, parse_config

    if strategy is not None and strategy not in STRATEGIES:
        raise NexusError(f"unknown training strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise NexusError(f"unknown stage(s) {', '.join(unknown)}; plan covers {', '.join(STAGES)}")
    if model is None and config is None:
        raise NexusError("nothing to plan: give a model (--model DIR) or a job config (--config FILE)")
    extra = job_overrides(settings, gpus=gpus, gpu_memory=gpu_memory, has_config=config is not None)
    if model is not None:
        extra.append(f"model.path={os.fspath(model)}")
    if strategy is not None:
        extra.append(f"train.strategy={strategy}")
    if isinstance(config, JobConfig):
        cfg = parse_config(
            apply_overrides(config.model_dump(mode="json"), [*extra, *overrides]), "job config"
        )
    else:
        cfg = load_config(config, [*extra, *overrides])
    gpu_bytes = parse_size(gpu_memory, "GPU memory") if gpu_memory is not None else None
    if gpu_bytes is None and any(on_gpu(cfg, s) for s in stages):
        gpu_bytes = gpu_memory_here()
    devices = Devices(
        gpus=gpus,
        gpu_memory=gpu_bytes,
        cpu_memory=parse_size(cpu_memory, "CPU memory") if cpu_memory is not None else machine_memory(),
        cpu_nodes=max(1, int(cpu_nodes)),
        source="given" if cpu_memory is not None else "this machine",
    )
    result = make_plan(str(cfg.model.path), job_model_config(cfg), cfg, devices, stages)
    if gpus is not None:
        _check_gpu_count(result, gpus)
    return result


def _check_gpu_count(p: Plan, gpus: int) -> None:
    for s in p.stages.values():
        w = s.workload
        need = w.workers * w.gpus_per_worker if w.device == "gpu" else 0
        if need > gpus:
            s.notes.append(f"needs {need:g} GPUs at once, the cluster has {gpus}")
            s.fits = False
            s.advice = s.advice or [
                f"set {s.stage}.workers: {max(1, int(gpus // max(w.gpus_per_worker, 1e-9)))}"
            ]
