"""Router statistics of every family against its routing rule, written out here.

The collector (:class:`nexus.stages.collect.RouterCollector`) records which experts each token was
routed to (``topk_count``), the routing weights they received (``topk_weight_sum``) and the
summed router probabilities (``sum_p``). Here the same numbers are computed independently:
from the raw per-layer router logits that transformers returns with
``output_router_logits=True`` and each family's routing rule as its transformers 5 router
implements it (``transformers/models/<family>/modeling_<family>.py``), transcribed below
without using ``nexus.models``. A wrong expert choice (group-limited, bias-corrected,
renormalised or not) changes ``topk_count`` and fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_model

from nexus.stages.collect import RouterCollector

#: probabilities whose sums the statistics keep (``sum_p``): sigmoid for the sigmoid routers
SIGMOID_PROBS = {"deepseek_v3", "glm4_moe", "llama4_text"}

#: (family, config overrides): every tiny family, plus DeepSeek-V2's group-limited greedy routing
CASES = [(f, {}) for f in sorted(TINY_CONFIGS)] + [
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}),
]


def _softmax_topk(logits, k, renormalise: bool):
    """Qwen2/Qwen3-MoE, OLMoE (``norm_topk_prob``), Mixtral, MiniMax, HunYuan (always), Jamba (never)."""
    probs = logits.softmax(-1)
    weights, index = probs.topk(k, -1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return index, weights


def _topk_then_softmax(logits, k):
    """GPT-OSS, GraniteMoE: top-k of the logits, softmax over the chosen logits."""
    top, index = logits.topk(k, -1)
    return index, top.softmax(-1)


def _grouped_sigmoid(logits, k, bias, n_group, topk_group, norm, scaling):
    """DeepSeek-V3, GLM4-MoE: sigmoid scores; choose by score + correction bias among the
    ``topk_group`` groups whose two best biased scores sum highest; weights are the unbiased
    scores, renormalised if ``norm_topk_prob``, times ``routed_scaling_factor``."""
    scores = logits.sigmoid()
    choice = scores + bias
    t, e = choice.shape
    groups = choice.view(t, n_group, e // n_group).topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, -1).indices, 1.0)
    allowed = keep.repeat_interleave(e // n_group, dim=1).bool()
    index = choice.masked_fill(~allowed, float("-inf")).topk(k, -1).indices
    weights = scores.gather(1, index)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return index, weights * scaling


def _deepseek_v2(logits, k, method, n_group, topk_group, scaling):
    """DeepSeek-V2: softmax; ``greedy`` top-k, or ``group_limited_greedy`` (groups ranked by
    their best probability, the others zeroed); times ``routed_scaling_factor``."""
    probs = logits.softmax(-1)
    if method == "group_limited_greedy":
        t, e = probs.shape
        groups = probs.view(t, n_group, e // n_group).max(-1).values
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, -1).indices, 1.0)
        probs = probs * keep.repeat_interleave(e // n_group, dim=1)
    weights, index = probs.topk(k, -1)
    return index, weights * scaling


def _ernie(logits, k, bias, norm_min):
    """ERNIE-4.5-MoE: softmax; choose by softmax + correction bias; weights are the unbiased
    probabilities over their sum (clamped below at ``moe_norm_min``)."""
    probs = logits.softmax(-1)
    index = (probs + bias).topk(k, -1).indices
    weights = probs.gather(1, index)
    return index, weights / weights.sum(-1, keepdim=True).clamp(min=norm_min)


def _llama4(logits, k):
    """Llama4: top-k of the logits, each weighted by the sigmoid of its own logit."""
    top, index = logits.topk(k, -1)
    return index, top.sigmoid()


def _phimoe(logits, eps):
    """PhiMoE's sparsemixer at inference (top-2): the best expert, weighted by the softmax over
    the logits within a relative margin 2 * eps of it; then the same for the best remaining."""
    index, weights, masked = [], [], logits
    for _ in range(2):
        best, i = masked.max(-1, keepdim=True)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        weights.append(masked.masked_fill(far, float("-inf")).softmax(-1).gather(1, i))
        index.append(i)
        masked = masked.scatter(1, i, float("-inf"))
    return torch.cat(index, -1), torch.cat(weights, -1)


def route(family: str, cfg, logits: torch.Tensor, router) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert indices [T, k], routing weights [T, k]) of ``family`` for float32 ``logits``."""
    k = cfg.moe_topk if family == "hunyuan_v1_moe" else cfg.num_experts_per_tok
    if family in ("gpt_oss", "granitemoe"):
        return _topk_then_softmax(logits, k)
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return _softmax_topk(logits, k, renormalise=bool(cfg.norm_topk_prob))
    if family in ("mixtral", "minimax", "hunyuan_v1_moe"):
        return _softmax_topk(logits, k, renormalise=True)
    if family == "jamba":
        return _softmax_topk(logits, k, renormalise=False)
    if family in ("deepseek_v3", "glm4_moe"):
        bias = router.e_score_correction_bias
        return _grouped_sigmoid(
            logits, k, bias, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor
        )
    if family == "deepseek_v2":
        return _deepseek_v2(
            logits, k, cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor
        )
    if family == "ernie4_5_moe":
        return _ernie(logits, k, router.moe_statics.e_score_correction_bias.squeeze(), cfg.moe_norm_min)
    if family == "llama4_text":
        return _llama4(logits, k)
    if family == "phimoe":
        assert k == 2  # sparsemixer is written for top-2
        return _phimoe(logits, cfg.router_jitter_noise)
    raise AssertionError(f"no routing rule written for {family}; add it here")


