"""The five review defects of issue 14, each pinned by a test that failed before its fix.

1. The router KL of a trainable router counted forwards outside the student pass (held-out
   evaluation, gradient-checkpoint recomputation).
2. With a trainable router the KD teacher used the router being trained, not the base's.
3. ``load_adapter(trainable=True)`` left only the last layer's shared expert trainable.
4. A bf16/fp16 initial adapter was trained in bf16/fp16 instead of fp32 master weights.
5. ``gate: sigmoid`` started at half the requested scale (``sigmoid(0) = 0.5``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

import nexus
from nexus.method.adapter import adapter_state_dict, read_adapter_config, read_adapter_tensors
from nexus.method.attach import shared_expert_modules
from nexus.models import expert_weights, family_for_config, find_moe_blocks
from nexus.stages.train import TrainConfig
from nexus.stages.train.core import (
    Backbone,
    BaseRouters,
    compute_losses,
    evaluate_sums,
    make_optimizer,
    optimizer_step,
    prepare_model,
)


def _ids(seed: int = 0, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(seed))


def _router_cfg(model_dir, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        corpus=["unused"],
        output="unused",
        init="random",
        train_router=True,
        router_kl_weight=1.0,
        kd_weight=0.5,
        lr=1e-2,
        warmup_steps=0,
    )
    return TrainConfig(**{**base, **kw})


def _move_routers(model, seed: int = 1) -> None:
    """Move every router away from the base, as training a router does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in find_moe_blocks(model):
            for p in block.router_parameters().values():
                p.add_(0.5 * torch.randn(p.shape, generator=g))


# -- 1. router KL: only the student pass, robust to recomputation ------------------------------------


def test_router_kl_counts_only_the_student_pass(tiny_model_dir):
    """A held-out evaluation between two steps must not change the next step's router KL, and the
    KL is the mean over MoE layers of KL(base routing || current routing) on the student's router
    inputs, computed here from the routers' inputs and the base router weights kept by the test."""
    cfg = _router_cfg(tiny_model_dir, kd_weight=0.0)
    model = prepare_model(cfg, torch.device("cpu"))
    blocks = find_moe_blocks(model)
    base = [{k: v.detach().clone() for k, v in b.router_parameters().items()} for b in blocks]
    base_routers = BaseRouters.for_config(model, cfg)
    _move_routers(model)
    inputs = []
    handles = [b.router.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in blocks]
    ids = _ids()
    alone = compute_losses(model, Backbone(model), ids, cfg, base_routers=base_routers).router_kl
    for h in handles:
        h.remove()
    expected = []
    for x, b, w0 in zip(inputs, blocks, base, strict=True):
        x = x.reshape(-1, x.shape[-1])
        now = F.linear(x, b.router.weight.detach(), b.router.bias.detach())
        then = F.linear(x, w0["weight"], w0["bias"])  # GPT-OSS routers have a bias
        p, log_p, log_q = then.softmax(-1), then.log_softmax(-1), now.log_softmax(-1)
        expected.append(float((p * (log_p - log_q)).sum(-1).mean()))
    assert alone > 0.01
    # float32 sums over 32 tokens x 4 experts in another order: agree to float rounding
    assert math.isclose(alone, sum(expected) / len(expected), rel_tol=1e-5)

    evaluate_sums(model, [_ids(seed=7), _ids(seed=8)])  # the loop's held-out evaluation
    again = compute_losses(model, Backbone(model), ids, cfg, base_routers=base_routers).router_kl
    assert again == alone  # same batch, same weights: the same computation


