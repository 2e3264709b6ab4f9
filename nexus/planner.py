"""``nexus plan``: the peak memory of every stage, per worker, predicted from ``config.json`` alone.

A GPT-OSS-120B run that dies of out-of-memory after an hour of collection is the failure
this module exists to prevent. The prediction needs no weights: the model is built on the
meta device (exact parameter counts and module structure, no memory, about a second for
120B), and every other term is a formula of the shapes and the stage's settings.

What a worker holds, and the formulas (``b``: bytes per element of the compute dtype;
``T = batch x seq_len`` tokens; ``R = T x top_k`` routed rows; ``H`` hidden, ``I`` expert
width, ``V`` vocabulary; each term is a function below with its own docstring):

- **frozen weights**: the base in ``model.dtype``; routed experts either in the compute dtype
  (dequantised) or as the checkpoint's MXFP4 ``*_blocks``/``*_scales`` (packed, 4.25 bits per
  weight) plus biases, with one expert's dequantised weights as working memory;
- **trainable shared experts**: fp32 master weights (4 bytes per parameter), their
  **gradients** (4, plus DDP's bucket copy with several workers) and **AdamW state** (8);
- **activations**: per decoder layer, the tensors autograd keeps for backward (attention,
  routed experts on ``R`` rows, norms, shared expert), all layers' worth without gradient
  checkpointing, one layer's worth plus every layer's input with it; forward-only stages hold
  one layer's temporaries at a time;
- **logits / loss chunks**: losses are computed over ``loss_chunk`` positions at a time
  (:mod:`nexus.train.losses`), so the vocabulary-sized tensors are ``batch x chunk x V``;
- **runtime**: what a process needs besides tensors (CUDA context and workspaces on a GPU).

The coefficients (how many tensors of each size a piece of code keeps) were read off the code
and checked against measured peaks on CPU (``tests/test_planner.py`` measures the real stages
within 20%). Training's peak is the largest of its phases (teacher forward, student forward
and loss, backward, optimizer step); the parts shown are the memory at that phase, so they add
up to the peak.

Extension points: :data:`STRATEGIES` (how DDP, and later FSDP, place the frozen base and the
trainable state on the workers), :class:`Workload` ``teacher`` (``online`` KD today; offline
top-k distillation would add its bytes per token there), :data:`STAGES` (one planner per
stage) and :data:`PACKED` (the packed experts' working-set constants).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

from nexus.errors import NexusError

GB = 10**9
STAGES = ("collect", "train", "evaluate")
EXPERTS = ("auto", "packed", "dequantized")
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_CANONICAL = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# -- sizes -----------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": GB,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | float | int, what: str = "memory size") -> int:
    """Bytes of ``80GB``, ``79.1GiB``, ``512 MB`` or a bare number of GB (decimal GB, as GPU
    vendors and the rest of NEXUS count them)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise NexusError(f"bad {what} '{text}'; give a number with a unit, e.g. 80GB, 79GiB or 512MB")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not value > 0:
        raise NexusError(f"bad {what} '{text}'; it must be more than zero")
    return int(value * _SIZE_UNITS[unit])


def gb(n: float) -> float:
    return round(n / GB, 3)


def gb_text(n: float) -> str:
    """``88.7 GB``, or ``31.4 MB`` below 1 GB (small models should not read ``0.0 GB``)."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 10**6:.1f} MB"


def count_text(n: int) -> str:
    """``116.8B``, ``597M``, ``9,473``: parameter counts as people say them."""
    if n >= 10**9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M" if n >= 10**7 else f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n:,}"


# -- packed MXFP4 experts ------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedExperts:
    """Memory constants of packed (MXFP4) frozen experts.

    Resident: the checkpoint's uint8 ``*_blocks`` [E, out, in/32, 16] and ``*_scales``
    [E, out, in/32] of gate_up (out = 2I, in = H) and down (out = H, in = I), plus biases in
    the compute dtype. Working memory while a layer runs: ``working_experts`` experts'
    dequantised gate_up + down in the compute dtype, plus ``temporaries`` times that for the
    decoding itself (nibble unpacking and scales of a bounded chunk of rows). The routed path's
    activations (rows per expert, kept for the input gradient) are those of the dequantised
    path (:func:`routed_experts`): only the weights change.
    """

    block: int = 32
    working_experts: int = 1
    temporaries: float = 0.5


PACKED = PackedExperts()


def mxfp4_bytes(out_features: int, in_features: int, experts: int = 1) -> int:
    """Bytes of MXFP4 blocks + scales of ``experts`` matrices [out, in]: 4 bits per weight
    (16 bytes per block of 32) and one E8M0 scale byte per block."""
    blocks = out_features * (in_features // PACKED.block)
    return experts * (blocks * 16 + blocks)


# -- the model, from config.json -------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What memory depends on in a model, read from its config through a meta-device build."""

    family: str
    layers: int
    moe_layers: tuple[int, ...]
    hidden: int
    vocab: int
    heads: int
    #: width of the query projection (heads x head_dim)
    q_width: int
    #: attention implementation transformers picks for this model (eager materialises scores)
    attention: str
    #: kinds of attention layers (full, sliding window...): eager builds one mask per kind
    mask_kinds: int
    experts: int
    top_k: int
    expert_width: int
    expert_bias: bool
    activation: str
    #: routed-expert matrices (gate_up + down of every expert of every MoE layer)
    expert_params: int
    expert_bias_params: int
    #: every other parameter: attention, embeddings, unembedding, norms, routers, dense MLPs
    other_params: int
    #: per decoder layer: output features of its dense MLP linears (native shared experts,
    #: dense layers), which run on every token
    dense_out: tuple[int, ...]
    router_params: int
    #: the LM head's parameters when it is not tied to the embeddings (0 if tied)
    unembedding_params: int
    #: the shared expert NEXUS attaches, at the routed experts' width (see shared_params)
    shared_spec: dict
    checkpoint_dtype: str
    mxfp4: bool
    max_positions: int | None

    @property
    def packed_bytes(self) -> int:
        """MXFP4 bytes of every routed expert (blocks + scales)."""
        H, I = self.hidden, self.expert_width  # noqa: E741
        per_layer = mxfp4_bytes(2 * I, H, self.experts) + mxfp4_bytes(H, I, self.experts)
        return per_layer * len(self.moe_layers)

    def to_dict(self) -> dict:
        return asdict(self)


