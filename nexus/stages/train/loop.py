"""The per-worker training loop run by Ray Train's ``TorchTrainer``.

Each worker loads the base model once, trains only the shared experts (and the router when
asked) with AdamW, synchronises their gradients with DDP (frozen parameters are excluded
from DDP entirely) or shards everything with FSDP2 (``strategy``, :mod:`.parallel`), and rank
0 writes checkpoints through ``ray.train.report``. The shared
experts are fp32 master weights whatever the base's dtype or the initial adapter's stored
dtype (``load_adapter(trainable=True)`` widens a bf16/fp16 adapter), so the trained adapter
is written in fp32; a trained router keeps the base's dtype. A restarted or relaunched run picks up the latest checkpoint and
skips exactly the micro-batches it already consumed.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from nexus.stages.train.config import TrainConfig
from nexus.stages.train.core import (
    Backbone,
    BaseRouters,
    evaluate_sums,
    make_optimizer,
    optimizer_step,
    prepare_model,
)
from nexus.stages.train.data import quiet_data_progress, rank_batches, rank_teacher_batches
from nexus.stages.train.parallel import (
    full_tensor,
    load_device,
    local_tensor,
    no_sync,
    peak_memory,
    placement,
    wrap,
)
from nexus.stages.train.reporting import Trackers
from nexus.stages.train.state import gather_training_state, load_training_state, save_training_state

ADAPTER_DIR = "adapter"


def _digest(tensors) -> str:
    """sha256 over tensors' raw bytes: equal digests mean bitwise-equal tensors (FSDP: of what
    this worker holds, its shards)."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        t = local_tensor(t)
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _chain_digest(previous: str, ids: torch.Tensor) -> str:
    """Hash chain over the micro-batches a rank consumed, in order: ``sha256(previous || ids)``
    (int64 bytes). Stored in every checkpoint and in the summary (``data_digests``, one per
    rank), so a resumed run continues the chain and can be compared with a fault-free run, and
    the ranks' data can be checked against the assignment rule of ``rank_batches``."""
    import hashlib

    data = ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(previous.encode() + data).hexdigest()


def _gather_strings(value: str, world: int) -> list[str]:
    if world == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def _all_reduce(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from tqdm import tqdm

    cfg = TrainConfig.model_validate(config["train"])
    quiet_data_progress()
    init_meta = config.get("init_meta") or {}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    torch.manual_seed(cfg.seed)
    on_gpu = device.type == "cuda"
    dtype = "bfloat16" if on_gpu and cfg.dtype == "auto" else cfg.dtype
    model = prepare_model(cfg, load_device(cfg.strategy, device, rank, world), dtype=dtype)
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext
    backbone = Backbone(model)
    student = wrap(backbone, cfg.strategy, device, world)
    base_routers = BaseRouters.for_config(model, cfg)  # before a checkpoint loads trained routers
    # shared experts are fp32 (master weights) whatever the base dtype; bf16 compute comes from
    # autocast; under FSDP these are this worker's shards, and AdamW's moments follow them
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(trainable, cfg)
    total = cfg.total_steps
    resident = placement(model)
    # packed experts are buffers: they are part of the frozen base too
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    base_digest = _digest(frozen) if cfg.verify_base else None

    start, metrics, resumes, data_digest, payload = 0, [], [], "", {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            payload, metrics = load_training_state(Path(d), model, optimizer, scheduler)
        start = int(payload["step"])
        # every restart (a failed worker, a relaunched job) is recorded with the step it resumed at
        resumes = [int(s) for s in payload.get("resumes", [])] + [start]
        digests = payload.get("data_digests") or []
        data_digest = digests[rank] if rank < len(digests) else ""
    trackers = Trackers.open(
        cfg.report_to,
        rank=rank,
        log_dir=config.get("tensorboard_dir"),
        run_name=cfg.run_name,
        settings=cfg.model_dump(),
        start=start,
        ids=payload.get("trackers"),
        project=cfg.report_project,
    )

    offline = cfg.kd == "offline" and cfg.kd_weight > 0
    # offline KD: the "train" dataset holds each block zipped with its teacher row (nexus distill)
    train_iter = (rank_teacher_batches if offline else rank_batches)(
        ray.train.get_dataset_shard("train"),
        batch_size=cfg.batch_size,
        rank=rank,
        world=world,
        skip=start * cfg.grad_accum,
    )
    eval_shard = ray.train.get_dataset_shard("eval") if cfg.eval_every else None

    def held_out() -> dict:
        """Held-out loss on the first ``eval_batches`` micro-batches of every rank."""
        batches = rank_batches(eval_shard, batch_size=cfg.batch_size, rank=rank, world=world, cycle=False)
        nll, n = evaluate_sums(
            model,
            (b.to(device) for b, _ in _take(batches, cfg.eval_batches)),
            chunk=cfg.loss_chunk,
            autocast=autocast(),
            backbone=backbone,
        )
        nll, n = _all_reduce([nll, float(n)], world)
        loss = nll / max(n, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}

    if cfg.eval_every and start == 0:  # the starting point of the held-out curve
        metrics.append({"step": 0, **held_out()})
        trackers.log(metrics[-1])
    bar = tqdm(total=total, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
    for step in range(start, total):
        t0 = time.perf_counter()
        micro_batches, teachers = [], []
        for _ in range(cfg.grad_accum):
            ids, epoch, *teacher = next(train_iter)
            data_digest = _chain_digest(data_digest, ids)
            micro_batches.append(ids.to(device))
            teachers += [t.to(device) for t in teacher]
        res = optimizer_step(
            model,
            student,
            micro_batches,
            cfg,
            optimizer,
            scheduler,
            trainable,
            base_routers=base_routers,
            autocast=autocast,
            no_sync=no_sync(student, cfg.strategy, world),
            teachers=teachers,
        )
        lr, grad_norm = res.lr, res.grad_norm
        ce, kd, rkl, tokens_all = _all_reduce([res.ce, res.kd, res.router_kl, float(res.tokens)], world)
        ce, kd, rkl = ce / world, kd / world, rkl / world
        elapsed = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "loss": ce + cfg.kd_weight * kd + cfg.router_kl_weight * rkl,
            "ce": ce,
            "kd": kd,
            "router_kl": rkl,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens_all),
            "tokens_per_s": tokens_all / max(elapsed, 1e-9),
            "epoch": epoch,
        }
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total):
            row.update(held_out())
        metrics.append(row)
        trackers.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        last = step + 1 == total
        if last or (step + 1) % cfg.checkpoint_every == 0:
            checks = (
                _final_checks(trainable, frozen, base_digest, world, {**resident, **peak_memory(device)})
                if last
                else {}
            )
            checks["data_digests"] = _gather_strings(data_digest, world)
            trackers.flush()
            checks["trackers"] = trackers.ids  # a resumed run continues the same tracker runs
            _report(
                model, optimizer, scheduler, step + 1, metrics, rank, last, cfg, init_meta, checks, resumes
            )
    bar.close()
    if start >= total:  # relaunched after the run had finished: report the final state again
        checks = _final_checks(trainable, frozen, base_digest, world, {**resident, **peak_memory(device)})
        checks["data_digests"] = _gather_strings(data_digest, world)
        checks["trackers"] = trackers.ids
        _report(model, optimizer, scheduler, total, metrics, rank, True, cfg, init_meta, checks, resumes)
    trackers.close()


