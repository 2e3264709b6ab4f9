"""What a stage runs with: its resolved settings (:class:`Workload`) and the training strategy."""

from __future__ import annotations

from dataclasses import dataclass

from nexus.errors import NexusError
from nexus.planner.model import ModelFacts
from nexus.planner.units import CANONICAL_DTYPES, DTYPE_BYTES

STAGES = ("collect", "train", "evaluate")


EXPERTS = ("auto", "packed", "dequantized")


@dataclass(frozen=True)
class Strategy:
    """How training places the model on its workers (``train.strategy``).

    - ``ddp``: every worker holds the whole frozen base and the whole trainable state; with
      more than one worker DDP adds one bucket copy of the gradients.
    - ``fsdp`` (FSDP2): every parameter, frozen ones included, is sharded 1/N over the workers
      (packed MXFP4 experts too); the trainable state (weights, gradients, AdamW) likewise.
      Gathered at once: the root's parameters (embeddings, LM head: gathered at the first
      forward, freed after backward) and a decoder layer with the next one prefetched.
    """

    name: str
    sharded: bool = False

    def frozen_share(self, workers: int) -> float:
        return 1.0 / workers if self.sharded else 1.0

    def trainable_share(self, workers: int) -> float:
        return 1.0 / workers if self.sharded else 1.0

    def gradient_copies(self, workers: int) -> float:
        """Extra gradient-sized buffers (DDP's buckets, ``gradient_as_bucket_view`` off)."""
        return 1.0 if workers > 1 and not self.sharded else 0.0

    def gathered(self, root: float, layer: float, workers: int) -> float:
        """Bytes of whole parameters alive besides the worker's shards: FSDP's all-gathered root
        (``root`` bytes) and two decoder layers (``layer`` bytes each: the running one and the
        prefetched next), less the shards of them the worker holds anyway."""
        if not self.sharded:
            return 0.0
        return (root + 2 * layer) * (1 - 1 / workers)


STRATEGIES = {"ddp": Strategy("ddp"), "fsdp": Strategy("fsdp", sharded=True)}


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
    #: KD teacher: "online" (a teacher forward every step), "offline" (``nexus distill``'s
    #: top-``teacher_k`` rows read beside the blocks; no teacher forward) or "off"
    teacher: str = "off"
    teacher_k: int = 0
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
        return DTYPE_BYTES[self.dtype]

    @property
    def compute_bytes(self) -> int:
        """Activations' bytes per element: bf16 under the GPU training autocast, else the weights'."""
        return 2 if self.device == "gpu" and self.stage == "train" else self.weight_bytes


def resolve_experts(experts: str, f: ModelFacts) -> str:
    """``auto``: packed for MXFP4 checkpoints, dequantised otherwise (the loader's own rule)."""
    from nexus.models.loading import experts_layout

    return experts_layout(experts, f.quant_method)


def resolve_dtype(dtype: str, f: ModelFacts, *, gpu_training: bool) -> str:
    """The weights' dtype a stage loads: ``auto`` is the checkpoint's (bf16 for GPU training)."""
    if dtype == "auto":
        dtype = "bfloat16" if gpu_training else f.checkpoint_dtype
    dtype = CANONICAL_DTYPES.get(dtype, dtype)
    if dtype not in DTYPE_BYTES:
        raise NexusError(f"unknown dtype '{dtype}'; choose one of float32, bfloat16, float16, auto")
    return dtype
