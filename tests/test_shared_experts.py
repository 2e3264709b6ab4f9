"""Issue 2 acceptance on a tiny random-init model of every supported family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import REQUIRED, TINY_CONFIGS, VOCAB, tiny_config, tiny_model

import nexus
from nexus.method.shared_expert import SharedExpert
from nexus.models import FAMILIES, expert_weights, family_for_config, find_moe_blocks

ALL = sorted(TINY_CONFIGS)


def _ids(seed: int = 0, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_every_registered_family_has_a_tiny_model_and_required_ones_are_there():
    assert set(TINY_CONFIGS) == set(FAMILIES)
    assert set(REQUIRED) <= set(FAMILIES)


@pytest.mark.parametrize("family", ALL)
def test_zero_init_is_exactly_the_base_and_disabled_restores_it(family):
    model = tiny_model(family)
    ids = _ids()
    base = _logits(model, ids)
    layers = nexus.attach_shared_experts(model, init="zero")
    assert layers == [b.layer for b in find_moe_blocks(model)]
    assert torch.equal(_logits(model, ids), base)

    nexus.detach_shared_experts(model)
    nexus.attach_shared_experts(model, init="random", gate="sigmoid")
    changed = _logits(model, ids)
    assert not torch.allclose(changed, base)
    with nexus.shared_experts_disabled(model):
        assert torch.equal(_logits(model, ids), base)
    assert torch.equal(_logits(model, ids), changed)  # switched back on after the block

    nexus.detach_shared_experts(model)
    assert torch.equal(_logits(model, ids), base)
    assert not any("nexus" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("train_router", [False, True])
def test_only_shared_experts_and_optionally_routers_get_gradients(family, train_router):
    # eval mode: no dropout or jitter; which parameters are in the gradient graph is the point here
    # (PhiMoE's sparsemixer can give its router an all-zero gradient on a batch, but never None).
    model = tiny_model(family)
    base_names = {n for n, _ in model.named_parameters()}
    nexus.attach_shared_experts(model, init="random", train_router=train_router)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    routers = {f"{b.router_name}.{n}" for b in find_moe_blocks(model) for n in b.router_parameters()}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    shared = {n for n, _ in model.named_parameters() if ".nexus." in n}
    assert shared and shared <= with_grad
    assert with_grad - shared == (routers if train_router else set())
    assert (with_grad - shared) <= base_names


@pytest.mark.parametrize("family", ALL)
def test_generate_with_shared_experts(family):
    model = tiny_model(family)
    nexus.attach_shared_experts(model, init="random")
    out = model.generate(_ids(shape=(1, 4)), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("family", REQUIRED)
def test_gradient_checkpointing_gives_the_same_gradients(family):
    ids = _ids()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(family).train()
        nexus.attach_shared_experts(model, init="random", seed=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ALL)
def test_adapter_round_trip_reproduces_logits_exactly(family, tmp_path):
    model = tiny_model(family)
    nexus.attach_shared_experts(model, init="random", gate="scalar", gate_init=0.5, seed=1)
    ids = _ids()
    expected = _logits(model, ids)
    nexus.save_adapter(model, tmp_path / "adapter", init={"method": "random"})
    fresh = tiny_model(family)
    layers = nexus.load_adapter(fresh, tmp_path / "adapter")
    assert layers == [b.layer for b in find_moe_blocks(fresh)]
    assert torch.equal(_logits(fresh, ids), expected)
    # adapter names never contain words that transformers' key mappings rewrite
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter.safetensors"), "pt") as f:
        for key in f.keys():
            for word in ("experts", "gate", "router", "shared_expert", "shared_mlp", "block_sparse_moe"):
                assert word not in key


@pytest.mark.parametrize(
    ("family", "other", "field"),
    [
        ("gpt_oss", dict(family="mixtral"), "family"),
        ("qwen3_moe", dict(hidden_size=64), "hidden_size"),
        ("mixtral", dict(num_hidden_layers=3), "num_hidden_layers"),
        ("deepseek_v3", dict(n_routed_experts=4), "num_experts"),
    ],
)
def test_loading_onto_a_mismatched_model_names_the_mismatch(family, other, field, tmp_path):
    model = tiny_model(family)
    nexus.attach_shared_experts(model, init="random")
    nexus.save_adapter(model, tmp_path / "a")
    target_family = other.pop("family", family)
    target = tiny_model(target_family, **other)
    with pytest.raises(nexus.NexusError, match=f"{field}=") as info:
        nexus.load_adapter(target, tmp_path / "a")
    assert "\n" not in str(info.value)
    assert not any(".nexus." in n for n, _ in target.named_parameters())


@pytest.mark.parametrize("family", ALL)
def test_one_expert_copied_into_the_shared_expert_reproduces_it(family):
    """Canonical expert weights read from the live model compute exactly that expert."""
    model = tiny_model(family)
    fam = family_for_config(model.config)
    block = find_moe_blocks(model)[-1]
    from nexus.method.attach import spec_for_block

    se = SharedExpert(spec_for_block(block, fam, model.config, gate="none"))
    e = block.num_experts - 1
    se.load_expert_weights(expert_weights(block, fam, e))
    x = torch.randn(5, se.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = se(x)
        if family == "llama4_text":  # Llama4 experts take per-expert token blocks, pre-scaled
            routed = torch.zeros(block.num_experts, 5, x.shape[1])
            routed[e] = x
            ref = block.experts(routed.reshape(-1, x.shape[1])).reshape(block.num_experts, 5, -1)[e]
        else:
            index = torch.full((5, 1), e)
            ref = block.experts(x, index, torch.ones(5, 1))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_dense_and_unsupported_models_get_a_clear_error():
    from transformers import AutoConfig

    dense = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(nexus.NexusError, match="not a Mixture-of-Experts.*supported: .*gpt_oss"):
        family_for_config(dense)
    unsupported = AutoConfig.for_model("switch_transformers")
    with pytest.raises(nexus.NexusError, match="does not support yet; supported: .*deepseek_v3"):
        family_for_config(unsupported)


def test_attach_rejects_bad_arguments():
    model = tiny_model("olmoe")
    with pytest.raises(nexus.NexusError, match="unknown init"):
        nexus.attach_shared_experts(model, init="pca")
    with pytest.raises(nexus.NexusError, match="unknown gate"):
        nexus.attach_shared_experts(model, gate="softmax")
    with pytest.raises(nexus.NexusError, match="must be positive"):
        nexus.attach_shared_experts(model, intermediate_size=0)
    nexus.attach_shared_experts(model)
    with pytest.raises(nexus.NexusError, match="already has shared experts"):
        nexus.attach_shared_experts(model)


def test_custom_intermediate_size_and_training_mode_jitter():
    # Mixtral scales its input in place for jitter noise in training mode: the shared expert must
    # see the block input from before that happens.
    model = tiny_model("mixtral", router_jitter_noise=0.5).train()
    nexus.attach_shared_experts(model, init="random", intermediate_size=7)
    block = find_moe_blocks(model)[0]
    seen, captured = {}, {}

    def block_input(module, args):
        seen["x"] = args[0].clone()

    def shared_input(module, args, out):
        captured["x"] = args[0].clone()

    block.module.register_forward_pre_hook(block_input)
    se = block.module.nexus
    se.register_forward_hook(shared_input)
    model(_ids(shape=(1, 5)))
    assert se.w_in.shape == (14, 32)
    torch.testing.assert_close(captured["x"], seen["x"], rtol=0, atol=0)


def test_tiny_config_helper_is_deterministic():
    a, b = tiny_model("qwen2_moe", seed=5), tiny_model("qwen2_moe", seed=5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert tiny_config("qwen2_moe").num_experts == 4
