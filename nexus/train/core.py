"""What one training step computes, independent of Ray: model set-up, loss, evaluation.

The Ray Train loop (:mod:`nexus.train.loop`) and the in-process benchmarks share this
code, so the numbers the benchmarks report are the numbers ``nexus train`` produces.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nexus.attach import attach_shared_experts, shared_experts_disabled
from nexus.families import find_moe_blocks
from nexus.train.config import TrainConfig
from nexus.train.losses import chunked_lm_losses


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
    from nexus.adapter import load_adapter
    from nexus.loading import load_model

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
    from nexus.attach import shared_expert_modules

    return [p for se in shared_expert_modules(model).values() for p in se.parameters()]


class RouterKL:
    """KL(initial routing || current routing), for runs that train the router.

    Keeps a frozen copy of each router's initial projection (E x H, small) and compares the
    routing distributions on the same router inputs, so no second model is needed.
    """

    def __init__(self, model: nn.Module) -> None:
        from nexus.families import family_for_config

        self.family = family_for_config(model.config)
        self.blocks = find_moe_blocks(model)
        self.initial = [
            {k: v.detach().clone() for k, v in b.router_parameters().items()} for b in self.blocks
        ]
        self.terms: list[torch.Tensor] = []
        #: off during the teacher pass
        self.active = True
        self.handles = [b.router.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]

    def _hook(self, i: int):
        weight = next(v for k, v in self.initial[i].items() if k.endswith("weight"))
        bias = self.initial[i].get("bias")

        def hook(module, args, output):
            if not self.active:
                return
            logits = output[self.blocks[i].logits_index] if isinstance(output, tuple) else output
            x = args[0].reshape(-1, args[0].shape[-1]).to(weight.dtype)
            base = F.linear(x, weight, bias)
            self.terms.append(
                _routing_kl(base.float(), logits.reshape(base.shape).float(), self.family.probs)
            )

        return hook

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.terms).mean() if self.terms else torch.zeros(())
        self.terms = []
        return total


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
    router_kl: RouterKL | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> StepLosses:
    """Loss of one micro-batch: mean CE + kd_weight * T^2 * KL(teacher || student) (+ router KL).

    ``student`` is the (possibly DDP-wrapped) :class:`Backbone`; the teacher is the same
    model with the shared experts switched off, under ``no_grad``.
    """
    autocast = autocast or contextlib.nullcontext()
    teacher_h = None
    if cfg.kd_weight > 0:
        if router_kl is not None:
            router_kl.active = False
        with torch.no_grad(), shared_experts_disabled(model), autocast:
            teacher_h = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        if router_kl is not None:
            router_kl.active = True
    with autocast:
        hidden = student(input_ids)
        parts = chunked_lm_losses(
            model, hidden, input_ids, teacher_h, temperature=cfg.kd_temperature, chunk_size=cfg.loss_chunk
        )
    n = max(parts.tokens, 1)
    ce, kd = parts.ce_sum / n, parts.kd_sum / n
    loss = ce + cfg.kd_weight * kd
    rkl = torch.zeros(())
    if router_kl is not None:
        rkl = router_kl.pop()
        loss = loss + cfg.router_kl_weight * rkl
    return StepLosses(loss, float(ce.detach()), float(kd.detach()), float(rkl.detach()), parts.tokens)


@torch.no_grad()
def evaluate_sums(model: nn.Module, batches, *, chunk: int = 256, autocast=None) -> tuple[float, int]:
    """Summed next-token NLL and token count over ``batches`` (for perplexity)."""
    autocast = autocast or contextlib.nullcontext()
    nll, tokens = 0.0, 0
    for ids in batches:
        with autocast:
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            parts = chunked_lm_losses(model, hidden, ids, chunk_size=chunk)
        nll += float(parts.ce_sum)
        tokens += parts.tokens
    return nll, tokens


def make_optimizer(trainable: list[nn.Parameter], cfg: TrainConfig):
    """AdamW (betas 0.9/0.95) and the warmup-then-cosine schedule of ``nexus train``."""
    from functools import partial

    from nexus.train.schedule import lr_factor

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
    router_kl: RouterKL | None = None,
    autocast=contextlib.nullcontext,
    no_sync=None,
) -> StepResult:
    """One optimizer step: accumulate gradients over ``micro_batches``, clip, AdamW, schedule.

    ``no_sync`` (DDP's ``student.no_sync``) skips the gradient all-reduce on all but the last
    micro-batch. The Ray Train loop and the benchmarks both call this, so they train alike.
    """
    ce = kd = rkl = 0.0
    tokens = 0
    n = len(micro_batches)
    for i, ids in enumerate(micro_batches):
        sync = no_sync() if no_sync is not None and i < n - 1 else contextlib.nullcontext()
        with sync:
            out = compute_losses(model, student, ids, cfg, router_kl=router_kl, autocast=autocast())
            (out.loss / n).backward()
        ce += out.ce / n
        kd += out.kd / n
        rkl += out.router_kl / n
        tokens += ids.numel()
    if cfg.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
    else:
        grads = [p.grad.norm() for p in trainable if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(grads)))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(ce, kd, rkl, lr, grad_norm, tokens)
