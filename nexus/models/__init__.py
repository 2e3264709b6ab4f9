"""Models: the family registry (`registry.py`), MoE blocks, routers and experts of a live model
(`live.py`), the one way to load a model or tokenizer (`loading.py`), model identity (`identity.py`)."""

from nexus.models.live import (
    ExpertWeights,
    MoEBlock,
    expert_weights,
    find_moe_blocks,
    fuse_gate_up,
    routing,
    split_gate_up,
)
from nexus.models.registry import FAMILIES, Family, family_for_config, supported_families, top_k_of

__all__ = [
    "FAMILIES",
    "ExpertWeights",
    "Family",
    "MoEBlock",
    "expert_weights",
    "family_for_config",
    "find_moe_blocks",
    "fuse_gate_up",
    "routing",
    "split_gate_up",
    "supported_families",
    "top_k_of",
]
