"""What one training step computes, independent of Ray: model set-up, loss, evaluation.

The Ray Train loop (:mod:`nexus.stages.train.loop`) and the in-process benchmarks share this
code, so the numbers the benchmarks report are the numbers ``nexus train`` produces.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop

from nexus.method.attach import attach_shared_experts, shared_experts_disabled
from nexus.models import find_moe_blocks
from nexus.stages.train.config import TrainConfig
from nexus.stages.train.losses import chunked_lm_losses
from nexus.stages.train.parallel import full_tensor, sync_replicated_grads
from nexus.stages.train.parallel import grad_norm as global_grad_norm


class Backbone(nn.Module):
    """The decoder stack only: returns final hidden states, never full-vocabulary logits.

    DDP wraps this module, so its forward (where the shared experts run) carries the
    gradient hooks, while the frozen LM head is applied chunk by chunk outside it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of the decoder layers while the frozen base stays in eval mode.

    Transformers checkpoints a layer only when that layer is in training mode; we set the
    flag on the layer modules alone, so dropout, router jitter and sampled routing inside
    them keep their eval behaviour (the base is frozen and must stay deterministic).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def prepare_model(cfg: TrainConfig, device: torch.device, dtype=None) -> nn.Module:
    """Load the base, attach or load the shared experts, freeze the rest."""
    from nexus.method.adapter import load_adapter
    from nexus.models.loading import load_model

    model = load_model(
        cfg.model,
        dtype=dtype or cfg.dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        experts=cfg.experts,
    )
    if cfg.adapter:
        load_adapter(model, cfg.adapter, trainable=True)
    else:
        attach_shared_experts(
            model, init=cfg.init, gate=cfg.gate, intermediate_size=cfg.intermediate_size, seed=cfg.seed
        )
    model.requires_grad_(False)
    for p in _shared_params(model):
        p.requires_grad_(True)
    if cfg.train_router:
        for block in find_moe_blocks(model):
            for p in block.router_parameters().values():
                p.requires_grad_(True)
    model.to(device)
    model.eval()
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def _shared_params(model: nn.Module) -> list[nn.Parameter]:
    from nexus.method.attach import shared_expert_modules

    return [p for se in shared_expert_modules(model).values() for p in se.parameters()]


