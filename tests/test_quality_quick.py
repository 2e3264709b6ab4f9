"""Benchmarks' smoke tests on the tiny demo: every method of the quality benchmark trains
(domain perplexity below the base's), and the throughput and GPU-scale scripts run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_quality_quick_every_method_trains(demo_tiny, ray_cluster, tmp_path):
    import methods
    import quality

    corpus_dir, model_dir = demo_tiny
    quick = ["--quick", "--model", str(model_dir), "--corpus-dir", str(corpus_dir), "--out", str(tmp_path)]
    assert quality.main(quick) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == set(methods.METHODS)  # every method ran
    assert quality.quick_check(summary["rows"]) == []  # ... and trained: domain ppl < base's
    base = rows["base"]
    assert base["trainable_params"] == 0
    # ESFT's top-1 expert per layer has exactly the shared expert's size (minus its scalar gate)
    layers = 2
    assert rows["esft-token"]["trainable_params"] == rows["nexus"]["trainable_params"] - layers
    assert (
        rows["full-ft"]["trainable_params"]
        > rows["lora-r11"]["trainable_params"]
        > rows["lora-r2"]["trainable_params"]
    )
    assert (tmp_path / "quality_pareto.png").stat().st_size > 0
    assert (tmp_path / "quality_curves.png").stat().st_size > 0
    runs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["curve"][0][0] == 0 and r["peak_rss_mb"] > 0 for r in runs)
    assert all(r["code_version"] == quality.HARNESS_VERSION and r["key_any"] != r["key"] for r in runs)
    assert all(r["code_hash"] == quality.code_hash() for r in runs)
    # a rerun resumes: nothing is trained again
    assert quality.main(quick) == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(runs)
    # learning-rate grids (two new runs): the matched-forgetting table and the bracketing check
    grids = ["--lrs", "nexus=0.003,0.009", "esft-token-kd=0.009,0.027"]
    assert quality.main([*quick, "--methods", "base", "nexus", "esft-token-kd", *grids]) == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(runs) + 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["reference"]["lr"] == 0.009  # the registry's NEXUS lr x 3 (quick): the same runs
    matched = summary["matched_forgetting"]
    assert matched["nexus"]["per_seed"] == {"0": 0.0} and matched["esft-token-kd"]["lrs"] == [0.009, 0.027]
    assert set(summary["lr_brackets"]) == {"nexus", "esft-token-kd"}
    assert "| esft-token-kd | 0.5 |" in (tmp_path / "summary.md").read_text()


def test_esft_moves_only_the_selected_experts(demo_tiny):
    import methods as M
    import torch

    _, model_dir = demo_tiny
    method = M.METHODS["esft-gate"].with_(lr=1e-2)
    cfg = M.train_config(method, str(model_dir), seed=0, steps=3, batch_size=2, seq_len=32, warmup_steps=1)
    inits = M.FixedInits({}, {"gate-1": {0: [1], 1: [3]}})
    built = M.build(method, cfg, inits)
    before = [p.detach().clone() for p, _ in built.masks]
    blocks = torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    M.train(built, M.seeded_batches(blocks, 2, 0))
    M.check_esft_frozen(built)
    for (p, mask), b in zip(built.masks, before):
        assert not torch.equal(p.detach()[mask], b[mask])  # the selected expert did train


def check_teacher_is_the_base(built, model_dir, ids) -> None:
    """After training: only the selected experts moved (if any were unfrozen); inside
    ``adapter_off`` the model computes exactly the base's logits, and on exit the trained
    values are back bit for bit (the student differs from the base)."""
    import methods as M
    import torch

    from nexus.models.loading import load_model

    M.check_esft_frozen(built)
    for (p, mask), original in zip(built.masks, built.originals, strict=True):
        assert not torch.equal(p.detach()[mask], original)  # the selected experts did train
    trained = [p.detach().clone() for p, _ in built.masks]
    with torch.no_grad():
        want = load_model(model_dir)(input_ids=ids).logits
        with built.adapter_off():
            teacher = built.model(input_ids=ids).logits
        student = built.model(input_ids=ids).logits
    assert torch.equal(teacher, want)
    assert all(torch.equal(p.detach(), t) for (p, _), t in zip(built.masks, trained))
    assert not torch.equal(student, want)


def test_distilled_esft_learns_from_its_experts_original_weights(demo_tiny):
    """esft-*-kd's teacher: inside ``adapter_off`` (the trained experts' original weights swapped
    in) the model computes exactly the base's logits, and on exit the trained values are back bit
    for bit. Training with it: KD is exactly 0 at the first step (the student is the base), then
    positive (the teacher is not the student), and only the selected experts move."""
    import methods as M
    import torch

    _, model_dir = demo_tiny
    method = M.get_method("esft-token-kd").with_(lr=1e-2)
    assert method.kd_weight == M.METHODS["nexus"].kd_weight
    cfg = M.train_config(method, str(model_dir), seed=0, steps=3, batch_size=2, seq_len=32, warmup_steps=1)
    built = M.build(method, cfg, M.FixedInits({}, {"frequency-1": {0: [1], 1: [3]}}))
    blocks = torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    records = M.train(built, M.seeded_batches(blocks, 2, 0))
    assert records[0].kd == 0.0
    assert records[1].kd > 0 and records[2].kd > 0
    check_teacher_is_the_base(built, model_dir, blocks[:2])


def test_nexus_with_esft_experts_trains_both_and_its_teacher_is_the_base(demo_tiny):
    """nexus-kd<W>-esft<K>: the shared experts and ESFT-Gate's top-K routed experts train (the
    other experts stay bitwise frozen); the KD teacher (shared experts off, the trained experts'
    original weights swapped in) computes exactly the base's logits, so with a zero-init shared
    expert KD is exactly 0 at the first step."""
    import methods as M
    import torch

    _, model_dir = demo_tiny
    method = M.get_method("nexus-kd1-esft1").with_(lr=1e-2, init="zero", top_k=None)
    assert method.unfreeze == 1 and method.esft_score == "gate"
    cfg = M.train_config(method, str(model_dir), seed=0, steps=3, batch_size=2, seq_len=32, warmup_steps=1)
    built = M.build(method, cfg, M.FixedInits({}, {"gate-1": {0: [1], 1: [3]}}))
    shared = [p for n, p in built.model.named_parameters() if ".mlp.nexus." in n]
    assert shared and built.trainable_params == sum(p.numel() for p in shared) + sum(
        p[0].numel() for p, _ in built.masks
    )
    blocks = torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    records = M.train(built, M.seeded_batches(blocks, 2, 0))
    assert records[0].kd == 0.0 and records[2].kd > 0
    check_teacher_is_the_base(built, model_dir, blocks[:2])


def test_nexus_with_attention_lora_trains_both_and_its_teacher_is_the_base(demo_tiny):
    """nexus-kd<W>-attn<R>: the shared experts and PEFT LoRA on attention train, nothing else;
    the KD teacher (shared experts and LoRA off) computes exactly the base's logits, so with a
    zero-init shared expert KD is exactly 0 at the first step."""
    import methods as M
    import torch

    _, model_dir = demo_tiny
    method = M.get_method("nexus-kd1-attn2").with_(lr=1e-2, init="zero", top_k=None)
    cfg = M.train_config(method, str(model_dir), seed=0, steps=3, batch_size=2, seq_len=32, warmup_steps=1)
    built = M.build(method, cfg)
    names = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert any(".mlp.nexus." in n for n in names) and any("self_attn" in n and "lora_" in n for n in names)
    assert all(".mlp.nexus." in n or ("self_attn" in n and "lora_" in n) for n in names)
    blocks = torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    records = M.train(built, M.seeded_batches(blocks, 2, 0))
    assert records[0].kd == 0.0 and records[2].kd > 0
    check_teacher_is_the_base(built, model_dir, blocks[:2])


@pytest.mark.parametrize(
    ("name", "where"), [("lora-r2-kd", ("self_attn", "experts")), ("lora-attn-r2-kd1", ("self_attn",)),
                        ("lora-experts-r2-kd1", ("experts",))],
)  # fmt: skip
def test_distilled_lora_learns_from_its_base_with_the_adapter_off(demo_tiny, name, where):
    """lora[-attn|-experts]-r<R>-kd's teacher is PEFT's disable_adapter(): at the first step LoRA
    is the identity (B = 0), so KD is exactly 0; once B has moved, the student differs from its
    teacher (a teacher that were the student itself would give 0 at every step). LoRA sits on
    attention, the experts or both, as the name says."""
    import methods as M
    import torch

    _, model_dir = demo_tiny
    method = M.get_method(name)
    cfg = M.train_config(method, str(model_dir), seed=0, steps=3, batch_size=2, seq_len=32, warmup_steps=1)
    built = M.build(method, cfg)
    names = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {w for w in ("self_attn", "experts") if any(w in n for n in names)} == set(where)
    blocks = torch.randint(3, 500, (6, 32), generator=torch.Generator().manual_seed(0))
    records = M.train(built, iter(blocks.split(2)))
    assert records[0].kd == 0.0
    assert records[1].kd > 0 and records[2].kd > 0


@pytest.mark.extended  # the benchmark's smoke run; its training loop = nexus train's is checked below
def test_train_throughput_quick(demo_tiny, ray_cluster, tmp_path):
    corpus_dir, model_dir = demo_tiny
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--quick", "--model", str(model_dir),
         "--corpus-dir", str(corpus_dir), "--work", str(tmp_path / "work"), "--json", str(out),
         "--methods", "nexus-zero", "lora-r2", "--steps", "2", "--warmup", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"nexus-zero", "lora-r2"}
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())
    assert rows["nexus-zero"]["trainable_params"] > rows["lora-r2"]["trainable_params"] > 0


def test_gpu_scale_tiny_prints_one_json_line():
    """The GPU benchmark's code path (packed MXFP4 experts built on the meta device, nexus
    train's step, the decode profile, collection, the plan's prediction) on a tiny shape."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "--tiny", "--steps", "2", "--warmup", "1",
         "--collect-batches", "1", "--seq-len", "64"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout + proc.stderr[-2000:]
    out = json.loads(lines[0])
    assert proc.returncode == 0 and "error" not in out, out
    assert (
        out["experts"] == "packed"
        and out["gradient_checkpointing"] is True
        and set(out["shapes"]) == {"tiny"}
    )
    tiny = out["shapes"]["tiny"]
    assert "error" not in tiny and "warning" not in tiny, tiny
    assert (
        tiny["train_tokens_per_s"] > 0
        and tiny["collect_tokens_per_s"] > 0
        and tiny["train_flops_per_token"] > 0
    )
    # 2 layers x 4 experts x (gate_up [128, 2, 16] + down [64, 2, 16] blocks, and their scales)
    assert tiny["packed_expert_bytes"] == 2 * 4 * (128 * 2 * 17 + 64 * 2 * 17) + 2 * 4 * (128 + 64) * 2
    # every routed expert decoded at least in the teacher pass, student pass and backward
    assert tiny["decode_calls"] >= 3 * 2 * 2 * 4 and 0 < tiny["decode_share"] < 1
    assert tiny["plan"]["train"]["peak_gb"] > 0 and tiny["plan"]["train"]["fits"] is True