def _config_dict(config) -> dict:
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d


@lru_cache(maxsize=16)
def _facts_from_json(config_json: str, quantized: bool, checkpoint_dtype: str) -> ModelFacts:
    from transformers import AutoConfig

    from nexus.attach import spec_for_block
    from nexus.checkpoint import layer_shapes, meta_model
    from nexus.families import family_for_config, find_moe_blocks, top_k_of
    from nexus.preflight import max_positions

    config = AutoConfig.for_model(**json.loads(config_json))
    model = meta_model(config)
    family = family_for_config(config)
    blocks = find_moe_blocks(model)
    shapes = layer_shapes(config, model)
    first = shapes[blocks[0].layer]
    text = config.get_text_config()
    expert_ids = {id(p) for b in blocks for p in b.experts.parameters()}
    router_ids = {id(p) for b in blocks for p in b.router_parameters().values()}
    expert_bias = sum(p.numel() for b in blocks for n, p in b.experts.named_parameters() if "bias" in n)
    expert_all = sum(p.numel() for b in blocks for p in b.experts.parameters())
    total = sum(p.numel() for p in model.parameters())
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or getattr(text, "qk_head_dim", None)
    head_dim = int(head_dim or text.hidden_size // heads)
    spec = spec_for_block(blocks[0], family, config)
    return ModelFacts(
        family=family.name,
        layers=int(text.num_hidden_layers),
        moe_layers=tuple(b.layer for b in blocks),
        hidden=int(text.hidden_size),
        vocab=int(text.vocab_size),
        heads=heads,
        q_width=heads * head_dim,
        attention=str(model.config._attn_implementation),
        mask_kinds=len(set(getattr(text, "layer_types", None) or ["full_attention"])),
        experts=first.num_experts,
        top_k=top_k_of(family, config),
        expert_width=first.intermediate_size,
        expert_bias=first.bias,
        activation=family.activation,
        expert_params=expert_all - expert_bias,
        expert_bias_params=expert_bias,
        other_params=total - expert_all,
        dense_out=_dense_widths(model, expert_ids | router_ids, int(text.num_hidden_layers)),
        router_params=sum(p.numel() for b in blocks for p in b.router_parameters().values()),
        unembedding_params=_unembedding(model),
        shared_spec=spec.to_dict(),
        checkpoint_dtype=checkpoint_dtype,
        mxfp4=quantized,
        max_positions=max_positions(config),
    )


def _unembedding(model) -> int:
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or (embed is not None and head.weight is embed.weight):
        return 0
    return head.weight.numel()


def _dense_widths(model, skip: set[int], layers: int) -> tuple[int, ...]:
    """Per decoder layer, output features of the linears outside attention and routed experts
    (dense MLPs and native shared experts run on every token)."""
    from torch import nn

    out = [0] * layers
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in skip:
            continue
        m = re.search(r"\blayers\.(\d+)\.(.*)$", name)
        if not m or re.search(r"attn|attention", m.group(2)) or int(m.group(1)) >= layers:
            continue
        out[int(m.group(1))] += module.out_features
    return tuple(out)


def model_facts(config) -> ModelFacts:
    """:class:`ModelFacts` of a loaded transformers config (``nexus.loading.load_config``)."""
    from nexus.loading import _is_mxfp4

    dtype = getattr(config, "dtype", None) or "float32"
    dtype = str(dtype).removeprefix("torch.")
    text = json.dumps(_config_dict(config), sort_keys=True, default=str)
    return _facts_from_json(text, _is_mxfp4(config), _CANONICAL.get(dtype, dtype))


def shared_params(facts: ModelFacts, intermediate_size: int | None, gate: str, train_router: bool) -> int:
    """Trainable parameters: one shared expert per MoE layer (counted on the meta device from the
    module NEXUS trains), plus the routers when they train too."""
    import torch

    from nexus.shared_expert import SharedExpert, SharedExpertSpec

    spec = SharedExpertSpec(**{**facts.shared_spec, "gate": gate})
    if intermediate_size:
        spec = replace(spec, intermediate_size=int(intermediate_size))
    one = sum(p.numel() for p in SharedExpert(spec, device=torch.device("meta")).parameters())
    return one * len(facts.moe_layers) + (facts.router_params if train_router else 0)


# -- what a stage runs with ---------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """How training places the model on its workers.

    ``ddp`` (today): every worker holds the whole frozen base and the whole trainable state;
    with more than one worker DDP adds one bucket copy of the gradients. An ``fsdp`` strategy
    (frozen weights sharded over the workers) adds an entry here with ``frozen_share`` 1/N.
    """

    name: str

    def frozen_share(self, workers: int) -> float:
        return 1.0

    def gradient_copies(self, workers: int) -> float:
        """Extra gradient-sized buffers (DDP's buckets, ``gradient_as_bucket_view`` off)."""
        return 1.0 if workers > 1 else 0.0


STRATEGIES = {"ddp": Strategy("ddp")}


@dataclass(frozen=True)
class Workload:
    """One stage's settings that its memory depends on (resolved: no ``auto`` left)."""

    stage: str
    device: str  # "cpu" or "gpu"
    workers: int
    batch_size: int
    seq_len: int
    dtype: str  # weights' dtype
    experts: str  # "packed" or "dequantized"
    #: GPUs per worker (fractions share a GPU's memory)
    gpus_per_worker: float = 0.0
    gradient_checkpointing: bool = False
    #: KD teacher: "online" (a teacher forward every step) or "off"; offline top-k
    #: distillation would be a third value with its own bytes per token
    teacher: str = "off"
    loss_chunk: int = 256
    grad_accum: int = 1
    strategy: str = "ddp"
    intermediate_size: int | None = None
    gate: str = "scalar"
    train_router: bool = False

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def weight_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def compute_bytes(self) -> int:
        """Activations' bytes per element: bf16 under the GPU training autocast, else the weights'."""
        return 2 if self.device == "gpu" and self.stage == "train" else self.weight_bytes


# -- activation terms ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Act:
    """Bytes of one piece of a decoder layer at a given batch.

    ``saved``: kept for backward once its forward ran (grad enabled); ``forward``: peak of
    temporaries while its forward runs without grad (collection, evaluation, the KD teacher,
    a checkpointed layer's first pass); ``backward``: peak extra while its backward runs.
    """

    saved: float = 0.0
    forward: float = 0.0
    backward: float = 0.0

    def then(self, other: Act) -> Act:
        """Two pieces that run one after the other: what they keep adds up, their temporaries
        do not (each piece's temporaries are freed before the next one runs)."""
        return Act(
            self.saved + other.saved, max(self.forward, other.forward), max(self.backward, other.backward)
        )


def attention(f: ModelFacts, w: Workload) -> Act:
    """Self-attention of one layer.

    Eager attention (GPT-OSS: transformers has no SDPA path for its sinks) materialises the
    scores ``batch x heads x S x (S+1)`` (the sink column): the product, the masked copy, the
    concatenation with the sinks and the softmax are alive together in forward (3 copies), the
    softmax output is kept for backward (1), and backward holds its gradient and softmax's
    (2). On CPU in bf16/fp16 the value matmul copies the non-contiguous probabilities and the
    softmax backward one more (+0.5 forward, +1 backward, measured). Besides the scores,
    ``Q = T x heads x head_dim`` sized tensors: rotated query/key, the GQA-repeated key and
    value and the output projection's input (3 kept). SDPA/flash kernels never materialise the
    scores: ~3.5 ``Q`` kept, 4.5 in forward, 3.5 in backward.
    """
    b = w.compute_bytes
    q = w.tokens * f.q_width * b
    if f.attention != "eager":
        return Act(saved=3.5 * q, forward=4.5 * q, backward=3.5 * q)
    scores = w.batch_size * f.heads * w.seq_len * (w.seq_len + 1) * b
    extra = 1.0 if w.device == "cpu" and b < 4 else 0.0
    return Act(saved=scores + 3 * q, forward=(3 + extra / 2) * scores + 3 * q, backward=(2 + extra) * scores)


#: per expert activation: tensors of R x I kept for backward, alive in a no-grad forward, and
#: R x H tensors alive at the end of the routed path (see :func:`routed_experts`)
_GATE_TENSORS = {
    # clamped SwiGLU with biases: gate_up out (2) + gathered biases (2) + clamp(gate), clamp(up),
    # gate*alpha, sigmoid, glu (5); kept: gate_up (2), both clamps, sigmoid and glu (4)
    "gpt_oss": {"saved": 6, "forward": 9, "tail": 5},
    # act(gate) * up: gate_up out (2), act (1), product (1); kept: gate_up (2) and product (1)
    "swiglu": {"saved": 3, "forward": 4, "tail": 4},
}


def routed_experts(f: ModelFacts, w: Workload) -> Act:
    """The routed experts of one MoE layer (transformers' grouped-mm path: every token is
    copied once per selected expert, ``R = T x top_k`` rows).

    Kept for backward: the gathered input rows (``R x H``) and the activation's inputs and
    output (``R x I`` each, count in ``_GATE_TENSORS``). Forward without grad: the larger of the
    activation's temporaries (``R x H + n R x I``) and the tail (down projection output, its
    gathered bias, the routing-weighted rows, their un-permuted copy: ~``tail x R x H``).
    Backward: gradients of the largest of those, ~3 of ``max(R x H, R x I)``.
    """
    b = w.compute_bytes
    rows = w.tokens * f.top_k
    rh, ri = rows * f.hidden * b, rows * f.expert_width * b
    c = _GATE_TENSORS.get(f.activation, _GATE_TENSORS["swiglu"])
    return Act(
        saved=rh + c["saved"] * ri,
        forward=max(rh + c["forward"] * ri, c["tail"] * rh),
        backward=3 * max(rh, ri),
    )


def dense_mlp(f: ModelFacts, w: Workload, layer: int) -> Act:
    """Dense MLPs of a layer (native shared experts, dense first layers), on every token: like a
    SwiGLU expert with ``R = T`` rows; its linears' output features give ``2I + H``."""
    width = f.dense_out[layer]
    if not width:
        return Act()
    b = w.compute_bytes
    rh = w.tokens * f.hidden * b
    ri = w.tokens * max(width - f.hidden, 0) / 2 * b
    return Act(saved=rh + 3 * ri, forward=max(rh + 4 * ri, 4 * rh), backward=3 * max(rh, ri))


def norms(f: ModelFacts, w: Workload) -> Act:
    """The layer's two RMSNorms, computed in fp32: with bf16/fp16 activations each keeps its
    fp32 copy of the input (``T x H x 4``); forward holds ~2.5 such tensors, backward 5."""
    fp32 = w.tokens * f.hidden * 4
    low = w.compute_bytes < 4
    return Act(saved=2 * fp32 if low else 0.0, forward=(2.5 if low else 2.0) * fp32, backward=5 * fp32)


def stream(f: ModelFacts, w: Workload) -> Act:
    """The residual stream of one layer: its output, the mid-layer residual and the two normed
    inputs stay alive for backward (4 x ``T x H``), and backward holds the stream's gradient
    and the next one (2). Forward's input and output are :func:`forward_peak`'s own term."""
    th = w.tokens * f.hidden * w.compute_bytes
    return Act(saved=4 * th, forward=0.0, backward=2 * th)


def shared_expert(f: ModelFacts, w: Workload) -> Act:
    """The trainable shared expert (fp32 parameters: fp32 activations on CPU, bf16 under the
    GPU autocast) on every token of its layer.

    Kept: its input cast to fp32 (when the model computes in bf16) and the input of each
    linear (``T x H``), and the activation's tensors (``T x I_s`` x 7 for GPT-OSS's clamped
    SwiGLU, x 4 for SwiGLU). Forward without grad: the activation's temporaries; backward: two
    of the larger of ``T x H`` and ``T x I_s``.
    """
    b = 2 if w.device == "gpu" and w.stage == "train" else 4
    spec_width = w.intermediate_size or f.shared_spec["intermediate_size"]
    th = w.tokens * f.hidden * b
    ti = w.tokens * spec_width * b
    n = 7 if f.shared_spec["activation"] == "gpt_oss" else 4
    cast = th if w.compute_bytes < 4 else 0.0
    return Act(saved=th + cast + n * ti, forward=max(n * ti, 2 * th) + cast, backward=2 * max(th, ti))


def layer_acts(f: ModelFacts, w: Workload, *, with_shared: bool) -> list[Act]:
    """Every decoder layer's :class:`Act`: attention, norms, stream, MLPs [and shared expert]."""
    moe = set(f.moe_layers)
    base = attention(f, w).then(norms(f, w)).then(stream(f, w))
    out = []
    for layer in range(f.layers):
        a = base.then(dense_mlp(f, w, layer))
        if layer in moe:
            a = a.then(routed_experts(f, w))
            if with_shared:
                a = a.then(shared_expert(f, w))
        out.append(a)
    return out


def forward_peak(f: ModelFacts, w: Workload, *, with_shared: bool) -> float:
    """Peak activation memory of a forward pass without grad: the masks, the stream and the
    largest layer's temporaries (one layer runs at a time)."""
    largest = max(a.forward for a in layer_acts(f, w, with_shared=with_shared))
    return masks(f, w) + 2 * w.tokens * f.hidden * w.compute_bytes + largest


def masks(f: ModelFacts, w: Workload) -> float:
    """Eager attention's additive masks ``batch x S x S`` in the compute dtype, built once per
    forward: one per kind of attention layer (causal, and sliding-window where the model has it)."""
    if f.attention != "eager":
        return 0.0
    return f.mask_kinds * w.batch_size * w.seq_len * w.seq_len * w.compute_bytes


def first_trainable(f: ModelFacts) -> int:
    """Layers before the first MoE layer see no trainable parameter: autograd keeps nothing there
    (the embeddings are frozen), and the first MoE layer keeps only its shared expert's inputs."""
    return min(f.moe_layers)


def training_saved(f: ModelFacts, w: Workload) -> list[float]:
    """Bytes kept for backward per layer without gradient checkpointing."""
    acts = layer_acts(f, w, with_shared=True)
    start = first_trainable(f)
    only_shared = shared_expert(f, w).saved
    return [0.0 if i < start else only_shared if i == start else a.saved for i, a in enumerate(acts)]


def loss_chunk(f: ModelFacts, w: Workload, *, grad: bool, teacher: bool) -> float:
    """Peak of the chunked loss (:mod:`nexus.train.losses`): ``rows = batch x chunk`` positions.

    In fp32 units ``F = rows x V x 4``: cross-entropy without grad (evaluation) holds the fp32
    logits and their log-softmax (2 F); with the KD teacher, the teacher's logits too (3 F).
    Training recomputes each chunk in backward: CE holds logits, log-probabilities and their
    gradient (3 F); KD the student's log-probabilities, the teacher's probabilities and two
    gradients (4 F), plus with bf16/fp16 logits three half-size copies (the head's output
    before the fp32 cast and its gradient).
    """
    rows = w.batch_size * min(w.loss_chunk, max(w.seq_len - 1, 1))
    F = rows * f.vocab * 4
    low = w.compute_bytes < 4
    if not grad:
        return (3 if teacher else 2) * F
    if not teacher:
        return 3 * F
    return 4 * F + (1.5 * F if low else 0.0)


def router_statistics(f: ModelFacts, w: Workload) -> float:
    """The collector's per-batch statistics: float64 probabilities and their products for one
    layer at a time (~5 ``T x E`` float64 tensors) and the accumulators (``L x E x E``)."""
    return 5 * w.tokens * f.experts * 8 + len(f.moe_layers) * f.experts * (f.experts + 5) * 8


# -- stage plans ---------------------------------------------------------------------------------

#: what a process holds besides its tensors: the CUDA context, cuBLAS/cuDNN workspaces and the
#: caching allocator's slack on a GPU; on a CPU a few buffers of the first forward (measured)
RUNTIME = {"gpu": 1.0 * GB, "cpu": 0.03 * GB}

PART_NAMES = (
    "frozen weights",
    "packed expert working set",
    "trainable shared experts",
    "gradients",
    "AdamW state",
    "activations",
    "teacher hidden states",
    "logits / loss chunks",
    "runtime",
)


@dataclass
class StagePlan:
    """One stage's prediction for one worker, with the verdict against the device."""

    stage: str
    workload: Workload
    #: memory at the peak phase, by part (adds up to ``peak``)
    parts: dict[str, float]
    phase: str
    #: activations at the configured setting and the other one (training only)
    activations: dict[str, float] = field(default_factory=dict)
    available: float | None = None
    fits: bool | None = None
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    def to_dict(self) -> dict:
        w = self.workload
        return {
            "device": w.device,
            "workers": w.workers,
            "settings": asdict(w),
            "peak_gb": gb(self.peak),
            "phase": self.phase,
            "parts_gb": {k: gb(v) for k, v in self.parts.items()},
            "activations_gb": {k: gb(v) for k, v in self.activations.items()},
            "available_gb": None if self.available is None else gb(self.available),
            "fits": self.fits,
            "advice": list(self.advice),
            "notes": list(self.notes),
        }


def frozen_weights(f: ModelFacts, w: Workload) -> tuple[float, float]:
    """(resident frozen weights, packed working set) in bytes.

    Everything but the routed experts is held in ``w.dtype``; the routed experts in it too when
    dequantised, or as MXFP4 blocks + scales with biases in ``w.dtype`` when packed (see
    :class:`PackedExperts`).
    """
    b = w.weight_bytes
    rest = f.other_params * b
    if w.experts == "packed":
        one = 3 * f.expert_width * f.hidden * w.compute_bytes
        working = PACKED.working_experts * one * (1 + PACKED.temporaries)
        return rest + f.packed_bytes + f.expert_bias_params * b, working
    return rest + (f.expert_params + f.expert_bias_params) * b, 0.0


def _base_parts(f: ModelFacts, w: Workload) -> dict[str, float]:
    weights, working = frozen_weights(f, w)
    if (
        w.stage == "collect"
        and w.device == "cpu"
        and w.experts == "dequantized"
        and w.dtype == f.checkpoint_dtype
    ):
        # weights in the checkpoint's dtype stay memory-mapped on a CPU: the LM head, which
        # collection never runs, is never read into memory
        weights -= f.unembedding_params * w.weight_bytes
    share = STRATEGIES[w.strategy].frozen_share(w.workers)
    parts = {"frozen weights": weights * share}
    if working:
        parts["packed expert working set"] = working
    return parts


def plan_collect(f: ModelFacts, w: Workload) -> StagePlan:
    """A collector: the frozen model, one decoder forward (no LM head) and router statistics."""
    parts = _base_parts(f, w)
    parts["activations"] = forward_peak(f, w, with_shared=False) + router_statistics(f, w)
    parts["runtime"] = RUNTIME[w.device]
    return StagePlan("collect", w, parts, "forward")


def plan_evaluate(f: ModelFacts, w: Workload) -> StagePlan:
    """Evaluation: the frozen model with the adapter (fp32 shared experts, no gradients), a
    forward with the shared experts on, the final hidden states and the CE loss chunk."""
    parts = _base_parts(f, w)
    parts["trainable shared experts"] = 4 * shared_params(f, w.intermediate_size, w.gate, False)
    th = w.tokens * f.hidden * w.compute_bytes
    fwd = forward_peak(f, w, with_shared=True)
    loss = th + loss_chunk(f, w, grad=False, teacher=False)
    parts["activations"] = fwd if fwd >= loss else th
    parts["logits / loss chunks"] = 0.0 if fwd >= loss else loss - th
    parts["runtime"] = RUNTIME[w.device]
    return StagePlan("evaluate", w, parts, "forward" if fwd >= loss else "loss")


def plan_train(f: ModelFacts, w: Workload) -> StagePlan:
    """One training worker: the largest of its phases (see :func:`training_phases`)."""
    phases = training_phases(f, w)
    phase, parts = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    other = replace(w, gradient_checkpointing=not w.gradient_checkpointing)
    acts = {
        ("checkpointing" if w.gradient_checkpointing else "no checkpointing"): _activation_peak(f, w),
        ("checkpointing" if other.gradient_checkpointing else "no checkpointing"): _activation_peak(f, other),
    }
    return StagePlan("train", w, parts, phase, activations=acts)


def _activation_peak(f: ModelFacts, w: Workload) -> float:
    return max(p.get("activations", 0.0) for p in training_phases(f, w).values())


def training_phases(f: ModelFacts, w: Workload) -> dict[str, dict[str, float]]:
    """Memory of one worker in each phase of an optimizer step (from the second step on, when
    AdamW's state exists).

    - ``teacher forward``: the KD teacher (shared experts off) under no_grad;
    - ``student forward``: every layer's kept activations (with gradient checkpointing, every
      layer's input only) and the temporaries of the layer running;
    - ``loss``: the same kept activations, the teacher's and the student's final hidden states,
      and one chunk of the loss being recomputed for its backward;
    - ``backward``: layer by layer from the last: the kept activations of the layers below, the
      layer's own (recomputed with checkpointing) and its backward temporaries, and the
      gradients of the shared experts reached so far;
    - ``optimizer step``: gradients, AdamW's state and its temporaries (on a GPU the
      foreach update allocates one more gradient-sized buffer).

    Gradients of earlier micro-batches exist throughout when ``grad_accum`` > 1, and DDP's
    buckets (a gradient-sized copy with several workers) always. On a GPU the autocast keeps
    bf16 copies of the fp32 shared experts (2 bytes per parameter) from the student forward to
    the end of the loss, and the graph keeps them through backward (with gradient
    checkpointing, only the recomputed layer's).
    """
    p = shared_params(f, w.intermediate_size, w.gate, w.train_router)
    base = _base_parts(f, w)
    base["trainable shared experts"] = 4 * p
    base["AdamW state"] = 8 * p
    buckets = 4 * p * STRATEGIES[w.strategy].gradient_copies(w.workers)
    held = buckets + (4 * p if w.grad_accum > 1 else 0.0)
    th = w.tokens * f.hidden * w.compute_bytes
    teacher = w.teacher == "online"
    acts = layer_acts(f, w, with_shared=True)
    kept = [th] * f.layers if w.gradient_checkpointing else training_saved(f, w)
    tail = {"runtime": RUNTIME[w.device]}
    hidden = {"teacher hidden states": th} if teacher else {}
    phases: dict[str, dict[str, float]] = {}
    if teacher:
        teacher_acts = forward_peak(f, w, with_shared=False)
        phases["teacher forward"] = {**base, "gradients": held, "activations": teacher_acts, **tail}
    # the GPU autocast's bf16 copies of the fp32 shared experts (see the docstring)
    copies = 2 * p if w.device == "gpu" else 0.0
    running = {**base, "trainable shared experts": 4 * p + copies}
    fixed = {**running, "gradients": held}
    below = sum(kept) + masks(f, w)
    phases["student forward"] = {
        **fixed,
        "activations": below + max(a.forward for a in acts),
        **hidden,
        **tail,
    }
    loss = loss_chunk(f, w, grad=True, teacher=teacher)
    phases["loss"] = {**fixed, "activations": below + th, **hidden, "logits / loss chunks": loss, **tail}
    activations, grads = _backward_peak(f, w, kept, acts, 4 * p)
    recomputed_copies = copies / len(f.moe_layers) if w.gradient_checkpointing else copies
    phases["backward"] = {
        **base,
        "trainable shared experts": 4 * p + recomputed_copies,
        "gradients": max(held, buckets + grads),
        "activations": activations,
        **hidden,
        **tail,
    }
    temporaries = 4 * p if w.device == "gpu" else 0.0
    phases["optimizer step"] = {**base, "gradients": buckets + 4 * p + temporaries, **tail}
    return phases


def _backward_peak(
    f: ModelFacts, w: Workload, kept: list[float], acts: list[Act], grads: float
) -> tuple[float, float]:
    """(activations, gradients) at the largest moment of backward: layer ``l`` running its
    backward (its kept tensors, recomputed with checkpointing, and its temporaries) with the
    layers below still kept and the gradients of the layers from ``l`` up allocated."""
    per_layer = grads / len(f.moe_layers)
    start = first_trainable(f)
    recomputed = training_saved(f, w) if w.gradient_checkpointing else [0.0] * f.layers
    best = (-1.0, 0.0, 0.0)
    for layer in range(f.layers - 1, start - 1, -1):
        now = sum(kept[: layer + 1]) + recomputed[layer] + acts[layer].backward + masks(f, w)
        grad_now = per_layer * sum(1 for m in f.moe_layers if m >= layer)
        if now + grad_now > best[0]:
            best = (now + grad_now, now, grad_now)
    return best[1], best[2]


#: stage name -> planner (a ``distill`` stage would add its own)
PLANNERS = {"collect": plan_collect, "train": plan_train, "evaluate": plan_evaluate}


# -- devices and verdicts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Devices:
    """What a stage's worker may use: per GPU, and per CPU node (shared by the workers on it)."""

    gpus: int | None = None
    gpu_memory: int | None = None
    cpu_memory: int | None = None
    cpu_nodes: int = 1
    #: where the numbers come from ("given", "this machine", "the Ray cluster")
    source: str = "given"

    def available(self, w: Workload) -> float | None:
        if w.device == "gpu":
            if self.gpu_memory is None:
                return None
            return self.gpu_memory * min(1.0, w.gpus_per_worker or 1.0)
        if self.cpu_memory is None:
            return None
        return self.cpu_memory / math.ceil(w.workers / max(1, self.cpu_nodes))

    def to_dict(self) -> dict:
        return {
            "gpus": self.gpus,
            "gpu_memory_gb": None if self.gpu_memory is None else gb(self.gpu_memory),
            "cpu_memory_gb": None if self.cpu_memory is None else gb(self.cpu_memory),
            "cpu_nodes": self.cpu_nodes,
            "source": self.source,
        }


def machine_memory() -> int:
    """Physical memory of this machine (bytes)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _candidates(f: ModelFacts, w: Workload, devices: Devices) -> list[tuple[str, list[Workload]]]:
    """Settings that lower a stage's memory, in the order we suggest them (least effect on the
    result first), each with its values from the mildest change to the strongest."""
    s = w.stage
    out: list[tuple[str, list[Workload]]] = []
    if s == "train" and not w.gradient_checkpointing:
        out.append(("train.gradient_checkpointing", [replace(w, gradient_checkpointing=True)]))
    if w.experts == "dequantized" and f.mxfp4:
        out.append(("model.experts", [replace(w, experts="packed")]))
    out.append((f"{s}.batch_size", [replace(w, batch_size=b) for b in _halvings(w.batch_size, 1)]))
    if s == "train":
        out.append(("train.loss_chunk", [replace(w, loss_chunk=c) for c in _halvings(w.loss_chunk, 32)]))
    out.append((f"{s}.seq_len", [replace(w, seq_len=n) for n in _halvings(w.seq_len, 128)]))
    if s != "collect":
        width = w.intermediate_size or f.shared_spec["intermediate_size"]
        out.append(
            ("convert.intermediate_size", [replace(w, intermediate_size=i) for i in _halvings(width, 64)])
        )
    if w.device == "cpu" and w.workers > devices.cpu_nodes:
        out.append(
            (f"{s}.workers", [replace(w, workers=n) for n in range(w.workers - 1, devices.cpu_nodes - 1, -1)])
        )
    return [(key, values) for key, values in out if values]


def _halvings(value: int, floor: int) -> list[int]:
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


#: job-config keys whose Workload field has another name
_ATTRS = {"model.experts": "experts", "convert.intermediate_size": "intermediate_size"}


def _setting_value(key: str, w: Workload):
    value = getattr(w, _ATTRS.get(key, key.split(".")[1]))
    return str(value).lower() if isinstance(value, bool) else value


def _hint(key: str, w: Workload, devices: Devices) -> str:
    if key.endswith(".batch_size") and w.stage == "train":
        return f"{key}: {w.batch_size} (raise train.grad_accum or train.workers to keep the tokens per step)"
    if key.endswith(".workers"):
        per_node = math.ceil(w.workers / max(1, devices.cpu_nodes))
        return f"{key}: {w.workers} ({per_node} per CPU node; or add nodes)"
    return f"{key}: {_setting_value(key, w)}"


def advise(f: ModelFacts, plan: StagePlan, devices: Devices) -> list[str]:
    """What to change so that ``plan`` fits: each single setting that does, at its mildest
    fitting value, in order of preference; else the smallest combination found greedily."""
    w = plan.workload
    fixes = []
    for key, values in _candidates(f, w, devices):
        for v in values:
            peak = PLANNERS[w.stage](f, v).peak
            if peak <= devices.available(v):
                fixes.append(f"set {_hint(key, v, devices)} -> {gb_text(peak)}")
                break
    if fixes:
        return fixes[:4]
    return [_combination(f, w, devices)]


def _combination(f: ModelFacts, w: Workload, devices: Devices) -> str:
    """Several settings at once: each candidate at its strongest until the stage fits (the last
    one at its mildest fitting value), then each earlier one relaxed as far as it still fits."""
    applied: list[tuple[str, list[Workload], int]] = []  # (key, values, index applied)
    combo = w

    def with_values(chosen) -> Workload:
        out = w
        for key, values, i in chosen:
            out = _apply(out, key, values[i])
        return out

    fits = lambda cand: PLANNERS[w.stage](f, cand).peak <= devices.available(cand)  # noqa: E731
    for key, values in _candidates(f, w, devices):
        hit = next((i for i, v in enumerate(values) if fits(_apply(combo, key, v))), None)
        applied.append((key, values, len(values) - 1 if hit is None else hit))
        combo = with_values(applied)
        if hit is not None:
            break
    else:
        fixed = sum(frozen_weights(f, w)) * STRATEGIES[w.strategy].frozen_share(w.workers) + RUNTIME[w.device]
        return (
            f"no setting is enough: the frozen weights and the runtime alone take {gb_text(fixed)} per "
            "worker; use a device with more memory"
        )
    for n in range(len(applied) - 1):
        key, values, i = applied[n]
        for j in range(i):
            trial = applied[:n] + [(key, values, j)] + applied[n + 1 :]
            if fits(with_values(trial)):
                applied[n] = (key, values, j)
                break
    final = with_values(applied)
    hints = ", ".join(_hint(key, final, devices) for key, _, _ in applied)
    return f"set {hints} together -> {gb_text(PLANNERS[w.stage](f, final).peak)}"


def _apply(current: Workload, key: str, value: Workload) -> Workload:
    """``current`` with the setting ``key`` taken from ``value``."""
    attr = _ATTRS.get(key, key.split(".")[1])
    return replace(current, **{attr: getattr(value, attr)})


def judge(f: ModelFacts, plan: StagePlan, devices: Devices) -> StagePlan:
    """Fill in the device memory, the verdict and, when it does not fit, the advice."""
    plan.available = devices.available(plan.workload)
    if plan.available is None:
        what = "--gpu-memory" if plan.workload.device == "gpu" else "--cpu-memory"
        plan.notes.append(f"device memory unknown: pass {what}")
        return plan
    plan.fits = plan.peak <= plan.available
    if not plan.fits:
        plan.advice = advise(f, plan, devices)
    return plan


# -- from a job config -----------------------------------------------------------------------------


def resolve_experts(experts: str, f: ModelFacts) -> str:
    """``auto``: packed for MXFP4 checkpoints, dequantised otherwise."""
    if experts not in EXPERTS:
        raise NexusError(f"unknown experts mode '{experts}'; choose one of {', '.join(EXPERTS)}")
    if experts == "auto":
        return "packed" if f.mxfp4 else "dequantized"
    if experts == "packed" and not f.mxfp4:
        raise NexusError(
            "experts: packed needs an MXFP4 checkpoint (quantization_config.quant_method mxfp4); "
            "use experts: auto or dequantized for this model"
        )
    return experts


def resolve_dtype(dtype: str, f: ModelFacts, *, gpu_training: bool) -> str:
    """The weights' dtype a stage loads: ``auto`` is the checkpoint's (bf16 for GPU training)."""
    if dtype == "auto":
        dtype = "bfloat16" if gpu_training else f.checkpoint_dtype
    dtype = _CANONICAL.get(dtype, dtype)
    if dtype not in _DTYPE_BYTES:
        raise NexusError(f"unknown dtype '{dtype}'; choose one of float32, bfloat16, float16, auto")
    return dtype


def workloads(cfg, f: ModelFacts) -> dict[str, Workload]:
    """Each stage's :class:`Workload` from a job config (:class:`nexus.pipeline.config.JobConfig`)."""
    experts = resolve_experts(getattr(cfg.model, "experts", "auto"), f)
    strategy = getattr(cfg.train, "strategy", "ddp")
    if strategy not in STRATEGIES:
        raise NexusError(f"unknown training strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    c, t, e, conv = cfg.collect, cfg.train, cfg.evaluate, cfg.convert
    collect_seq = c.seq_len or min(f.max_positions or 1024, 1024)
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
            teacher="online" if t.kd_weight > 0 else "off",
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


# -- the plan --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Predicted peak memory of each stage's worker, with verdicts (see :func:`plan`)."""

    model: str
    facts: ModelFacts
    devices: Devices
    stages: dict[str, StagePlan]
    trainable_params: int

    @property
    def fits(self) -> bool | None:
        verdicts = [s.fits for s in self.stages.values()]
        return None if None in verdicts else all(verdicts)

    def to_dict(self) -> dict:
        f = self.facts
        return {
            "model": self.model,
            "family": f.family,
            "layers": f.layers,
            "moe_layers": len(f.moe_layers),
            "experts": f.experts,
            "top_k": f.top_k,
            "hidden_size": f.hidden,
            "vocab_size": f.vocab,
            "mxfp4": f.mxfp4,
            "parameters": f.expert_params + f.expert_bias_params + f.other_params,
            "trainable_params": self.trainable_params,
            "devices": self.devices.to_dict(),
            "fits": self.fits,
            "stages": {name: s.to_dict() for name, s in self.stages.items()},
        }

    def table(self) -> str:
        return format_plan(self)

    def failures(self) -> list[StagePlan]:
        return [s for s in self.stages.values() if s.fits is False]


def make_plan(model: str, config, cfg, devices: Devices, stages=STAGES) -> Plan:
    """The :class:`Plan` of job config ``cfg`` for the model whose transformers config is ``config``."""
    f = model_facts(config)
    loads = workloads(cfg, f)
    out = {}
    for name in stages:
        if name not in loads:
            continue
        out[name] = judge(f, PLANNERS[name](f, loads[name]), devices)
    t = loads["train"]
    return Plan(model, f, devices, out, shared_params(f, t.intermediate_size, t.gate, t.train_router))


def format_plan(p: Plan) -> str:
    """The plan as a text table: one column per stage, one row per part, per worker (in GB, or
    in MB when every stage stays under 1 GB)."""
    f = p.facts
    stages = list(p.stages.values())
    unit, unit_name = (GB, "GB") if max((s.peak for s in stages), default=GB) >= GB else (10**6, "MB")

    def cell(value: float | None, dash: bool = True) -> str:
        if value is None:
            return "?"
        return "-" if dash and not value else f"{value / unit:.1f}"

    n_params = f.expert_params + f.expert_bias_params + f.other_params
    experts = stages[0].workload.experts if stages else "dequantized"
    lines = [
        f"model: {p.model} ({f.family}: {f.layers} layers, {len(f.moe_layers)} MoE x {f.experts} experts, "
        f"top-{f.top_k}, hidden {f.hidden}, vocab {f.vocab:,}; {count_text(n_params)} parameters, "
        f"{count_text(p.trainable_params)} trainable)",
        f"experts: {experts}" + (f" (MXFP4 on disk: {f.packed_bytes / GB:.1f} GB)" if f.mxfp4 else ""),
        "",
    ]
    rows = [
        ("worker", [f"{s.workload.device.upper()} x{s.workload.workers}" for s in stages]),
        ("batch x seq_len", [f"{s.workload.batch_size} x {s.workload.seq_len}" for s in stages]),
        ("dtype", [s.workload.dtype for s in stages]),
    ]
    rows += [
        (part, [cell(s.parts.get(part, 0.0)) for s in stages])
        for part in PART_NAMES
        if any(s.parts.get(part) for s in stages)
    ]
    rows += [
        (f"peak per worker ({unit_name})", [cell(s.peak, dash=False) for s in stages]),
        (f"available ({unit_name})", [cell(s.available, dash=False) for s in stages]),
        ("fits", [{True: "yes", False: "NO", None: "?"}[s.fits] for s in stages]),
    ]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(s.stage), *(len(cells[i]) for _, cells in rows)) for i, s in enumerate(stages)]
    lines.append(" " * width + "  " + "  ".join(s.stage.rjust(c) for s, c in zip(stages, cols)))
    lines += [
        label.ljust(width) + "  " + "  ".join(x.rjust(c) for x, c in zip(cells, cols))
        for label, cells in rows
    ]
    lines.append("")
    for s in stages:
        lines.extend(_stage_notes(s))
    return "\n".join(lines).rstrip() + "\n"


