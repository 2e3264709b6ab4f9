"""Tiny random-init models of every supported family, built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
#: tiny shapes vLLM's CPU attention and fused-MoE kernels accept (head size 32, widths multiples
#: of 32): the serving test's and benchmarks/gpu_serve.py's
VLLM_SHAPES = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=64,
    max_position_embeddings=256,
)
_COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_DS = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    num_hidden_layers=3,
    num_key_value_heads=4,
)

#: per-family overrides on top of _COMMON: small but every feature present (dense first layers,
#: native shared experts, sinks, biases)
TINY_CONFIGS: dict[str, dict] = {
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        _DS, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8
    ),
    "deepseek_v2": dict(
        _DS,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),
    "glm4_moe": dict(_DS, head_dim=8),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "minimax": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["full_attention", "full_attention"],
    ),
    "ernie4_5_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        moe_num_shared_experts=1,
        moe_k=2,
        moe_layer_start_index=0,
    ),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, head_dim=8),
    "llama4_text": dict(
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        intermediate_size_mlp=48,
        head_dim=8,
    ),
    "jamba": dict(
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=1,
        expert_layer_offset=0,
        attn_layer_period=1,
        attn_layer_offset=0,
        use_mamba_kernels=False,
    ),
}

REQUIRED = ["gpt_oss", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"]


def tiny_config(family: str, **overrides):
    return AutoConfig.for_model(family, **{**_COMMON, **TINY_CONFIGS[family], **overrides})


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random-init tiny model in eval mode; weights scaled up so experts differ visibly."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or ".gate." in name or "experts" in name or "gate.wg" in name:
                p.normal_(0.0, 0.3)
    return model.eval()
