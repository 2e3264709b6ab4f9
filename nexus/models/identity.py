"""Model identity: the handful of facts every artifact records about the model it came from.

Statistics, selections and adapters each store the identity of their base model; loading
one onto another model compares field by field and names the first mismatch, instead of
failing later with a shape error deep inside a matmul.
"""

from __future__ import annotations

import functools
import json

import torch

from nexus.errors import NexusError
from nexus.models import family_for_config, find_moe_blocks, top_k_of
from nexus.util.artifacts import sha256_json

IDENTITY_FIELDS = (
    "family",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "num_experts",
    "top_k",
    "moe_layers",
)


@functools.lru_cache(maxsize=32)
def _identity_from_json(config_json: str) -> tuple:
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(config_json)
    config = AutoConfig.for_model(**d)
    # A meta-device model costs no memory even for 120B and gives the exact MoE layer list.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = find_moe_blocks(model)
    family = family_for_config(config)
    text = config.get_text_config()
    return (
        ("family", family.name),
        ("hidden_size", int(text.hidden_size)),
        ("num_hidden_layers", int(text.num_hidden_layers)),
        ("vocab_size", int(text.vocab_size)),
        ("num_experts", int(blocks[0].num_experts)),
        ("top_k", top_k_of(family, config)),
        ("moe_layers", tuple(b.layer for b in blocks)),
    )


def model_identity(config) -> dict:
    """Identity of a transformers config (a live model's ``.config`` or a loaded config.json)."""
    family_for_config(config)  # clear error for dense / unsupported models first
    d = config.to_dict()
    d.pop("quantization_config", None)
    ident = dict(_identity_from_json(json.dumps(d, sort_keys=True, default=str)))
    ident["moe_layers"] = list(ident["moe_layers"])
    ident["config_hash"] = sha256_json({k: ident[k] for k in IDENTITY_FIELDS})[:16]
    return ident


def check_identity(recorded: dict, actual: dict, what: str, fix: str) -> None:
    """Raise a one-line error naming the first field where ``recorded`` differs from ``actual``."""
    for key in IDENTITY_FIELDS:
        if key in recorded and recorded[key] != actual.get(key):
            raise NexusError(
                f"{what} was made for a model with {key}={recorded[key]}, but this model has "
                f"{key}={actual.get(key)}; {fix}"
            )
