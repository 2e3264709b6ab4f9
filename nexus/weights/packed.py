"""Frozen routed experts kept packed in MXFP4 on the model's device (GPT-OSS).

Why: NEXUS never trains the routed experts, and GPT-OSS publishes them in MXFP4 (4.25 bits
per weight). Dequantised to bf16 they are 3.8x larger (GPT-OSS-120B: ~229 GB instead of
~61 GB), which is what decides whether a replica fits on a GPU at all.

How: :class:`PackedGptOssExperts` takes the place of transformers' ``GptOssExperts`` inside
each ``GptOssMLP``, with the same forward signature ``(hidden_states, router_indices,
routing_weights)``, so the router, NEXUS's router and shared-expert hooks, the statistics
and the KD teacher see the same block as before. It holds the checkpoint's own tensors under
the checkpoint's own names (``gate_up_proj_blocks``/``_scales``, ``down_proj_blocks``/
``_scales`` as uint8, and the biases), so transformers' loader fills them straight from the
shards. A forward pass visits only the experts that received tokens, one at a time: it
decodes the expert's ``gate_up`` into a scratch buffer in the compute dtype (one gather per
byte, :func:`nexus.weights.mxfp4.decode`), multiplies, applies the clamped SwiGLU, decodes ``down``
into the same buffer, multiplies, weights and scatters. Working memory is one expert's
weights, not a layer's.

Autograd: :class:`_PackedExperts` is a ``torch.autograd.Function`` whose backward gives the
exact gradients with respect to the layer input and the routing weights (the routing
weights depend on the hidden states through the router, and on the router's parameters when
it is trained). It saves what autograd would save for the dequantised experts (each routed
token's gate/up pre-activation and expert output) but never a decoded weight: backward
decodes each expert again. The experts themselves get no gradient.

Loading: :func:`register_packed_quantizer` registers a transformers quantizer through
transformers' public registration API (``register_quantization_config`` /
``register_quantizer``). ``from_pretrained`` builds the model on the meta device, the
quantizer swaps the experts for packed ones there, and transformers' own loader assigns
every tensor shard by shard onto the target device, with its handling of dtypes, tied
weights, non-persistent buffers and Hub downloads. transformers' own MXFP4 integration
does not fit: without its Triton kernels (GPU only, downloaded from the Hub) it can only
dequantise on load, and it does not train.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from nexus.weights import mxfp4

#: ``quant_method`` of the quantizer that loads MXFP4 experts packed
QUANT_METHOD = "nexus_packed_mxfp4"
#: profiler label of the decoding, ``nexus::mxfp4_decode.<projection>`` (the benchmark splits
#: step time by it)
DECODE_LABEL = "nexus::mxfp4_decode"
PROJECTIONS = ("gate_up_proj", "down_proj")


class PackedGptOssExperts(nn.Module):
    """GPT-OSS's routed experts as the checkpoint stores them: MXFP4 blocks and scales.

    Buffers (not parameters: they can never train), in ``nn.Linear`` orientation:
    ``gate_up_proj_blocks`` [E, 2I, H/32, 16] and ``_scales`` [E, 2I, H/32] (gate and up
    interleaved by row), ``down_proj_blocks`` [E, H, I/32, 16] and ``_scales`` [E, H, I/32],
    ``gate_up_proj_bias`` [E, 2I] and ``down_proj_bias`` [E, H] in the model's dtype.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = int(config.num_local_experts)
        self.hidden_size = int(config.hidden_size)
        self.intermediate_size = int(config.intermediate_size)
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size  # noqa: E741
        if H % mxfp4.BLOCK or I % mxfp4.BLOCK:
            raise ValueError(f"MXFP4 experts need widths divisible by {mxfp4.BLOCK}, got H={H}, I={I}")
        for proj, (rows, cols) in zip(PROJECTIONS, ((2 * I, H), (H, I))):
            groups = cols // mxfp4.BLOCK
            self.register_buffer(
                f"{proj}_blocks", torch.empty(E, rows, groups, mxfp4.BLOCK // 2, dtype=torch.uint8)
            )
            self.register_buffer(f"{proj}_scales", torch.empty(E, rows, groups, dtype=torch.uint8))
        self.register_buffer("gate_up_proj_bias", torch.empty(E, 2 * I))
        self.register_buffer("down_proj_bias", torch.empty(E, H))

    #: transformers' own clamped SwiGLU (it reads only ``self.alpha`` and ``self.limit``)
    _apply_gate = GptOssExperts._apply_gate

    def shape_of(self, proj: str) -> tuple[int, int]:
        """``(out, in)`` of one expert's ``gate_up_proj`` or ``down_proj``."""
        blocks = getattr(self, f"{proj}_blocks")
        return blocks.shape[1], blocks.shape[2] * mxfp4.BLOCK

    def decode(
        self, expert: int, proj: str, dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Expert ``expert``'s ``proj`` weight decoded to ``dtype``, ``[out, in]``."""
        with record_function(f"{DECODE_LABEL}.{proj}"):
            return mxfp4.decode(
                getattr(self, f"{proj}_blocks")[expert],
                getattr(self, f"{proj}_scales")[expert],
                dtype=dtype,
                out=out,
            )

    def scratch_weight(self, expert: int, proj: str, dtype: torch.dtype) -> torch.Tensor:
        """Like :meth:`decode`, into a buffer shared by all packed experts: valid only until the
        next call (forward and backward use each decoded weight right away, then drop it)."""
        rows, cols = self.shape_of(proj)
        return self.decode(
            expert,
            proj,
            dtype,
            out=_scratch(rows * cols, dtype, self.down_proj_blocks.device).view(rows, cols),
        )

    def linear_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert`` decoded in canonical ``nn.Linear`` orientation, in the biases'
        dtype: fused gate/up ``[2I, H]`` (interleaved) and down ``[H, I]`` (fresh tensors)."""
        dtype = self.down_proj_bias.dtype
        return self.decode(expert, "gate_up_proj", dtype), self.decode(expert, "down_proj", dtype)

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None) -> torch.Tensor:
        needs_grad = hidden_states.requires_grad or routing_weights.requires_grad
        if torch.is_grad_enabled() and needs_grad:
            return _PackedExperts.apply(hidden_states, routing_weights, router_indices, self)
        return _forward(self, hidden_states, routing_weights, router_indices, keep=False)[0]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, MXFP4"


# -- the computation -----------------------------------------------------------------------

_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, one per (device, dtype) for the process."""
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # written inside and outside inference mode
            buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[(device, dtype)] = buf
    return buf[:numel]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the dense experts' matmuls would run in: autocast's, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _routes(indices: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor, int]]:
    """Routed (token, slot) pairs grouped by expert: for every expert that received tokens,
    ``(expert, its flat pair indices t*K + k, where its group starts)``, in expert order
    (pairs routed outside ``[0, num_experts)``, as expert parallelism marks them, are skipped)."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()
    groups, start = [], 0
    for expert, n in enumerate(counts):
        if n:
            groups.append((expert, order[start : start + n], start))
        start += n
    return groups


def _forward(experts: PackedGptOssExperts, x, weights, indices, *, keep: bool):
    """The experts' output; with ``keep``, also every routed pair's gate/up pre-activation and
    expert output (what backward needs), laid out in :func:`_routes` order."""
    dtype = _compute_dtype(x)
    k = indices.shape[-1]
    out = torch.zeros_like(x)
    w = weights.reshape(-1)
    groups = _routes(indices, experts.num_experts)
    n_routed = groups[-1][2] + len(groups[-1][1]) if groups else 0
    pre = x.new_empty(n_routed, 2 * experts.intermediate_size, dtype=dtype) if keep else None
    act_out = x.new_empty(n_routed, experts.hidden_size, dtype=dtype) if keep else None
    for e, pairs, start in groups:
        tokens = pairs // k
        end = start + len(pairs)
        h = torch.addmm(
            experts.gate_up_proj_bias[e].to(dtype),
            x[tokens].to(dtype),
            experts.scratch_weight(e, "gate_up_proj", dtype).t(),
            out=pre[start:end] if keep else None,
        )
        y = torch.addmm(
            experts.down_proj_bias[e].to(dtype),
            experts._apply_gate(h),
            experts.scratch_weight(e, "down_proj", dtype).t(),
            out=act_out[start:end] if keep else None,
        )
        out.index_add_(0, tokens, (y * w[pairs, None]).to(out.dtype))
    return out, pre, act_out


class _PackedExperts(torch.autograd.Function):
    """Packed experts with exact input and routing-weight gradients, weights decoded twice."""

    @staticmethod
    def forward(ctx, x, weights, indices, experts):
        out, pre, expert_out = _forward(experts, x, weights, indices, keep=True)
        ctx.experts = experts
        ctx.x_meta = (x.shape, x.dtype)
        ctx.save_for_backward(weights, indices, pre, expert_out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weights, indices, pre, expert_out = ctx.saved_tensors
        experts: PackedGptOssExperts = ctx.experts
        dtype = pre.dtype
        k = indices.shape[-1]
        w = weights.reshape(-1)
        grad_x = grad_out.new_zeros(ctx.x_meta[0], dtype=ctx.x_meta[1]) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for e, pairs, start in _routes(indices, experts.num_experts):
            tokens = pairs // k
            end = start + len(pairs)
            g = grad_out[tokens].to(dtype)  # d loss / d (weighted expert output)
            if grad_w is not None:
                grad_w[pairs] = (g * expert_out[start:end]).sum(-1).to(grad_w.dtype)
            if grad_x is None:
                continue
            g_act = (g * w[pairs, None].to(dtype)) @ experts.scratch_weight(e, "down_proj", dtype)
            with torch.enable_grad():  # the activation's own backward, exactly as autograd does it
                h = pre[start:end].detach().requires_grad_(True)
                (g_pre,) = torch.autograd.grad(experts._apply_gate(h), h, g_act)
            g_x = g_pre @ experts.scratch_weight(e, "gate_up_proj", dtype)
            grad_x.index_add_(0, tokens, g_x.to(grad_x.dtype))
        return grad_x, (grad_w.view_as(weights) if grad_w is not None else None), None, None


# -- putting packed experts into a model -----------------------------------------------------


def swap_in_packed_experts(model: nn.Module) -> int:
    """Replace every ``GptOssExperts`` of ``model`` by a packed one (on the meta device, before
    loading); returns how many were replaced."""
    config = model.config.get_text_config()
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, GptOssExperts):
            with torch.device("meta"):
                model.set_submodule(name, PackedGptOssExperts(config))
            swapped += 1
    return swapped


def packed_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, PackedGptOssExperts)]


def register_packed_quantizer() -> None:
    """Register the ``nexus_packed_mxfp4`` quantization config and quantizer with transformers
    (its public ``register_quantization_config`` / ``register_quantizer``); idempotent."""
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config(QUANT_METHOD)
    class PackedMxfp4Config(QuantizationConfigMixin):
        """The checkpoint's MXFP4 experts, loaded as they are (the other keys are kept)."""

        def __init__(self, modules_to_not_convert: list[str] | None = None, **kwargs) -> None:
            self.quant_method = QUANT_METHOD
            self.modules_to_not_convert = modules_to_not_convert
            kwargs.pop("quant_method", None)
            for key, value in kwargs.items():
                setattr(self, key, value)

    @register_quantizer(QUANT_METHOD)
    class PackedMxfp4Quantizer(HfQuantizer):
        """Swaps GPT-OSS's experts for :class:`PackedGptOssExperts` on the meta model; every
        tensor then loads under its checkpoint name, unconverted."""

        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            if swap_in_packed_experts(model) == 0:
                raise ValueError("packed MXFP4 experts need a GPT-OSS model; found no GptOssExperts")
            return model

        def is_serializable(self) -> bool:
            return False  # a packed model is for running; the checkpoint already exists

        @property
        def is_trainable(self) -> bool:
            return True  # the experts stay frozen; what NEXUS trains is dense