def test_packed_experts_benchmark_tiny(tmp_path):
    """The packed-vs-dequantised benchmark (issue 13's numbers) end to end on a tiny
    GPT-OSS-shaped MXFP4 checkpoint: both training children, the profile split, the full load."""
    out = tmp_path / "packed.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "packed_experts.py"), "--layers", "1", "--full-layers", "2",
         "--hidden", "64", "--experts", "4", "--vocab", "256", "--batch-size", "2", "--seq-len", "16",
         "--steps", "1", "--threads", "1", "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    packed, dense = result["train-packed"], result["train-dequantized"]
    # the same model either way: bf16 losses differ only by the experts' matmul grouping
    assert packed["ce"] == pytest.approx(dense["ce"], rel=1e-3)
    assert packed["profile"]["decode_s"] > 0 and dense["profile"]["decode_s"] == 0
    assert result["peak_ratio"] == packed["peak_rss_gb"] / dense["peak_rss_gb"]
    full = result["load-packed-full"]
    assert full["resident_tensor_gb"] > 0 and full["experts_on_disk_gb"] > 0
    assert set(result["targets_met"]) == {
        "peak_ratio<=0.45",
        "speed_ratio>=0.35",
        "full_load_peak<=1.2x_resident",
    }
    assert not list(tmp_path.glob("nexus-packed-bench-*"))  # the checkpoint is removed afterwards