def _final_checks(trainable, frozen, base_digest: str | None, world: int, resident: dict) -> dict:
    """DDP consistency: every rank must end with bitwise-identical trainable tensors (FSDP: the
    tensors gathered from the shards, as the checkpoint holds them); what each rank held."""
    digests = _gather_strings(_digest([full_tensor(p) for p in trainable]), world)
    checks = {"replica_digests": digests, "replicas_identical": len(set(digests)) == 1}
    checks["placement"] = [json.loads(r) for r in _gather_strings(json.dumps(resident), world)]
    if base_digest is not None:
        checks["base_unchanged"] = _digest(frozen) == base_digest
    return checks


def _take(iterator, n: int):
    for i, item in enumerate(iterator):
        if i >= n:
            return
        yield item


def _report(
    model,
    optimizer,
    scheduler,
    step: int,
    metrics: list[dict],
    rank: int,
    last: bool,
    cfg: TrainConfig,
    init_meta: dict,
    checks: dict,
    resumes: list[int],
):
    import ray.train

    from nexus.method.adapter import adapter_state_dict, save_adapter

    latest = metrics[-1] if metrics else {}
    reported = {k: v for k, v in latest.items() if isinstance(v, (int, float))}
    reported["step"] = step
    # every rank takes part in gathering FSDP's shards; rank 0 writes
    gathered = gather_training_state(model, optimizer, keep=rank == 0)
    adapter = adapter_state_dict(model, gather=full_tensor) if last else None
    if rank != 0:
        ray.train.report(reported, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = {"step": step, "micro_batches": step * cfg.grad_accum, "resumes": resumes, **checks}
        save_training_state(Path(tmp), model, optimizer, scheduler, state, metrics, gathered)
        if last:
            summary = {
                "steps": step,
                "final_loss": latest.get("loss"),
                "tokens": sum(m.get("tokens", 0) for m in metrics),
                **checks,
            }
            save_adapter(
                model,
                Path(tmp) / ADAPTER_DIR,
                base_model=cfg.model,
                init=init_meta,
                extra={"training": summary},
                tensors=adapter,
            )
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp))
