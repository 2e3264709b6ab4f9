"""Model-family layer: MoE blocks, routers, router probabilities and expert weights per family."""

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
