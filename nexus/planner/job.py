"""Plans of job configs (:mod:`nexus.job.config`), and the job's preflight: the device memory
asked from the Ray cluster and the one-line refusal of a stage that will not fit."""

from __future__ import annotations

from nexus.errors import NexusError
from nexus.planner.model import ModelFacts, model_facts, shared_params
from nexus.planner.report import Plan
from nexus.planner.stages import PLANNERS
from nexus.planner.units import GB, gb_text
from nexus.planner.verdict import Devices, gpu_memory_here, judge, machine_memory
from nexus.planner.workload import STAGES, STRATEGIES, Workload, resolve_dtype, resolve_experts


def workloads(cfg, f: ModelFacts, config) -> dict[str, Workload]:
    """Each stage's :class:`Workload` from a job config (:class:`nexus.job.config.JobConfig`) for
    the model whose transformers config is ``config``."""
    experts = resolve_experts(cfg.model.experts, f)
    strategy = getattr(cfg.train, "strategy", "ddp")
    if strategy not in STRATEGIES:
        raise NexusError(f"unknown training strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    from nexus.stages.collect import resolve_seq_len

    c, t, e, conv = cfg.collect, cfg.train, cfg.evaluate, cfg.convert
    collect_seq = resolve_seq_len(c.seq_len, config)  # as the job does
    out = {
        "collect": Workload(
            "collect",
            "gpu" if c.gpus_per_worker > 0 else "cpu",
            c.workers,
            c.batch_size,
            collect_seq,
            resolve_dtype(cfg.model.dtype, f, gpu_training=False),
            experts,
            gpus_per_worker=c.gpus_per_worker,
        ),
        "train": Workload(
            "train",
            "gpu" if t.use_gpu else "cpu",
            t.workers,
            t.batch_size,
            t.seq_len,
            resolve_dtype(cfg.model.dtype, f, gpu_training=t.use_gpu),
            experts,
            gpus_per_worker=1.0 if t.use_gpu else 0.0,
            gradient_checkpointing=t.gradient_checkpointing,
            teacher=t.kd if t.kd_weight > 0 else "off",
            teacher_k=cfg.distill.top_k,
            loss_chunk=t.loss_chunk,
            grad_accum=t.grad_accum,
            strategy=strategy,
            intermediate_size=conv.intermediate_size,
            gate=conv.gate,
            train_router=t.train_router,
        ),
    }
    if e.enabled:
        out["evaluate"] = Workload(
            "evaluate",
            "gpu" if e.gpus > 0 else "cpu",
            1,
            e.batch_size,
            e.seq_len,
            resolve_dtype(cfg.model.dtype, f, gpu_training=False),
            experts,
            gpus_per_worker=e.gpus,
            intermediate_size=conv.intermediate_size,
            gate=conv.gate,
        )
    return out


def make_plan(model: str, config, cfg, devices: Devices, stages=STAGES) -> Plan:
    """The :class:`Plan` of job config ``cfg`` for the model whose transformers config is ``config``."""
    f = model_facts(config)
    loads = workloads(cfg, f, config)
    out = {}
    for name in stages:
        if name not in loads:
            continue
        out[name] = judge(f, PLANNERS[name](f, loads[name]), devices)
    t = loads["train"]
    return Plan(model, f, devices, out, shared_params(f, t.intermediate_size, t.gate, t.train_router))


#: ``nexus plan`` / ``nexus.plan`` settings -> the job-config keys they set
SETTING_KEYS = {
    "batch_size": ("collect.batch_size", "train.batch_size", "evaluate.batch_size"),
    "seq_len": ("collect.seq_len", "train.seq_len", "evaluate.seq_len"),
    "workers": ("collect.workers", "train.workers"),
    "gradient_checkpointing": ("train.gradient_checkpointing",),
    "intermediate_size": ("convert.intermediate_size",),
    "dtype": ("model.dtype",),
    "experts": ("model.experts",),
    "kd_weight": ("train.kd_weight",),
    "loss_chunk": ("train.loss_chunk",),
    "grad_accum": ("train.grad_accum",),
}


def job_overrides(settings: dict, *, gpus: int | None, gpu_memory, has_config: bool) -> list[str]:
    """``section.key=value`` overrides for the given settings (``None`` values are left out).

    Without a job config, giving GPUs puts every stage on them: one GPU per collector, one
    training worker per GPU, evaluation on one GPU.
    """
    out = []
    for name, value in settings.items():
        if value is None:
            continue
        if name not in SETTING_KEYS:
            raise NexusError(f"unknown plan setting '{name}'; known: {', '.join(sorted(SETTING_KEYS))}")
        text = str(value).lower() if isinstance(value, bool) else value
        out += [f"{key}={text}" for key in SETTING_KEYS[name]]
    if not has_config and (gpus or gpu_memory):
        workers = settings.get("workers") or gpus or 1
        out += ["collect.gpus_per_worker=1", "train.use_gpu=true", "evaluate.gpus=1"]
        out += [f"collect.workers={workers}", f"train.workers={workers}"]
    return out


def job_model_config(cfg):
    """The transformers config of a job's model (the demo's without building it)."""
    from nexus.job.config import DEMO

    if cfg.model.path == DEMO:
        from nexus.demo.pretrain import model_config, size_config

        return model_config(size_config(cfg.model.demo_size))
    from nexus.models.loading import load_config

    return load_config(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def on_gpu(cfg, stage: str) -> bool:
    """Whether a job config runs ``stage`` on GPUs."""
    return {
        "collect": cfg.collect.gpus_per_worker > 0,
        "train": cfg.train.use_gpu,
        "evaluate": cfg.evaluate.enabled and cfg.evaluate.gpus > 0,
    }[stage]


def cluster_gpu_memory(timeout_s: float = 120.0) -> int | None:
    """Memory of one of the Ray cluster's GPUs, asked from a one-GPU task; None if it has none
    or does not answer in time (the check then skips GPU stages, with a warning)."""
    import logging

    import ray

    from nexus.util.cluster import cluster_gpus

    if cluster_gpus() < 1:
        return None
    ref = ray.remote(gpu_memory_here).options(num_gpus=1, num_cpus=0, name="nexus-gpu-memory").remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # no GPU node came up in time, or no CUDA there
        ray.cancel(ref, force=True)
        logging.getLogger(__name__).warning(
            "could not ask a GPU for its memory (%s); set plan.gpu_memory_gb to check GPU stages", exc
        )
        return None


def cluster_cpu_memory() -> tuple[int, int]:
    """(memory of the largest node, alive nodes) of the Ray cluster; this machine's memory when
    it is the only node (local runs, and the driver's node under ``ray job submit`` to one)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return machine_memory(), 1
    res = [n.get("Resources", {}) for n in nodes]
    return int(max(r.get("memory", 0) + r.get("object_store_memory", 0) for r in res)), len(nodes)


def job_devices(cfg) -> Devices:
    """The memory a job's stages get: ``plan.gpu_memory_gb``/``plan.cpu_memory_gb`` when set,
    else asked from the Ray cluster (see :func:`cluster_gpu_memory`, :func:`cluster_cpu_memory`)."""
    from nexus.util.cluster import cluster_gpus

    section = cfg.plan
    cpu, nodes = cluster_cpu_memory()
    if section.cpu_memory_gb:
        cpu = int(section.cpu_memory_gb * GB)
    gpu = int(section.gpu_memory_gb * GB) if section.gpu_memory_gb else None
    if gpu is None and any(on_gpu(cfg, s) for s in STAGES):
        gpu = cluster_gpu_memory()
    return Devices(
        gpus=int(cluster_gpus()), gpu_memory=gpu, cpu_memory=cpu, cpu_nodes=nodes, source="the Ray cluster"
    )


def check_job(cfg, model_config, devices: Devices) -> Plan:
    """Refuse a job one of whose stages will not fit its device, with one line naming the stage,
    the predicted peak, the memory available and the setting to change."""
    result = make_plan(str(cfg.model.path), model_config, cfg, devices)
    for s in result.failures():
        if s.available is None:
            continue
        where = "GPU" if s.workload.device == "gpu" else "CPU node share"
        raise NexusError(
            f"stage {s.stage} will not fit: predicted peak {gb_text(s.peak)} per worker, "
            f"{gb_text(s.available)} available ({where}); {s.advice[0]} "
            "(nexus plan shows the parts; plan.check: false skips this check)"
        )
    return result
