"""Activation memory, term by term: each function counts the tensors one piece of code keeps.

``b``: bytes per element of the compute dtype; ``T = batch x seq_len`` tokens; ``R = T x top_k``
routed rows; ``H`` hidden, ``I`` expert width, ``V`` vocabulary. The counts were read off the code
(transformers' modelling code, :mod:`nexus.method.shared_expert`, :mod:`nexus.stages.train.losses`) and checked
against measured peaks module by module on CPU."""

from __future__ import annotations

from dataclasses import dataclass

from nexus.planner.model import ModelFacts
from nexus.planner.workload import Workload


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
    """Peak of the chunked loss (:mod:`nexus.stages.train.losses`): ``rows = batch x chunk`` positions.

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


def teacher_bytes_per_token(k: int) -> int:
    """Bytes per token of ``nexus distill``'s rows (offline KD): k token ids (int32) and their
    log-probabilities (float32), and the log of the remaining mass (float32). Each block's index
    (8 bytes) and token digest (16) are spread over its tokens and not counted."""
    return 8 * k + 4


def router_statistics(f: ModelFacts, w: Workload) -> float:
    """The collector's per-batch statistics: float64 probabilities and their products for one
    layer at a time (~5 ``T x E`` float64 tensors) and the accumulators (``L x E x E``)."""
    return 5 * w.tokens * f.experts * 8 + len(f.moe_layers) * f.experts * (f.experts + 5) * 8
