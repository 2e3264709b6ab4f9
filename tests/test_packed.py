"""Packed MXFP4 experts (nexus.weights.packed) against the same checkpoint loaded dequantised.

The fixture is a tiny GPT-OSS checkpoint stored like the published ones (experts as MXFP4
blocks/scales, the rest bf16), in several shards with an index. Both layouts decode to
bit-identical weights (``mxfp4.decode`` is transformers' decoder, tested in test_mxfp4.py) and
run the same arithmetic; what may differ is the order of floating-point additions inside the
matmul kernels (transformers multiplies by the fused ``[H, 2I]`` tensor, grouped over
experts; packed experts by one decoded ``[2I, H]`` expert at a time). So float results agree
to fp32 rounding, not necessarily bitwise: ``TOL`` below.
"""

from __future__ import annotations

import json

import pytest
import torch
from model_dirs import TOKENIZER_VOCAB, sample_texts, write_tokenizer
from safetensors import safe_open
from test_mxfp4 import write_mxfp4_gpt_oss_dir

import nexus
from nexus.method.attach import shared_experts_disabled, spec_for_block
from nexus.models import FAMILIES, expert_weights, find_moe_blocks
from nexus.weights.packed import PackedGptOssExperts

#: fp32 agreement of packed vs dequantised: float32's unit roundoff is 6e-8; a different
#: summation order inside a matmul of width <= 128 moves a result by a few ulps, and the
#: network (2 layers, softmax, LM head) grows that by ~10x. 1e-5 leaves a 10x margin over
#: what we see (~2e-7) while any real mistake (a wrong nibble, scale, expert, bias or
#: gradient term) is off by 1e-3 or more.
TOL = dict(rtol=1e-5, atol=1e-5)
FAMILY = FAMILIES["gpt_oss"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    spinning threads make them ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    """Hidden and expert width 64 (two MXFP4 blocks per row), in several shards, with a tokenizer."""
    d = write_mxfp4_gpt_oss_dir(
        tmp_path_factory.mktemp("mxfp4") / "m",
        max_shard_size="40KB",
        hidden_size=64,
        intermediate_size=64,
        vocab_size=TOKENIZER_VOCAB,
    )
    write_tokenizer(d)
    return d


def _pair(mxfp4_dir, **kwargs):
    return (
        nexus.load_model(mxfp4_dir, experts="packed", **kwargs),
        nexus.load_model(mxfp4_dir, experts="dequantized", **kwargs),
    )


def _ids(n=2, t=12, seed=0):
    return torch.randint(3, TOKENIZER_VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_loads_packed_straight_from_the_shards(mxfp4_dir):
    index = json.loads((mxfp4_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    model = nexus.load_model(mxfp4_dir)  # auto: packed for an MXFP4 checkpoint
    blocks = find_moe_blocks(model)
    assert all(isinstance(b.experts, PackedGptOssExperts) for b in blocks)
    # the checkpoint's bytes, as they are: no float copy of any routed expert exists
    for b in blocks:
        for name, buf in b.experts.named_buffers():
            key = f"{b.name}.experts.{name}"
            with safe_open(str(mxfp4_dir / index[key]), "pt") as f:
                assert torch.equal(buf, f.get_tensor(key).to(buf.dtype)), key
        assert b.experts.gate_up_proj_blocks.dtype == torch.uint8
    assert not any(".experts." in n for n, _ in model.named_parameters())
    assert model.config.quantization_config.quant_method == "nexus_packed_mxfp4"
    # everything that is not a routed expert is the dequantised load's, bit for bit
    dense = nexus.load_model(mxfp4_dir, experts="dequantized")
    packed_state = model.state_dict()
    for key, value in dense.state_dict().items():
        if ".experts." not in key:
            assert torch.equal(packed_state[key], value), key
    assert torch.equal(model.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq)  # non-persistent


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_layer_output_and_gradients_match_transformers_experts(mxfp4_dir, implementation):
    packed, dense = _pair(mxfp4_dir)
    pe, de = packed.model.layers[1].mlp.experts, dense.model.layers[1].mlp.experts
    de.config._experts_implementation = implementation
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(37, pe.hidden_size, generator=g)
    logits0 = torch.randn(37, pe.num_experts, generator=g)
    upstream = torch.randn(37, pe.hidden_size, generator=g)
    results = []
    for module in (pe, de):
        x, logits = x0.clone().requires_grad_(), logits0.clone().requires_grad_()
        top, idx = logits.topk(2, -1)
        out = module(x, idx, top.softmax(-1))
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, logits.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, **TOL)
    assert results[0][2].abs().sum() > 0  # the routing weights do get a gradient


def test_decoded_weights_are_not_kept_for_backward(mxfp4_dir):
    packed = nexus.load_model(mxfp4_dir)
    experts = packed.model.layers[0].mlp.experts
    one_expert = min(experts.shape_of(p)[0] * experts.shape_of(p)[1] for p in ("gate_up_proj", "down_proj"))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(5, experts.hidden_size, requires_grad=True)
    w, idx = torch.randn(5, experts.num_experts).softmax(-1).topk(2, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = experts(x, idx, w.requires_grad_())
    out.sum().backward()
    # only routing, pre-activations and expert outputs: 10 routed pairs x (2I or H)
    assert saved and max(saved) < one_expert, (saved, one_expert)
    assert x.grad.abs().sum() > 0


def test_model_logits_and_gradients_match_dequantised(mxfp4_dir):
    packed, dense = _pair(mxfp4_dir)
    ids = _ids()
    grads = []
    for model in (packed, dense):
        nexus.attach_shared_experts(model, init="random", seed=3, train_router=True)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb).logits
        logits.float().logsumexp(-1).sum().backward()
        named = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        grads.append((logits.detach(), emb.grad, named))
    (lp, gp, np_), (ld, gd, nd) = grads
    torch.testing.assert_close(lp, ld, **TOL)
    torch.testing.assert_close(gp, gd, **TOL)  # input gradients
    assert np_.keys() == nd.keys() and any(".nexus." in n for n in np_) and any("router" in n for n in np_)
    for name in np_:  # shared experts and (trained) routers
        torch.testing.assert_close(np_[name], nd[name], **TOL, msg=name)


def test_zero_adapter_and_teacher_equal_the_packed_base_exactly(mxfp4_dir):
    packed = nexus.load_model(mxfp4_dir)
    ids = _ids(seed=1)
    with torch.no_grad():
        base = packed(ids).logits
        nexus.attach_shared_experts(packed, init="zero")
        assert torch.equal(packed(ids).logits, base)
        nexus.detach_shared_experts(packed)
        nexus.attach_shared_experts(packed, init="random", seed=1)
        assert not torch.allclose(packed(ids).logits, base)
        with shared_experts_disabled(packed):  # the KD teacher
            assert torch.equal(packed(ids).logits, base)


def test_specs_shapes_and_expert_weights_as_dequantised(mxfp4_dir):
    from nexus.weights.checkpoint import checkpoint_expert_weights, layer_shapes

    packed, dense = _pair(mxfp4_dir)
    assert (
        layer_shapes(packed.config, packed) == layer_shapes(dense.config, dense) == layer_shapes(dense.config)
    )
    for pb, db in zip(find_moe_blocks(packed), find_moe_blocks(dense)):
        assert pb.num_experts == db.num_experts == 4
        assert spec_for_block(pb, FAMILY, packed.config) == spec_for_block(db, FAMILY, dense.config)
        for e in range(pb.num_experts):
            ours, theirs = expert_weights(pb, FAMILY, e), expert_weights(db, FAMILY, e)
            disk = checkpoint_expert_weights(mxfp4_dir, pb.layer, e)
            for f in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
                assert torch.equal(getattr(ours, f), getattr(theirs, f)), (pb.layer, e, f)
                assert torch.equal(getattr(ours, f), getattr(disk, f)), (pb.layer, e, f)


def test_router_statistics_identical(mxfp4_dir):
    from nexus.stages.collect import RouterCollector

    packed, dense = _pair(mxfp4_dir)
    seqs = [s.numpy() for s in _ids(n=4, t=24, seed=2)]
    ours, theirs = RouterCollector(packed).collect_batch(seqs), RouterCollector(dense).collect_batch(seqs)
    # layer 0 routes the embeddings, identical in both; later layers route hidden states that
    # agree to fp32 rounding, which changes no top-k choice here
    assert ours.n.tolist() == theirs.n.tolist()
    assert (ours.topk_count == theirs.topk_count).all()
    for name in ("sum_p", "sum_ppt", "topk_weight_sum", "entropy_sum"):
        torch.testing.assert_close(
            torch.from_numpy(getattr(ours, name)), torch.from_numpy(getattr(theirs, name)), **TOL
        )


def _losses(mxfp4_dir, experts: str, steps: int = 10, **overrides) -> list[tuple[float, float]]:
    """Per-step (CE, KD) of the code ``nexus train`` runs (nexus.stages.train.core), in process."""
    from nexus.stages.train.config import TrainConfig
    from nexus.stages.train.core import Backbone, make_optimizer, optimizer_step, prepare_model

    cfg = TrainConfig(
        model=str(mxfp4_dir),
        corpus=["-"],
        output="-",
        init="random",
        experts=experts,
        max_steps=steps,
        batch_size=2,
        seq_len=16,
        lr=1e-2,
        warmup_steps=2,
        kd_weight=0.5,
        dtype="float32",
        **overrides,
    )
    torch.manual_seed(0)
    model = prepare_model(cfg, torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(trainable, cfg)
    student = Backbone(model)
    out = []
    for step in range(steps):
        batch = _ids(n=cfg.batch_size, t=cfg.seq_len, seed=100 + step)
        r = optimizer_step(model, student, [batch], cfg, optimizer, scheduler, trainable)
        out.append((r.ce, r.kd))
    return out


def test_training_losses_match_dequantised(mxfp4_dir):
    packed = _losses(mxfp4_dir, "packed")
    dense = _losses(mxfp4_dir, "dequantized")
    assert packed[-1][0] < packed[0][0] and packed[-1][1] > 0  # it trains, and distils
    # AdamW normalises each update by the gradient's running RMS, so fp32-rounding differences
    # in the gradients stay rounding-sized in the weights over 10 steps; 1e-4 relative
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(dense), rtol=1e-4, atol=1e-6)
    # activation checkpointing recomputes the packed forward inside backward: same losses
    torch.testing.assert_close(
        torch.tensor(_losses(mxfp4_dir, "packed", steps=3, gradient_checkpointing=True)),
        torch.tensor(packed[:3]),
        **TOL,
    )


def test_bfloat16_packed_matches_dequantised(mxfp4_dir):
    packed, dense = _pair(mxfp4_dir, dtype="bfloat16")
    assert packed.model.layers[0].mlp.experts.down_proj_bias.dtype == torch.bfloat16
    with torch.no_grad():
        lp, ld = packed(_ids()).logits.float(), dense(_ids()).logits.float()
    # bf16 keeps 8 significant bits (unit roundoff 2^-9): a different summation order moves
    # values by a few bf16 ulps; 3% of the logits' scale
    assert (lp - ld).abs().max() <= 0.03 * ld.abs().max()


@pytest.mark.ray
def test_evaluate_and_collect_give_the_same_numbers(ray_cluster, mxfp4_dir, tmp_path):
    from nexus.stages import collect, evaluate

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(60)))
    evals, stats = {}, {}
    for experts in ("packed", "dequantized"):
        evals[experts] = evaluate.run(
            model=mxfp4_dir,
            corpus={"c": [str(corpus)]},
            seq_len=32,
            max_tokens=512,
            generate_tokens=2,
            experts=experts,
        )
        stats[experts] = collect.run(
            model=mxfp4_dir,
            corpus=corpus,
            target_tokens=1000,
            seq_len=32,
            experts=experts,
            progress=False,
            cpus_per_worker=1,
        )
    assert evals["packed"]["experts"] == "packed" and stats["packed"].meta["experts"] == "packed"
    p, d = evals["packed"]["corpora"]["c"], evals["dequantized"]["corpora"]["c"]
    assert p["tokens"] == d["tokens"] > 0
    assert p["base_ppl"] == pytest.approx(d["base_ppl"], rel=1e-5)
    sp, sd = stats["packed"], stats["dequantized"]
    assert sp.tokens == sd.tokens and (sp.topk_count == sd.topk_count).all()
    torch.testing.assert_close(torch.from_numpy(sp.sum_ppt), torch.from_numpy(sd.sum_ppt), **TOL)


def test_experts_switch_errors(mxfp4_dir, tiny_model_dir):
    with pytest.raises(nexus.NexusError, match="packed experts need an MXFP4 checkpoint .* in a float dtype"):
        nexus.load_model(tiny_model_dir, experts="packed")
    with pytest.raises(nexus.NexusError, match="unknown experts layout 'int4'; choose one of auto, packed"):
        nexus.load_model(mxfp4_dir, experts="int4")
    # a plain checkpoint under auto is simply loaded
    assert not any(
        isinstance(m, PackedGptOssExperts) for m in nexus.load_model(tiny_model_dir, experts="auto").modules()
    )
