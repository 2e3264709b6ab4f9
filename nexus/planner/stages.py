"""One worker's memory per stage: the parts at the stage's peak (collection, evaluation) or at
the largest phase of a training step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from nexus.planner.model import PACKED, ModelFacts, shared_params
from nexus.planner.terms import (
    Act,
    first_trainable,
    forward_peak,
    layer_acts,
    loss_chunk,
    masks,
    router_statistics,
    teacher_bytes_per_token,
    training_saved,
)
from nexus.planner.units import GB, gb
from nexus.planner.workload import STRATEGIES, Workload

#: what a process holds besides its tensors: the CUDA context, cuBLAS/cuDNN workspaces and the
#: caching allocator's slack on a GPU; on a CPU a few buffers of the first forward (measured)
RUNTIME = {"gpu": 1.0 * GB, "cpu": 0.03 * GB}


PART_NAMES = (
    "frozen weights",
    "FSDP gathered weights",
    "packed expert working set",
    "trainable shared experts",
    "gradients",
    "AdamW state",
    "activations",
    "teacher hidden states",
    "teacher rows",
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
        working = PACKED.working_set(f.expert_width, f.hidden, w.compute_bytes, w.device)
        return rest + f.packed_bytes + f.expert_bias_params * b, working
    return rest + (f.expert_params + f.expert_bias_params) * b, 0.0


def _base_parts(f: ModelFacts, w: Workload) -> dict[str, float]:
    weights, working = frozen_weights(f, w)
    if w.stage == "collect" and w.device == "cpu" and w.dtype == f.checkpoint_dtype:
        # weights in the checkpoint's dtype (packed experts or not) stay memory-mapped on a
        # CPU: the LM head, which collection never runs, is never read into memory
        weights -= f.unembedding_params * w.weight_bytes
    strategy = STRATEGIES[w.strategy]
    parts = {"frozen weights": weights * strategy.frozen_share(w.workers)}
    if strategy.sharded:
        root = (f.vocab * f.hidden + f.unembedding_params) * w.weight_bytes
        parts["FSDP gathered weights"] = strategy.gathered(root, (weights - root) / f.layers, w.workers)
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
    # under FSDP the trainable state is sharded like the base: this worker's 1/N of it
    p = shared_params(f, w.intermediate_size, w.gate, w.train_router)
    p *= STRATEGIES[w.strategy].trainable_share(w.workers)
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
    if w.teacher == "offline":  # the micro-batch's stored top-k rows instead of a teacher forward
        hidden = {"teacher rows": w.tokens * teacher_bytes_per_token(w.teacher_k)}
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
    # offline KD's chunk holds a vocabulary-sized copy for the student's mass outside the top-k
    # where online KD holds the teacher's probabilities: the same count
    loss = loss_chunk(f, w, grad=True, teacher=w.teacher != "off")
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
