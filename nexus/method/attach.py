"""Putting shared experts into a model, switching them off, and taking them out again.

The shared expert lives as a child module ``nexus`` of each MoE block, so none of the base
model's parameter names change and the stock checkpoint still loads. Two hooks wire it in:
a forward pre-hook computes it on the block's *input* (some blocks scale their input in
place for jitter noise before routing), and a forward hook adds the result to the block's
output (the first element when the block returns a tuple, as GPT-OSS and Llama4 do).
Both hooks are module-level functions taking the block as an argument, so deep copies and
gradient-checkpoint recomputation see consistent state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from nexus.errors import NexusError
from nexus.method.shared_expert import GATES, SharedExpert, SharedExpertSpec
from nexus.models import Family, MoEBlock, family_for_config, find_moe_blocks

ATTR = "nexus"
INITS = ("zero", "random")


def _pre_hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
    se: SharedExpert = getattr(block, ATTR)
    x = args[0] if args else next(iter(kwargs.values()))
    block._nexus_out = se(x) if se.enabled else None


def _post_hook(block: nn.Module, args: tuple, kwargs: dict, output):
    shared = block.__dict__.pop("_nexus_out", None)
    if shared is None:
        return output
    routed = output[0] if isinstance(output, tuple) else output
    combined = routed + shared.reshape(routed.shape).to(routed.dtype)
    return (combined, *output[1:]) if isinstance(output, tuple) else combined


def spec_for_block(
    block: MoEBlock,
    family: Family,
    config,
    *,
    intermediate_size: int | None = None,
    gate: str = "scalar",
    gate_init: float = 1.0,
) -> SharedExpertSpec:
    """The shared-expert spec that matches the family's routed experts in ``block``."""
    from nexus.models.live import expert_weights

    w = expert_weights(block, family, 0)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    extra = {}
    if family.activation == "gpt_oss":
        extra = {"alpha": float(block.experts.alpha), "limit": float(block.experts.limit)}
    return SharedExpertSpec(
        hidden_size=w.gate.shape[1],
        intermediate_size=int(intermediate_size or w.intermediate_size),
        activation=family.activation,
        act_fn=str(getattr(text_config, family.act_attr, "silu")),
        gate_up_layout=family.gate_up_layout,
        bias=w.has_bias,
        gate=gate,
        gate_init=gate_init,
        **extra,
    )


def attach_shared_experts(
    model: nn.Module,
    *,
    init: str = "zero",
    gate: str = "scalar",
    intermediate_size: int | None = None,
    gate_init: float = 1.0,
    train_router: bool = False,
    freeze_base: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    layers: list[int] | None = None,
    weights: Mapping[int, object] | None = None,
) -> list[int]:
    """Add one trainable shared expert to every MoE block of ``model``.

    Args:
        init: ``zero`` (down projection at zero: the model starts exactly equal to the base)
            or ``random``. ``weights`` overrides it per layer with an :class:`ExpertWeights`
            (the conversion stage passes PCA-selected averages this way).
        gate: ``scalar`` (learnable scale), ``sigmoid`` (per-token ``sigmoid(Linear(H, 1))``
            like Qwen2-MoE) or ``none``.
        gate_init: the initial output scale for every gate: the output starts at
            ``gate_init`` times the expert that ``init``/``weights`` built (the scalar gate
            starts at it; otherwise it is folded into the down projection, see
            :func:`nexus.method.shared_expert.initial_down_factor`).
        intermediate_size: width of the shared expert; defaults to the routed experts'.
        train_router: leave the routers trainable (everything else of the base is frozen
            when ``freeze_base``).
        dtype: parameter dtype of the shared experts (fp32 master weights by default).
        layers: restrict to these MoE layers (default: all).

    Returns the decoder-layer indices the experts were attached to.
    """
    if init not in INITS:
        raise NexusError(f"unknown init '{init}' for attach_shared_experts; choose one of {', '.join(INITS)}")
    if gate not in GATES:
        raise NexusError(f"unknown gate '{gate}'; choose one of {', '.join(GATES)}")
    if intermediate_size is not None and intermediate_size <= 0:
        raise NexusError(f"intermediate size must be positive, got {intermediate_size}")
    family = family_for_config(model.config)
    blocks = find_moe_blocks(model)
    if any(hasattr(b.module, ATTR) for b in blocks):
        raise NexusError(
            "this model already has shared experts attached; call nexus.detach_shared_experts first"
        )
    if layers is not None:
        missing = sorted(set(layers) - {b.layer for b in blocks})
        if missing:
            raise NexusError(
                f"layers {missing} are not MoE layers of this model; MoE layers: {[b.layer for b in blocks]}"
            )
        blocks = [b for b in blocks if b.layer in set(layers)]
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for b in blocks:
        spec = spec_for_block(
            b, family, model.config, intermediate_size=intermediate_size, gate=gate, gate_init=gate_init
        )
        se = SharedExpert(spec, dtype=dtype)
        se.reset_parameters(init, generator=generator)
        if weights is not None and b.layer in weights:
            se.load_expert_weights(weights[b.layer])
        se.apply_initial_scale()
        install(b, se)
        if train_router:
            for p in b.router_parameters().values():
                p.requires_grad_(True)
    return [b.layer for b in blocks]


def install(block: MoEBlock, se: SharedExpert) -> None:
    """Make ``se`` the shared expert of ``block`` (same device as the block's router)."""
    se.to(block.router_weight().device)
    block.module.add_module(ATTR, se)
    block.module._nexus_handles = (
        block.module.register_forward_pre_hook(_pre_hook, with_kwargs=True),
        block.module.register_forward_hook(_post_hook, with_kwargs=True),
    )


def shared_expert_modules(model: nn.Module) -> dict[int, SharedExpert]:
    """Attached shared experts by decoder-layer index (empty if none)."""
    out = {}
    for b in find_moe_blocks(model):
        se = getattr(b.module, ATTR, None)
        if isinstance(se, SharedExpert):
            out[b.layer] = se
    return out


def detach_shared_experts(model: nn.Module, unfreeze: bool = False) -> None:
    """Remove all shared experts and their hooks; the model is the base model again."""
    for b in find_moe_blocks(model):
        if not hasattr(b.module, ATTR):
            continue
        for h in b.module.__dict__.pop("_nexus_handles", ()):
            h.remove()
        b.module.__dict__.pop("_nexus_out", None)
        delattr(b.module, ATTR)
    if unfreeze:
        for p in model.parameters():
            p.requires_grad_(True)


@contextlib.contextmanager
def shared_experts_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the model computes exactly the base model (used as the KD teacher)."""
    modules = [m for m in model.modules() if isinstance(m, SharedExpert)]
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.enabled = state


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
