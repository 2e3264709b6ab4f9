"""How the model sits on the Ray Train workers: ``ddp`` or ``fsdp`` (``train.strategy``).

- ``ddp``: every worker holds the whole frozen base; DDP synchronises the trainable tensors'
  gradients only (the frozen parameters and buffers are registered as ignored).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter, frozen ones
  included, over the workers, one all-gather group per unit:

  * each shared expert on its own (fp32 master weights, trainable: one dtype per group, so a
    trained router in the base's bf16 can share the decoder layer's group);
  * each decoder layer (attention, router, routed experts; GPT-OSS's packed MXFP4 experts too:
    their uint8 buffers are re-registered as frozen parameters so that FSDP shards them; its
    all-gather views mixed dtypes as bytes);
  * the root (the :class:`~nexus.stages.train.core.Backbone`): embeddings, final norm, LM head.

  A worker keeps 1/N of the base at rest and all-gathers one layer at a time. The root is not
  resharded after its forward (FSDP's rule for the root), so the LM head the chunked losses
  apply outside the backbone's forward is the unsharded one, and freed after backward.

Loading under FSDP: only rank 0 reads the checkpoint (onto its CPU); the other ranks build the
model on the meta device, and after sharding rank 0 scatters each tensor's shards to them
(:func:`_from_rank0`), so a node holds one CPU copy of the base while the workers start, never
one per worker, and no GPU ever holds more than its shards and one layer being moved.

Everything that runs the decoder goes through the wrapped backbone (student, KD teacher,
held-out evaluation), since FSDP gathers parameters in the hooks of the modules it wraps.
Checkpoints gather full tensors (:func:`full_tensor`) and load them back by re-sharding
(:func:`like_param`), so their format is the same for both strategies and any worker count.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

Strategy = Literal["ddp", "fsdp"]


def load_device(strategy: Strategy, device: torch.device, rank: int, world: int) -> torch.device:
    """Where a worker loads the base: its device under DDP; under FSDP rank 0 on its CPU (the
    whole base, sharded onto the device by :func:`wrap`) and the others on the meta device."""
    if strategy == "ddp" or world == 1:
        return device
    return torch.device("cpu" if rank == 0 else "meta")


def wrap(backbone: nn.Module, strategy: Strategy, device: torch.device, world: int) -> nn.Module:
    """The module each worker trains through (``backbone`` itself with one worker)."""
    if world == 1:
        return backbone
    return _ddp(backbone, device) if strategy == "ddp" else _fsdp(backbone, device, world)


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters only; frozen ones are never broadcast or reduced."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def _fsdp(backbone: nn.Module, device: torch.device, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nexus.method.attach import shared_expert_modules

    model = backbone.model
    mesh = init_device_mesh(device.type, (world,))
    packed_as_parameters(model)
    # rank 0 loaded the model (on CPU), the others hold its structure on the meta device;
    # rank 0 keeps its whole tensors (not the Parameters: FSDP moves those) to send them
    rank0 = torch.distributed.get_rank() == 0
    full = {n: p.detach() for n, p in backbone.named_parameters()} if rank0 else {}
    for se in shared_expert_modules(model).values():
        # FSDP cannot shard 0-d tensors (the scalar output scale): those stay whole on every
        # rank and their gradients are all-reduced by :func:`sync_replicated_grads`
        scalars = {p for p in se.parameters() if p.dim() == 0}
        fully_shard(se, mesh=mesh, ignored_params=scalars or None)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(backbone, mesh=mesh)
    if not rank0:
        backbone.to_empty(device=device)  # this rank's shards, uninitialised
    _from_rank0(backbone, full, device)
    return backbone


@torch.no_grad()
def _from_rank0(module: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill every rank's shards (and whole tensors: buffers, FSDP-ignored scalars) from rank
    0's, one tensor at a time: rank 0 scatters each parameter's shards (``distribute_tensor``)
    and broadcasts the rest. Rank 0's own shards are already in place."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    rank0 = dist.get_rank() == 0
    for name, p in module.named_parameters():
        src = full[name].to(device) if rank0 else torch.empty(p.shape, dtype=p.dtype, device=device)
        if is_sharded(p):
            shard = distribute_tensor(src, p.device_mesh, p.placements, src_data_rank=0)
            if not rank0:
                p.to_local().copy_(shard.to_local())
        else:
            dist.broadcast(src, 0)
            if not rank0:
                p.copy_(src)
    for _, buf in module.named_buffers():
        dist.broadcast(buf, 0)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (transformers' ``GradientCheckpointingLayer``: every decoder model's
    layer class derives from it)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise RuntimeError(f"no decoder layers found in {type(model).__name__}")
    return layers


def packed_as_parameters(model: nn.Module) -> int:
    """Re-register the packed MXFP4 experts' buffers as frozen parameters (FSDP shards
    parameters, never buffers); their names, values and the module's forward are unchanged.
    Returns how many tensors moved."""
    from nexus.weights.packed import PackedGptOssExperts

    moved = 0
    for module in model.modules():
        if not isinstance(module, PackedGptOssExperts):
            continue
        for name, buf in list(module._buffers.items()):
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(buf, requires_grad=False))
            moved += 1
    return moved


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for FSDP's shards, on every rank: a collective)."""
    return t.full_tensor() if is_sharded(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """What this worker holds of ``t`` (its shard under FSDP)."""
    return t.to_local() if is_sharded(t) else t


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full ``value`` laid out like ``param``: this rank's shard of it when ``param`` is
    sharded (every rank holds the full value, read from the checkpoint: no communication)."""
    if not is_sharded(param) or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def no_sync(student: nn.Module, strategy: Strategy, world: int):
    """A context factory that skips gradient synchronisation for all but the last micro-batch
    (DDP's ``no_sync``; FSDP's ``set_requires_gradient_sync``), or None with one worker."""
    if world == 1:
        return None
    if strategy == "ddp":
        return student.no_sync

    @contextlib.contextmanager
    def fsdp_no_sync():
        student.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            student.set_requires_gradient_sync(True)

    return fsdp_no_sync


def sync_replicated_grads(trainable: list[nn.Parameter]) -> None:
    """Average the gradients of the trainable tensors FSDP keeps whole (ignored: the scalar
    scales) over the workers, as DDP does. In an FSDP run the other trainable tensors are
    sharded (DTensors); without them (DDP, one worker) there is nothing to do."""
    if not any(is_sharded(p) for p in trainable):
        return
    import torch.distributed as dist

    for p in trainable:
        if p.grad is not None and not is_sharded(p):
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())


def grad_norm(trainable: list[nn.Parameter], max_norm: float) -> float:
    """The global gradient norm (clipped to ``max_norm`` when it is > 0), as
    ``clip_grad_norm_`` computes it. Sharded gradients' partial norms combine across ranks
    (``full_tensor``) and with the whole ones' into one norm."""
    grads = [p.grad for p in trainable if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    if not sharded:  # DDP, one worker: torch's own clipping, unchanged
        total = torch.nn.utils.get_total_norm(grads)
        if max_norm:
            torch.nn.utils.clip_grads_with_norm_(trainable, max_norm, total)
        return float(total)
    whole = [g for g in grads if not is_sharded(g)]
    parts = [full_tensor(torch.nn.utils.get_total_norm(sharded))]
    if whole:
        parts.append(torch.nn.utils.get_total_norm(whole).to(parts[0].device))
    total = float(torch.linalg.vector_norm(torch.stack(parts)))
    if max_norm:
        coef = min(max_norm / (total + 1e-6), 1.0)  # clip_grads_with_norm_'s coefficient
        for g in grads:
            g.mul_(coef)
    return total


def placement(model: nn.Module) -> dict:
    """Bytes of the frozen base (parameters and buffers) in full and resident on this worker
    (its local shards), and of the trainable tensors resident here: measured from the tensors
    the worker holds, not derived from the strategy."""

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "frozen_bytes": sum(nbytes(t) for t in frozen),
        "frozen_resident_bytes": sum(nbytes(local_tensor(t)) for t in frozen),
        "trainable_resident_bytes": sum(nbytes(local_tensor(t)) for t in trainable),
    }


def peak_memory(device: torch.device) -> dict:
    """This worker's peak memory so far: the GPU's allocated peak, or the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_device_bytes": int(torch.cuda.max_memory_allocated(device))}
    import resource

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
