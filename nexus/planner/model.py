"""What memory depends on in a model: parameter counts and shapes from a meta-device build of its
config, and the packed MXFP4 format of its experts."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from nexus.planner.units import CANONICAL_DTYPES


@dataclass(frozen=True)
class PackedExperts:
    """Memory constants of packed (MXFP4) frozen experts.

    Resident: the checkpoint's uint8 ``*_blocks`` [E, out, in/32, 16] and ``*_scales``
    [E, out, in/32] of gate_up (out = 2I, in = H) and down (out = H, in = I), plus biases in
    the compute dtype. Working memory while a layer runs (:mod:`nexus.weights.packed`): one
    scratch buffer of the larger projection, gate_up's ``2I x H`` values in the compute dtype,
    that every expert decodes into in turn; the decoding table (65,536 pairs of values); and
    the int32 indices of one chunk of 32-weight blocks (:data:`nexus.weights.mxfp4` decodes
    ``2**14`` blocks at a time on a CPU, ``2**20`` on a GPU). The routed path's activations
    (rows per expert, kept for the input gradient) are those of the dequantised path
    (:func:`routed_experts`): only the weights change.
    """

    block: int = 32
    table_entries: int = 1 << 16

    def working_set(self, intermediate: int, hidden: int, compute_bytes: int, device: str) -> float:
        """Bytes of decoding working memory (see the class docstring)."""
        from nexus.weights.mxfp4 import _ROWS_PER_CHUNK, _ROWS_PER_CHUNK_DEVICE

        blocks = 2 * intermediate * hidden // self.block  # gate_up's 32-weight blocks
        chunk = min(blocks, _ROWS_PER_CHUNK if device == "cpu" else _ROWS_PER_CHUNK_DEVICE)
        indices = chunk * (self.block // 2 + 1) * 4  # int32 of every byte, and of its scale
        return 2 * intermediate * hidden * compute_bytes + self.table_entries * 2 * compute_bytes + indices


PACKED = PackedExperts()


def mxfp4_bytes(out_features: int, in_features: int, experts: int = 1) -> int:
    """Bytes of MXFP4 blocks + scales of ``experts`` matrices [out, in]: 4 bits per weight
    (16 bytes per block of 32) and one E8M0 scale byte per block."""
    blocks = out_features * (in_features // PACKED.block)
    return experts * (blocks * 16 + blocks)


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
    #: the checkpoint's quantization_config.quant_method (None: float weights)
    quant_method: str | None
    max_positions: int | None

    @property
    def mxfp4(self) -> bool:
        return (self.quant_method or "").endswith("mxfp4")

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
def _facts_from_json(config_json: str, quant_method: str | None, checkpoint_dtype: str) -> ModelFacts:
    from transformers import AutoConfig

    from nexus.method.attach import spec_for_block
    from nexus.models import family_for_config, find_moe_blocks, top_k_of
    from nexus.util.preflight import max_positions
    from nexus.weights.checkpoint import layer_shapes, meta_model

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
        quant_method=quant_method,
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
    """:class:`ModelFacts` of a loaded transformers config (``nexus.models.loading.load_config``)."""
    from nexus.models.loading import quant_method

    dtype = getattr(config, "dtype", None) or "float32"
    dtype = str(dtype).removeprefix("torch.")
    text = json.dumps(_config_dict(config), sort_keys=True, default=str)
    return _facts_from_json(text, quant_method(config), CANONICAL_DTYPES.get(dtype, dtype))


def shared_params(facts: ModelFacts, intermediate_size: int | None, gate: str, train_router: bool) -> int:
    """Trainable parameters: one shared expert per MoE layer (counted on the meta device from the
    module NEXUS trains), plus the routers when they train too."""
    import torch

    from nexus.method.shared_expert import SharedExpert, SharedExpertSpec

    spec = SharedExpertSpec(**{**facts.shared_spec, "gate": gate})
    if intermediate_size:
        spec = replace(spec, intermediate_size=int(intermediate_size))
    one = sum(p.numel() for p in SharedExpert(spec, device=torch.device("meta")).parameters())
    return one * len(facts.moe_layers) + (facts.router_params if train_router else 0)