def test_benchmark_loop_reproduces_nexus_train(demo_tiny, ray_cluster, tmp_path):
    """The benchmarks' in-process loop computes what `nexus train` (Ray Train) computes, step for step."""
    import methods as M
    import torch

    from nexus.stages import train
    from nexus.stages.evaluate import packed_blocks
    from nexus.stages.train import TrainConfig

    corpus_dir, model_dir = demo_tiny
    corpus = str(corpus_dir / "domain.parquet")
    common = dict(seq_len=32, batch_size=2, warmup_steps=1)
    cfg = TrainConfig(model=str(model_dir), corpus=[corpus], output=str(tmp_path / "run"), max_steps=4,
                      lr=3e-3, init="random", kd_weight=0.5, seed=0, checkpoint_every=100, **common)  # fmt: skip
    train.run(cfg)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in logged if "loss" in m]

    method = M.Method("nexus-random", "nexus", lr=3e-3, init="random", top_k=None, kd_weight=0.5)
    built = M.build(method, M.train_config(method, str(model_dir), seed=0, steps=4, **common))
    blocks = packed_blocks([corpus], str(model_dir), 32)  # nexus train's blocks, in its order
    torch.set_num_threads(1)
    records = M.train(built, iter(blocks.split(2)))
    assert [r.step for r in records] == [m["step"] for m in logged]
    for rec, m in zip(records, logged):
        assert rec.loss == pytest.approx(m["loss"], rel=1e-4)
        assert rec.kd == pytest.approx(m["kd"], rel=1e-3, abs=1e-6)
        assert rec.lr == pytest.approx(m["lr"])

    # offline KD with the whole vocabulary stored trains like online KD (fp32 rounding of the
    # two KL formulas apart); the rows are found by block, whatever the batch order
    vocab = built.model.config.vocab_size
    teacher = M.TeacherTable.make(model_dir, blocks[:8], vocab, tmp_path / "teacher.safetensors")
    offline = M.get_method(f"nexus-offline-k{vocab}").with_(lr=3e-3, init="random", top_k=None)
    cfg_off = M.train_config(offline, str(model_dir), seed=0, steps=4, **common)
    got = M.train(M.build(offline, cfg_off, teacher=teacher), iter(blocks[:8].split(2)))
    for a, b in zip(got, records):
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.kd == pytest.approx(b.kd, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_memory_lean_kd_equals_the_textbook_losses(tiny_model_dir, temperature):
    """The chunked CE + KD (lean on memory, for the throughput target) is plain CE + T^2 KL."""
    import torch
    import torch.nn.functional as F

    import nexus
    from nexus.stages.train.losses import chunked_lm_losses, lm_logits

    model = nexus.load_model(tiny_model_dir)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher = model.base_model(input_ids=ids).last_hidden_state
    noise = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for lean in (True, False):
        student = (teacher + 0.3 * noise).requires_grad_(True)
        if lean:
            parts = chunked_lm_losses(model, student, ids, teacher, temperature=temperature, chunk_size=5)
            ce, kd = parts.ce_sum, parts.kd_sum
        else:
            s, t = lm_logits(model, student[:, :-1]), lm_logits(model, teacher[:, :-1])
            ce = F.cross_entropy(s.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
            kd = (log_t.exp() * (log_t - log_s)).sum() * temperature**2
        (ce + kd).backward()
        results.append((ce.detach(), kd.detach(), student.grad))
    (ce1, kd1, g1), (ce2, kd2, g2) = results
    torch.testing.assert_close(ce1, ce2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd1, kd2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
