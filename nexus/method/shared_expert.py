"""The trainable shared expert: one always-active MLP of the family's own expert shape.

Parameter names are deliberately our own (``w_in``, ``w_out``, ``scale``, ``mix``):
transformers' save/load key mappings rewrite names containing ``experts``, ``gate``,
``router``, ``shared_expert`` and friends, and we never want them to touch ours.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from nexus.models.live import ExpertWeights, fuse_gate_up, split_gate_up

GATES = ("scalar", "sigmoid", "none")


@dataclass(frozen=True)
class SharedExpertSpec:
    """Shape and behaviour of one shared expert; stored in ``nexus_config.json``."""

    hidden_size: int
    intermediate_size: int
    #: "swiglu" or "gpt_oss" (clamped SwiGLU: gate clamped above at ``limit``, up to [-limit, limit],
    #: out = (up + 1) * gate * sigmoid(alpha * gate))
    activation: str = "swiglu"
    #: activation name for "swiglu" (any key of transformers' ACT2FN)
    act_fn: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0
    gate_up_layout: str = "concat"
    bias: bool = False
    gate: str = "scalar"
    gate_init: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def initial_down_factor(gate: str, gate_init: float) -> float:
    """Factor folded into the down projection (and its bias) when a shared expert is made, so
    that its initial output is ``gate_init`` times the expert it was built as, for every gate.

    ``scalar``: 1 (the learnable scale itself starts at ``gate_init``); ``none``: ``gate_init``;
    ``sigmoid``: ``gate_init / sigmoid(0) = 2 * gate_init``, because the per-token gate
    ``sigmoid(mix(x))`` starts with ``mix = 0``, i.e. at 0.5 for every token. Attaching
    (:func:`nexus.attach_shared_experts`) and conversion (``nexus convert --scale``) both use
    this rule.
    """
    if gate == "scalar":
        return 1.0
    if gate == "sigmoid":
        return float(gate_init) / 0.5
    return float(gate_init)


class SharedExpert(nn.Module):
    """``g(x) * down(act(gate(x)) * up(x))`` with g a scalar, a per-token sigmoid, or 1."""

    def __init__(self, spec: SharedExpertSpec, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if spec.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {spec.gate!r}")
        self.spec = spec
        h, i = spec.hidden_size, spec.intermediate_size
        kw = {"dtype": dtype, "device": device}
        self.w_in = nn.Parameter(torch.empty(2 * i, h, **kw))
        self.w_out = nn.Parameter(torch.empty(h, i, **kw))
        self.b_in = nn.Parameter(torch.zeros(2 * i, **kw)) if spec.bias else None
        self.b_out = nn.Parameter(torch.zeros(h, **kw)) if spec.bias else None
        self.scale = (
            nn.Parameter(torch.full((), float(spec.gate_init), **kw)) if spec.gate == "scalar" else None
        )
        self.mix = nn.Linear(h, 1, bias=False, **kw) if spec.gate == "sigmoid" else None
        #: switched off by :func:`nexus.shared_experts_disabled` (the model is then the base model)
        self.enabled = True
        self._act = ACT2FN[spec.act_fn] if spec.activation == "swiglu" else None
        self.reset_parameters("zero")

    @torch.no_grad()
    def reset_parameters(self, init: str = "zero", generator: torch.Generator | None = None) -> None:
        """``zero``: output exactly 0 (down projection and biases at zero); ``random``: all random."""
        h = self.spec.hidden_size
        std = 1.0 / math.sqrt(h)
        self.w_in.normal_(0.0, std, generator=generator)
        if init == "zero":
            self.w_out.zero_()
        else:
            self.w_out.normal_(0.0, 1.0 / math.sqrt(self.spec.intermediate_size), generator=generator)
        for b in (self.b_in, self.b_out):
            if b is not None:
                b.zero_()
        if self.mix is not None:
            self.mix.weight.zero_()

    @torch.no_grad()
    def load_expert_weights(self, w: ExpertWeights) -> None:
        """Copy one (possibly averaged) expert into this module."""
        self.w_in.copy_(fuse_gate_up(w.gate, w.up, self.spec.gate_up_layout))
        self.w_out.copy_(w.down)
        if self.spec.bias:
            self.b_in.copy_(fuse_gate_up(w.gate_bias, w.up_bias, self.spec.gate_up_layout))
            self.b_out.copy_(w.down_bias)

    @torch.no_grad()
    def apply_initial_scale(self) -> None:
        """Scale the down projection so the output starts at ``spec.gate_init`` times the
        expert built so far (:func:`initial_down_factor`); call once, after initialising."""
        factor = initial_down_factor(self.spec.gate, self.spec.gate_init)
        if factor != 1.0:
            self.w_out.mul_(factor)
            if self.b_out is not None:
                self.b_out.mul_(factor)

    def expert_weights(self) -> ExpertWeights:
        gate, up = split_gate_up(self.w_in, self.spec.gate_up_layout)
        gb = ub = None
        if self.b_in is not None:
            gb, ub = split_gate_up(self.b_in, self.spec.gate_up_layout)
        return ExpertWeights(gate, up, self.w_out, gb, ub, self.b_out)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.spec.gate_up_layout == "interleaved":
            gate, up = h[..., 0::2], h[..., 1::2]
        else:
            gate, up = h.chunk(2, dim=-1)
        if self.spec.activation == "gpt_oss":
            gate = gate.clamp(max=self.spec.limit)
            up = up.clamp(min=-self.spec.limit, max=self.spec.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.spec.alpha))
        return self._act(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.w_in.dtype)
        out = F.linear(self._activate(F.linear(x, self.w_in, self.b_in)), self.w_out, self.b_out)
        if self.scale is not None:
            out = out * self.scale
        elif self.mix is not None:
            out = out * torch.sigmoid(self.mix(x))
        return out

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"hidden={s.hidden_size}, intermediate={s.intermediate_size}, act={s.activation}, gate={s.gate}"
        )
