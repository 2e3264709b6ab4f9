"""The table of supported MoE families.

Transformers 5 already tells us a lot about each MoE architecture: the router class (via
``_can_record_outputs["router_logits"]``), and, on the experts module, whether the fused
gate/up tensor is transposed, interleaved or biased. What it does not say is written here:
how routing turns logits into probabilities, what the native shared expert is called and
whether our adapter can be merged into it. How a checkpoint names the experts on disk is not
a property of the family (transformers 5 writes many families back in the legacy per-expert
form, hub checkpoints come in both): :func:`nexus.weights.checkpoint.plan_layer` reads it from
the checkpoint's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nexus.errors import NexusError


@dataclass(frozen=True)
class Family:
    """What NEXUS needs to know about one transformers MoE architecture (``config.model_type``)."""

    name: str
    #: "softmax" or "sigmoid": how router logits become per-expert probabilities.
    probs: str = "softmax"
    #: attribute of the MoE block holding a native shared expert, if any
    native_shared: str | None = None
    #: attribute of the native shared expert's per-token gate, if it is gated (Qwen2-MoE)
    native_shared_gate: str | None = None
    #: config attribute counting native shared experts of size ``moe_intermediate_size``; set only
    #: where an ungated native shared expert can absorb our adapter (native merge)
    merge_count_attr: str | None = None
    #: activation: "swiglu" (act(gate) * up) or "gpt_oss" (clamped SwiGLU with alpha and limit)
    activation: str = "swiglu"
    #: gate/up order inside the fused tensor: "concat" ([gate; up]) or "interleaved" (g0,u0,g1,u1,...)
    gate_up_layout: str = "concat"
    #: expert tensors stored [E, in, out] rather than [E, out, in] (only used where the experts
    #: module does not carry transformers' own ``is_transposed`` flag)
    transposed: bool = False
    #: config attribute holding the activation name
    act_attr: str = "hidden_act"
    #: config attributes that may hold the number of experts routed per token, first found wins
    top_k_attrs: tuple[str, ...] = field(default=("num_experts_per_tok",))

    @property
    def mergeable(self) -> bool:
        return self.merge_count_attr is not None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("gpt_oss", activation="gpt_oss", gate_up_layout="interleaved", transposed=True),
        Family("qwen2_moe", native_shared="shared_expert", native_shared_gate="shared_expert_gate"),
        Family("qwen3_moe"),
        Family("mixtral"),
        Family("olmoe"),
        Family(
            "deepseek_v3",
            probs="sigmoid",
            native_shared="shared_experts",
            merge_count_attr="n_shared_experts",
        ),
        Family("deepseek_v2", native_shared="shared_experts", merge_count_attr="n_shared_experts"),
        Family(
            "glm4_moe", probs="sigmoid", native_shared="shared_experts", merge_count_attr="n_shared_experts"
        ),
        Family("granitemoe"),
        Family("phimoe"),
        Family("minimax"),
        Family("ernie4_5_moe", native_shared="shared_experts", merge_count_attr="moe_num_shared_experts"),
        Family("hunyuan_v1_moe", native_shared="shared_mlp", top_k_attrs=("moe_topk",)),
        Family("llama4_text", probs="sigmoid", native_shared="shared_expert", transposed=True),
        Family("jamba"),
    ]
}

#: config attributes whose presence marks an MoE architecture we do not support (for the error)
_MOE_HINTS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_experts_per_tok",
)


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def family_for_config(config) -> Family:
    """Return the family of a transformers config, or a one-line error listing the supported ones."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None) or getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(supported_families())
    if any(getattr(text_config, a, None) for a in _MOE_HINTS):
        raise NexusError(
            f"model type '{model_type}' is an MoE architecture NEXUS does not support yet; supported: {supported}"
        )
    raise NexusError(
        f"model type '{model_type}' is not a Mixture-of-Experts architecture (no routed experts); "
        f"NEXUS needs an MoE model, supported: {supported}"
    )


def top_k_of(family: Family, config) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in family.top_k_attrs:
        value = getattr(text_config, attr, None)
        if value:
            return int(value if isinstance(value, int) else value[0])
    raise NexusError(
        f"config of {family.name} model has none of {family.top_k_attrs}; is config.json complete?"
    )
