"""``nexus evaluate``'s numbers against a direct computation with the model's own loss.

On the same packed blocks ``nexus evaluate`` reads (``packed_blocks``, the training data's packing),
perplexity is exp of the mean next-token cross-entropy that transformers computes with
``model(input_ids, labels=input_ids)``, over N x (S - 1) predicted tokens: for the base model,
and for a fresh model with the adapter loaded.
"""

from __future__ import annotations

import json
import math

import torch
from model_dirs import sample_texts

import nexus
from nexus.stages import evaluate
from nexus.stages.evaluate import packed_blocks


def _model_ppl(model, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(blocks, labels=blocks).loss.item())


def test_evaluate_equals_the_models_own_loss_on_the_same_blocks(ray_cluster, tiny_model_dir, tmp_path):
    texts = sample_texts(200)
    (tmp_path / "domain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:80]))
    (tmp_path / "general.txt").write_text("\n".join(t.replace("\n", " ") for t in texts[80:]))
    corpora = {"domain": [str(tmp_path / "domain.jsonl")], "general": [str(tmp_path / "general.txt")]}
    model = nexus.load_model(tiny_model_dir)
    nexus.attach_shared_experts(model, init="random", gate_init=30.0, seed=4)  # a visible change
    nexus.save_adapter(model, tmp_path / "adapter")

    res = evaluate.run(
        model=tiny_model_dir,
        adapter=tmp_path / "adapter",
        corpus=corpora,
        seq_len=32,
        max_tokens=640,
        generate_tokens=2,
    )

    base = nexus.load_model(tiny_model_dir)
    specialised = nexus.load_model(tiny_model_dir)
    nexus.load_adapter(specialised, tmp_path / "adapter")
    for name, paths in corpora.items():
        blocks = packed_blocks(paths, str(tiny_model_dir), 32, 640)
        assert blocks.shape == (640 // 32, 32)
        row = res["corpora"][name]
        assert row["tokens"] == 20 * 31
        want_base, want_spec = _model_ppl(base, blocks), _model_ppl(specialised, blocks)
        # chunked float32 sums (evaluate) vs one mean over 620 tokens (transformers): ~1e-6 relative
        assert math.isclose(row["base_ppl"], want_base, rel_tol=1e-5), (name, row, want_base)
        assert math.isclose(row["specialised_ppl"], want_spec, rel_tol=1e-5), (name, row, want_spec)
        assert abs(want_spec / want_base - 1) > 1e-3  # the adapter changes the model visibly
        assert math.isclose(row["change_pct"], 100 * (want_spec / want_base - 1), rel_tol=1e-4, abs_tol=1e-6)
