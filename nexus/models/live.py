"""Finding MoE blocks in a live transformers model and reading their experts.

An MoE block is the parent of the family's router module that also owns ``.experts``;
transformers names the router class in ``_can_record_outputs["router_logits"]``, so no
attribute-name guessing (``gate`` is a router in one family and a projection in another).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from nexus.errors import NexusError
from nexus.models.registry import Family, family_for_config


@dataclass(frozen=True)
class ExpertWeights:
    """One expert in canonical ``nn.Linear`` orientation: gate/up ``[I, H]``, down ``[H, I]``."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[0]

    @property
    def has_bias(self) -> bool:
        return self.down_bias is not None


@dataclass
class MoEBlock:
    """An MoE block of a live model: its decoder-layer index, module path, router and experts."""

    layer: int
    name: str
    module: nn.Module
    router: nn.Module
    experts: nn.Module
    #: position of the raw logits in the router's output tuple
    logits_index: int
    #: qualified module name of the router
    router_name: str = ""

    @property
    def num_experts(self) -> int:
        return int(getattr(self.experts, "num_experts", None) or self.router_weight().shape[0])

    def router_parameters(self) -> dict[str, nn.Parameter]:
        """The router's learnable projection (weight, and bias where it has one).

        Statistics-driven corrections (DeepSeek's and ERNIE's ``e_score_correction_bias``)
        are not learnable projections and stay frozen even with a trainable router.
        """
        params = {}
        for name in ("weight", "bias", "wg.weight", "layer.weight"):
            try:
                params[name] = self.router.get_parameter(name)
            except AttributeError:
                continue
        if not params:
            raise NexusError(f"cannot find the router weight of {self.name}")
        return params

    def router_weight(self) -> torch.Tensor:
        params = self.router_parameters()
        return next(p for n, p in params.items() if n.endswith("weight"))


def _router_recorder(model: nn.Module):
    """The OutputRecorder that transformers uses for ``output_router_logits``."""
    for module in model.modules():
        recorders = getattr(type(module), "_can_record_outputs", None) or {}
        rec = recorders.get("router_logits")
        if rec is not None:
            return rec
    return None


_LAYER_RE = re.compile(r"\.(\d+)\.")


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All MoE blocks of ``model`` in layer order; a one-line error if there are none."""
    family = family_for_config(model.config)
    rec = _router_recorder(model)
    if rec is None:
        raise NexusError(
            f"{type(model).__name__} does not expose router logits; is this a {family.name} MoE model?"
        )
    router_cls, index = rec.target_class, rec.index or 0
    blocks: list[MoEBlock] = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        routers = [(n, child) for n, child in module.named_children() if isinstance(child, router_cls)]
        if len(routers) != 1:
            continue
        router_attr, router = routers[0]
        found = _LAYER_RE.findall(f".{name}.")
        if not found:
            raise NexusError(f"cannot tell the layer index of MoE block {name}")
        blocks.append(MoEBlock(int(found[-1]), name, module, router, experts, index, f"{name}.{router_attr}"))
    if not blocks:
        raise NexusError(
            f"found no MoE blocks in {type(model).__name__} (family {family.name}); is the config complete?"
        )
    return sorted(blocks, key=lambda b: b.layer)


def _flag(experts: nn.Module, name: str, default):
    return getattr(experts, name, default)


def expert_weights(block: MoEBlock, family: Family, expert: int) -> ExpertWeights:
    """Expert ``expert`` of a live block in canonical orientation (views, no copies; packed
    experts, :class:`nexus.weights.packed.PackedGptOssExperts`, decode that one expert)."""
    ex = block.experts
    if hasattr(ex, "linear_weights"):
        gate_up, down = ex.linear_weights(expert)
    else:
        gate_up, down = ex.gate_up_proj[expert], ex.down_proj[expert]
        if _flag(ex, "is_transposed", family.transposed):
            gate_up, down = gate_up.t(), down.t()
    gate, up = split_gate_up(gate_up, family.gate_up_layout)
    gate_bias = up_bias = down_bias = None
    if getattr(ex, "gate_up_proj_bias", None) is not None:
        gate_bias, up_bias = split_gate_up(ex.gate_up_proj_bias[expert], family.gate_up_layout)
        down_bias = ex.down_proj_bias[expert]
    return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)


def split_gate_up(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a fused gate/up tensor along dim 0 into (gate, up)."""
    if layout == "interleaved":
        return t[0::2], t[1::2]
    return t.chunk(2, dim=0)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`split_gate_up`."""
    if layout == "interleaved":
        return torch.stack([gate, up], dim=1).reshape(-1, *gate.shape[1:])
    return torch.cat([gate, up], dim=0)


def routing(block: MoEBlock, family: Family, output, top_k: int):
    """(logits, probs, top_k weights, top_k indices) from one router call's output.

    Routers that return their own selection (most families) are used as they are, so the
    statistics see exactly what the model did (DeepSeek's group-limited, bias-corrected
    choice included); for routers that return only logits, top-k of the probabilities.
    """
    logits = output[block.logits_index] if isinstance(output, tuple) else output
    logits = logits.reshape(-1, logits.shape[-1]).float()
    probs = torch.sigmoid(logits) if family.probs == "sigmoid" else torch.softmax(logits, dim=-1)
    if isinstance(output, tuple) and len(output) == 3 and block.logits_index == 0:
        weights, indices = (
            output[1].reshape(-1, output[1].shape[-1]),
            output[2].reshape(-1, output[2].shape[-1]),
        )
    else:
        weights, indices = torch.topk(probs, top_k, dim=-1)
    return logits, probs, weights.float(), indices