def _stage_notes(s: StagePlan) -> list[str]:
    w = s.workload
    out = []
    if s.stage == "train":
        on = "on" if w.gradient_checkpointing else "off"
        other = "no checkpointing" if w.gradient_checkpointing else "checkpointing"
        mine = "checkpointing" if w.gradient_checkpointing else "no checkpointing"
        out.append(
            f"train: {w.strategy}, peak during {s.phase}; activations at most {gb_text(s.activations[mine])} "
            f"with gradient checkpointing {on}, {gb_text(s.activations[other])} with it "
            f"{'off' if w.gradient_checkpointing else 'on'}; KD teacher {w.teacher}"
        )
    for note in s.notes:
        out.append(f"{s.stage}: {note}")
    if s.fits is False:
        out.append(
            f"{s.stage}: does NOT fit ({gb_text(s.peak)} > {gb_text(s.available)}); " + "; or ".join(s.advice)
        )
    return out


# -- entry points ----------------------------------------------------------------------------------

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
    from nexus.pipeline.config import DEMO

    if cfg.model.path == DEMO:
        from nexus.demo.pretrain import model_config, size_config

        return model_config(size_config(cfg.model.demo_size))
    from nexus.loading import load_config

    return load_config(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def _gpu_memory_here() -> int | None:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def plan(
    model: str | os.PathLike | None = None,
    *,
    config=None,
    overrides: list[str] | tuple[str, ...] = (),
    gpus: int | None = None,
    gpu_memory: str | float | None = None,
    cpu_memory: str | float | None = None,
    cpu_nodes: int = 1,
    strategy: str = "ddp",
    stages: tuple[str, ...] = STAGES,
    **settings,
) -> Plan:
    """Predict every stage's peak memory per worker, from the model's ``config.json`` alone.

    Args:
        model: model directory (only ``config.json`` is read) or Hub name; overrides the job's.
        config: a job YAML path or a loaded ``JobConfig``; default: the built-in job defaults.
        overrides: ``section.key=value`` job-config overrides (as ``--set``).
        gpus, gpu_memory: GPUs in the cluster and memory per GPU (``80GB``, ``79GiB``, GB as a
            number). Without ``config``, giving them runs every stage on GPUs.
        cpu_memory, cpu_nodes: memory per CPU node (default: this machine's) and node count;
            CPU workers of one stage share their node's memory.
        strategy: training strategy (``ddp``; more to come).
        settings: ``batch_size``, ``seq_len``, ``workers``, ``gradient_checkpointing``,
            ``intermediate_size``, ``dtype``, ``experts`` (auto/packed/dequantized),
            ``kd_weight``, ``loss_chunk``, ``grad_accum`` (see :data:`SETTING_KEYS`).
    """
    from nexus.pipeline.config import JobConfig, apply_overrides, load_config, parse_config

    if strategy not in STRATEGIES:
        raise NexusError(f"unknown training strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise NexusError(f"unknown stage(s) {', '.join(unknown)}; plan covers {', '.join(STAGES)}")
    if model is None and config is None:
        raise NexusError("nothing to plan: give a model (--model DIR) or a job config (--config FILE)")
    extra = job_overrides(settings, gpus=gpus, gpu_memory=gpu_memory, has_config=config is not None)
    if model is not None:
        extra.append(f"model.path={os.fspath(model)}")
    if isinstance(config, JobConfig):
        cfg = parse_config(
            apply_overrides(config.model_dump(mode="json"), [*extra, *overrides]), "job config"
        )
    else:
        cfg = load_config(config, [*extra, *overrides])
    gpu_bytes = parse_size(gpu_memory, "GPU memory") if gpu_memory is not None else None
    if gpu_bytes is None and any(_on_gpu(cfg, s) for s in stages):
        gpu_bytes = _gpu_memory_here()
    devices = Devices(
        gpus=gpus,
        gpu_memory=gpu_bytes,
        cpu_memory=parse_size(cpu_memory, "CPU memory") if cpu_memory is not None else machine_memory(),
        cpu_nodes=max(1, int(cpu_nodes)),
        source="given" if cpu_memory is not None else "this machine",
    )
    result = make_plan(str(cfg.model.path), job_model_config(cfg), cfg, devices, stages)
    if gpus is not None:
        _check_gpu_count(result, gpus)
    return result


def _on_gpu(cfg, stage: str) -> bool:
    return {
        "collect": cfg.collect.gpus_per_worker > 0,
        "train": cfg.train.use_gpu,
        "evaluate": cfg.evaluate.enabled and cfg.evaluate.gpus > 0,
    }[stage]


def _check_gpu_count(p: Plan, gpus: int) -> None:
    for s in p.stages.values():
        w = s.workload
        need = w.workers * w.gpus_per_worker if w.device == "gpu" else 0
        if need > gpus:
            s.notes.append(f"needs {need:g} GPUs at once, the cluster has {gpus}")
            s.fits = False
            s.advice = s.advice or [
                f"set {s.stage}.workers: {max(1, int(gpus // max(w.gpus_per_worker, 1e-9)))}"
            ]


def plot_plan(p: Plan, path: str | os.PathLike) -> None:
    """Stacked bars of each stage's parts (GB per worker) with its device memory as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(p.stages)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4.5))
    bottoms = [0.0] * len(names)
    for part in PART_NAMES:
        values = [p.stages[n].parts.get(part, 0.0) / GB for n in names]
        if any(values):
            ax.bar(names, values, bottom=bottoms, label=part)
            bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, n in enumerate(names):
        available = p.stages[n].available
        if available:
            ax.hlines(available / GB, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
    ax.set_ylabel("GB per worker (dashed: device memory)")
    ax.set_title(f"nexus plan: {os.path.basename(str(p.model).rstrip('/')) or p.model}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the job's preflight ------------------------------------------------------------------------


def _gpu_total_memory() -> int:
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


def cluster_gpu_memory(timeout_s: float = 120.0) -> int | None:
    """Memory of one of the Ray cluster's GPUs, asked from a one-GPU task; None if it has none
    or does not answer in time (the check then skips GPU stages, with a warning)."""
    import logging

    import ray

    from nexus.ray_utils import cluster_gpus

    if cluster_gpus() < 1:
        return None
    ref = ray.remote(_gpu_total_memory).options(num_gpus=1, num_cpus=0, name="nexus-gpu-memory").remote()
    try:
        return int(ray.get(ref, timeout=timeout_s))
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
    from nexus.ray_utils import cluster_gpus

    section = cfg.plan
    cpu, nodes = cluster_cpu_memory()
    if section.cpu_memory_gb:
        cpu = int(section.cpu_memory_gb * GB)
    gpu = int(section.gpu_memory_gb * GB) if section.gpu_memory_gb else None
    if gpu is None and any(_on_gpu(cfg, s) for s in STAGES):
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