def _three_steps(model_dir, checkpointing: bool) -> tuple[list, list[torch.Tensor]]:
    cfg = _router_cfg(model_dir, gradient_checkpointing=checkpointing)
    model = prepare_model(cfg, torch.device("cpu"))
    base_routers = BaseRouters.for_config(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(trainable, cfg)
    student = Backbone(model)
    steps = [
        optimizer_step(
            model, student, [_ids(seed=s)], cfg, optimizer, scheduler, trainable, base_routers=base_routers
        )
        for s in range(3)
    ]
    return steps, [p.detach().clone() for p in trainable]


def test_router_kl_with_gradient_checkpointing_equals_without(tiny_model_dir):
    """Recomputation under gradient checkpointing neither adds terms nor breaks the next step."""
    plain, plain_params = _three_steps(tiny_model_dir, checkpointing=False)
    ckpt, ckpt_params = _three_steps(tiny_model_dir, checkpointing=True)
    assert plain[0].router_kl == 0.0  # step 1: the router is still the base router
    assert plain[2].router_kl > 0.0
    for a, b in zip(plain, ckpt):
        # recomputation repeats the same float32 operations; tolerance for kernel order only
        assert math.isclose(a.router_kl, b.router_kl, rel_tol=1e-5, abs_tol=1e-12), (a, b)
        assert math.isclose(a.ce, b.ce, rel_tol=1e-6) and math.isclose(a.kd, b.kd, rel_tol=1e-5, abs_tol=1e-9)
    for a, b in zip(plain_params, ckpt_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- 2. the KD teacher is the base model, also when the router trains ---------------------------------


def test_kd_teacher_is_the_base_model_when_the_router_trains(tiny_model_dir):
    """Zero-init shared experts and moved routers: the student is the base with other routers, so
    the KD term is KL(base || student), computed here from two full forwards."""
    cfg = _router_cfg(tiny_model_dir, init="zero", router_kl_weight=1.0, kd_weight=1.0)
    model = prepare_model(cfg, torch.device("cpu"))
    base_routers = BaseRouters.for_config(model, cfg)
    _move_routers(model)
    moved = [p.detach().clone() for b in find_moe_blocks(model) for p in b.router_parameters().values()]
    ids = _ids()
    out = compute_losses(model, Backbone(model), ids, cfg, base_routers=base_routers)
    base = nexus.load_model(tiny_model_dir)
    with torch.no_grad():
        teacher = base(ids).logits[:, :-1].log_softmax(-1)
        student = model(ids).logits[:, :-1].log_softmax(-1)
    kd = float((teacher.exp() * (teacher - student)).sum(-1).mean())
    assert kd > 1e-3
    # float32 log-softmax over 320 tokens, summed in chunks: relative rounding ~1e-6
    assert math.isclose(out.kd, kd, rel_tol=1e-4), (out.kd, kd)
    # the teacher pass leaves the trained routers in place, and they still get gradients
    now = [p for b in find_moe_blocks(model) for p in b.router_parameters().values()]
    assert all(torch.equal(a, b) for a, b in zip(moved, now))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in now)


# -- 3. load_adapter(trainable=True): every layer -------------------------------------------------


def test_load_adapter_trainable_makes_every_layer_trainable(tmp_path):
    model = tiny_model("mixtral")
    nexus.attach_shared_experts(model, init="random", seed=1)
    nexus.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model("mixtral")
    layers = nexus.load_adapter(fresh, tmp_path / "adapter", trainable=True)
    assert len(layers) == 2
    modules = shared_expert_modules(fresh)
    assert sorted(modules) == layers
    for layer, se in modules.items():
        assert all(p.requires_grad for p in se.parameters()), f"layer {layer} is frozen"
    shared = {id(p) for se in modules.values() for p in se.parameters()}
    assert not any(p.requires_grad for p in fresh.parameters() if id(p) not in shared)
    frozen = tiny_model("mixtral")
    nexus.load_adapter(frozen, tmp_path / "adapter")
    assert not any(p.requires_grad for p in frozen.parameters())


# -- 4. fp32 master weights whatever the initial adapter's dtype -------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_initial_adapter_trains_in_fp32(tiny_model_dir, tmp_path, dtype):
    model = nexus.load_model(tiny_model_dir)
    nexus.attach_shared_experts(model, init="random", gate="scalar", gate_init=0.75, dtype=dtype, seed=2)
    nexus.save_adapter(model, tmp_path / "init")
    assert read_adapter_config(tmp_path / "init")["dtype"] == str(dtype).replace("torch.", "")
    stored = read_adapter_tensors(tmp_path / "init")

    cfg = TrainConfig(model=str(tiny_model_dir), corpus=["x"], output="o", adapter=str(tmp_path / "init"))
    trained = prepare_model(cfg, torch.device("cpu"))
    trainable = [p for p in trained.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    for name, t in adapter_state_dict(trained).items():
        assert t.dtype == torch.float32
        assert torch.equal(t, stored[name].float()), name  # widening is exact
    # the trained adapter is written from the fp32 master weights
    nexus.save_adapter(trained, tmp_path / "trained")
    assert read_adapter_config(tmp_path / "trained")["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in read_adapter_tensors(tmp_path / "trained").values())


# -- 5. the initial output scale is what --scale says, for every gate ---------------------------------


def _routed_expert(block, e: int, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return block.experts(x, torch.full((n, 1), e), torch.ones(n, 1))


@pytest.mark.parametrize("gate", ["scalar", "sigmoid", "none"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_attached_expert_starts_at_the_requested_scale(gate, scale):
    model = tiny_model("qwen3_moe")
    fam = family_for_config(model.config)
    blocks = find_moe_blocks(model)
    nexus.attach_shared_experts(
        model, gate=gate, gate_init=scale, weights={b.layer: expert_weights(b, fam, 1) for b in blocks}
    )
    x = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in blocks:
            # same weights, F.linear vs the experts' matmul: float32 rounding only
            torch.testing.assert_close(
                b.module.nexus(x), scale * _routed_expert(b, 1, x), rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("gate", ["sigmoid", "none", "scalar"])
def test_converted_expert_starts_at_the_requested_scale(gate, ray_cluster, tmp_path):
    from test_convert import setup_model

    from nexus.stages import convert
    from nexus.stages.analyze import load_selection

    d, model, sel = setup_model(tmp_path, "olmoe", top_k=1)
    out = convert.run(model=d, output=tmp_path / "adapter", selection=sel, gate=gate, scale=0.25)
    nexus.load_adapter(model, out)
    chosen = load_selection(sel)["per_layer"]
    x = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in find_moe_blocks(model):
            (e,) = chosen[str(b.layer)]["experts"]
            want = 0.25 * _routed_expert(b, e, x)
            torch.testing.assert_close(b.module.nexus(x), want, rtol=1e-5, atol=1e-6)
