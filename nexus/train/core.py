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

    model = load_model(cfg.model, dtype=dtype or cfg.dtype, trust_remote_code=cfg.trust_remote_code)
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