class BaseRouters:
    """The base model's routers, for runs that train the router.

    Keeps a frozen copy of each router's initial projection (E x H, small: no second model)
    and serves two purposes:

    - the KD teacher is the base model: :meth:`teacher_hidden` runs the decoder with these
      projections swapped in for the trained ones, router by router, as
      ``torch.func.functional_call`` swaps them (the model's own parameters are untouched).
      The swap happens in each router's own forward hooks, i.e. after FSDP has gathered the
      layer's parameters (FSDP sets the gathered parameters on the modules when a layer
      starts, which would undo a swap made on the whole decoder beforehand);
    - with ``kl=True``, the router KL term: KL(base routing || current routing) on the
      student's own router inputs, averaged over the MoE layers.

    Router outputs are recorded only inside :meth:`recording`, which
    :func:`compute_losses` opens around the student forward alone, and only with gradients
    on: the teacher pass, held-out evaluation and the recomputation that gradient
    checkpointing runs during backward add nothing. The hook itself only stores the
    router's logits and computes the base logits without gradient, so it saves no tensor
    for backward and a checkpointed layer recomputes exactly what its forward saved; the KL
    is computed from the stored logits after the forward (:meth:`pop_kl`).
    """

    def __init__(self, model: nn.Module, *, kl: bool = False) -> None:
        from nexus.models import family_for_config

        self.family = family_for_config(model.config)
        self.blocks = find_moe_blocks(model)
        # whole tensors (gathered from FSDP's shards: every rank builds this)
        self.initial = [
            {k: full_tensor(v.detach()).clone() for k, v in b.router_parameters().items()}
            for b in self.blocks
        ]
        self.kl = kl
        self._recording = False
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = (
            [b.router.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)] if kl else []
        )

    @classmethod
    def for_config(cls, model: nn.Module, cfg: TrainConfig) -> BaseRouters | None:
        """The base routers a run of ``cfg`` needs (None when the router is frozen).

        Build it before loading a training checkpoint, so that it holds the base routers."""
        if not cfg.train_router:
            return None
        return cls(model, kl=cfg.router_kl_weight > 0)

    def teacher_hidden(self, backbone: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the decoder (``backbone``, a :class:`Backbone`, possibly
        FSDP-wrapped) with the base routers in place."""
        with self.in_place():
            return backbone(input_ids)

    @contextlib.contextmanager
    def in_place(self):
        """Inside this block every router computes with its base projection."""
        handles = []
        for block, initial in zip(self.blocks, self.initial):
            handles += _swap_during_forward(block.router, initial)
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def recording(self):
        """Record router outputs for the KL inside this block (the student forward)."""
        self._pairs = []
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    def _hook(self, i: int):
        weight = next(v for k, v in self.initial[i].items() if k.endswith("weight"))
        bias = self.initial[i].get("bias")

        def hook(module, args, output):
            if not (self._recording and torch.is_grad_enabled()):
                return
            logits = output[self.blocks[i].logits_index] if isinstance(output, tuple) else output
            with torch.no_grad():
                x = args[0].reshape(-1, args[0].shape[-1]).to(weight.dtype)
                base = F.linear(x, weight, bias)
            self._pairs.append((base, logits))

        return hook

    def pop_kl(self) -> torch.Tensor:
        """The router KL of the last recorded forward (zero when nothing was recorded)."""
        pairs, self._pairs = self._pairs, []
        if not pairs:
            return torch.zeros(())
        terms = [
            _routing_kl(base.float(), logits.reshape(base.shape).float(), self.family.probs)
            for base, logits in pairs
        ]
        return torch.stack(terms).mean()


def _swap_during_forward(module: nn.Module, tensors: dict[str, torch.Tensor]) -> list:
    """Hooks that put ``tensors`` (by parameter path under ``module``) in place of the module's
    parameters for the duration of each of its forwards, and the parameters back after it."""
    slots = []
    for path, tensor in tensors.items():
        owner, _, leaf = path.rpartition(".")
        slots.append((module.get_submodule(owner) if owner else module, leaf, tensor))
    saved: list[torch.Tensor] = []

    def swap_in(mod, args):
        saved[:] = [owner._parameters[leaf] for owner, leaf, _ in slots]
        for owner, leaf, tensor in slots:
            owner._parameters[leaf] = tensor

    def swap_back(mod, args, output):
        for (owner, leaf, _), param in zip(slots, saved):
            owner._parameters[leaf] = param
        saved.clear()

    return [module.register_forward_pre_hook(swap_in), module.register_forward_hook(swap_back)]


def _routing_kl(base_logits: torch.Tensor, logits: torch.Tensor, probs: str) -> torch.Tensor:
    if probs == "sigmoid":  # per-expert Bernoulli KL
        p, q = torch.sigmoid(base_logits), torch.sigmoid(logits)
        eps = 1e-6
        kl = p * (torch.log(p + eps) - torch.log(q + eps)) + (1 - p) * (
            torch.log(1 - p + eps) - torch.log(1 - q + eps)
        )
        return kl.sum(-1).mean()
    return F.kl_div(
        F.log_softmax(logits, -1), F.log_softmax(base_logits, -1), log_target=True, reduction="batchmean"
    )


@dataclass
class StepLosses:
    loss: torch.Tensor
    ce: float
    kd: float
    router_kl: float
    tokens: int


def compute_losses(
    model: nn.Module,
    student: nn.Module,
    input_ids: torch.Tensor,
    cfg: TrainConfig,
    *,
    base_routers: BaseRouters | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    teacher_rows=None,
    adapter_off=None,
) -> StepLosses:
    """Loss of one micro-batch: mean CE + kd_weight * T^2 * KL(teacher || student) (+ router KL).

    ``student`` is the (possibly DDP-wrapped) :class:`Backbone`; the online teacher
    (``kd: online``) is the base model under ``no_grad``: the same model with the shared
    experts switched off and, when the router trains (``base_routers``), the base routers
    swapped in. With ``kd: offline`` the teacher is ``teacher_rows`` (``nexus distill``'s
    top-k for this micro-batch) and no teacher forward runs. ``adapter_off`` (a context
    manager factory) replaces "shared experts off" for another adapter on the same weights:
    the benchmarks distil their LoRA baselines with PEFT's ``disable_adapter``.
    """
    autocast = autocast or contextlib.nullcontext()
    teacher_h = None
    distilling = cfg.kd != "off" and cfg.kd_weight > 0
    if distilling and cfg.kd == "offline" and teacher_rows is None:
        raise ValueError("kd: offline needs the micro-batch's teacher rows")
    if not distilling:
        teacher_rows = None
    if distilling and cfg.kd == "online":
        backbone = getattr(student, "module", student)  # DDP's inner module; FSDP wraps in place
        off = adapter_off() if adapter_off is not None else shared_experts_disabled(model)
        with torch.no_grad(), off, autocast:
            if base_routers is not None:
                teacher_h = base_routers.teacher_hidden(backbone, input_ids)
            else:
                teacher_h = backbone(input_ids)
    recording = base_routers.recording() if base_routers is not None else contextlib.nullcontext()
    # Without early stopping, a checkpointed layer's recomputation in backward runs to its end,
    # so the shared expert's post-hook collects the output its pre-hook left on the block;
    # stopped early, every layer kept that output and its recomputed graph until its next
    # forward (measured: the shared experts' activations of all layers, nearly doubling the
    # activation memory of a checkpointed step).
    with autocast, set_checkpoint_early_stop(False):
        with recording:
            hidden = student(input_ids)
        parts = chunked_lm_losses(
            model,
            hidden,
            input_ids,
            teacher_h,
            temperature=cfg.kd_temperature,
            chunk_size=cfg.loss_chunk,
            teacher_rows=teacher_rows,
        )
    n = max(parts.tokens, 1)
    ce, kd = parts.ce_sum / n, parts.kd_sum / n
    loss = ce + cfg.kd_weight * kd if distilling else ce
    rkl = torch.zeros(())
    if base_routers is not None and base_routers.kl:
        rkl = base_routers.pop_kl()
        loss = loss + cfg.router_kl_weight * rkl
    return StepLosses(loss, float(ce.detach()), float(kd.detach()), float(rkl.detach()), parts.tokens)


@torch.no_grad()
def evaluate_sums(
    model: nn.Module, batches, *, chunk: int = 256, autocast=None, backbone: nn.Module | None = None
) -> tuple[float, int]:
    """Summed next-token NLL and token count over ``batches`` (for perplexity); the decoder runs
    through ``backbone`` when given (training's FSDP-wrapped :class:`Backbone`)."""
    autocast = autocast or contextlib.nullcontext()
    backbone = backbone or Backbone(model)
    nll, tokens = 0.0, 0
    for ids in batches:
        with autocast:
            hidden = backbone(ids)
            parts = chunked_lm_losses(model, hidden, ids, chunk_size=chunk)
        nll += float(parts.ce_sum)
        tokens += parts.tokens
    return nll, tokens


def make_optimizer(trainable: list[nn.Parameter], cfg: TrainConfig):
    """AdamW (betas 0.9/0.95) and the warmup-then-cosine schedule of ``nexus train``."""
    from functools import partial

    from nexus.stages.train.schedule import lr_factor

    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    schedule = partial(
        lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.total_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass
class StepResult:
    """Averages over one optimizer step's micro-batches (this worker's)."""

    ce: float
    kd: float
    router_kl: float
    lr: float
    grad_norm: float
    tokens: int


def optimizer_step(
    model: nn.Module,
    student: nn.Module,
    micro_batches: list[torch.Tensor],
    cfg: TrainConfig,
    optimizer,
    scheduler,
    trainable: list[nn.Parameter],
    *,
    base_routers: BaseRouters | None = None,
    autocast=contextlib.nullcontext,
    no_sync=None,
    teachers: list | None = None,
    adapter_off=None,
) -> StepResult:
    """One optimizer step: accumulate gradients over ``micro_batches``, clip, AdamW, schedule.

    ``no_sync`` (:func:`nexus.stages.train.parallel.no_sync`) skips the gradient all-reduce on all
    but the last micro-batch. ``teachers``: each micro-batch's teacher rows (``kd: offline``);
    ``adapter_off``: see :func:`compute_losses`.
    The Ray Train loop and the benchmarks both call this, so they train alike.
    """
    ce = kd = rkl = 0.0
    tokens = 0
    n = len(micro_batches)
    for i, ids in enumerate(micro_batches):
        sync = no_sync() if no_sync is not None and i < n - 1 else contextlib.nullcontext()
        with sync:
            out = compute_losses(
                model,
                student,
                ids,
                cfg,
                base_routers=base_routers,
                autocast=autocast(),
                teacher_rows=teachers[i] if teachers else None,
                adapter_off=adapter_off,
            )
            (out.loss / n).backward()
        ce += out.ce / n
        kd += out.kd / n
        rkl += out.router_kl / n
        tokens += ids.numel()
    sync_replicated_grads(trainable)
    grad_norm = global_grad_norm(trainable, cfg.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(ce, kd, rkl, lr, grad_norm, tokens)