def _batch(seed: int = 4) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
    """Three sequences of different lengths (40 tokens), right-padded like the collector pads."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, 120, n) for n in (17, 9, 14)]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s)
        mask[r, : len(s)] = 1
    return seqs, ids, mask


@pytest.mark.parametrize(
    ("family", "overrides"), CASES, ids=[f + ("-grouped" if o else "") for f, o in CASES]
)
def test_topk_counts_and_weights_follow_the_familys_routing_rule(family, overrides):
    torch.set_num_threads(1)
    model = tiny_model(family, **overrides)
    with torch.no_grad():  # non-zero correction biases, large enough to change choices
        g = torch.Generator().manual_seed(1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.2 * torch.randn(buf.shape, generator=g))
    col = RouterCollector(model)
    seqs, ids, mask = _batch()
    got = col.collect_batch(seqs, list(range(len(seqs))))

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    layers = [x for x in out.router_logits if x is not None]
    assert len(layers) == len(col.layers) == len(col.blocks)
    cfg = model.config.get_text_config()
    keep = mask.reshape(-1).bool()
    E = col.num_experts
    changed_by_rule = False
    for pos, (raw, block) in enumerate(zip(layers, col.blocks, strict=True)):
        logits = raw.reshape(-1, E)[keep].float()
        index, weights = route(family, cfg, logits, block.router)
        count = np.bincount(index.reshape(-1).numpy(), minlength=E).astype(np.float64)
        wsum = torch.zeros(E, dtype=torch.float64).index_add_(
            0, index.reshape(-1), weights.reshape(-1).double()
        )
        probs = logits.sigmoid() if family in SIGMOID_PROBS else logits.softmax(-1)

        assert got.n[pos] == keep.sum() == 40  # padding excluded
        np.testing.assert_array_equal(got.topk_count[pos], count)  # the same experts, token by token in sum
        # the model's float32 arithmetic vs ours in another order: relative rounding ~1e-7
        np.testing.assert_allclose(got.topk_weight_sum[pos], wsum.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.sum_p[pos], probs.double().sum(0).numpy(), rtol=1e-5, atol=1e-6)
        plain = logits.topk(index.shape[-1], -1).indices
        changed_by_rule |= not torch.equal(index.sort(-1).values, plain.sort(-1).values)
    if family in ("deepseek_v3", "glm4_moe", "ernie4_5_moe") or overrides:
        # the groups and correction biases decided some tokens here: the test sees them
        assert changed_by_rule
