"""Stage 6: perplexity of base vs specialised, with token counts, plots and generations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from model_dirs import sample_texts

import nexus
from nexus.stages import evaluate
from nexus.stages.evaluate import format_table, parse_corpora, perplexity


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    texts = sample_texts(200)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:80]))
    (d / "b.txt").write_text("\n".join(t.replace("\n", " ") for t in texts[80:]))
    return d


def test_perplexity_is_exp_of_the_models_own_mean_loss(tiny_model_dir):
    model = nexus.load_model(tiny_model_dir)
    blocks = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    ppl, n = perplexity(model, blocks, batch_size=2)
    assert n == 3 * 15
    with torch.no_grad():
        loss = model(blocks, labels=blocks).loss
    assert math.isclose(ppl, math.exp(loss.item()), rel_tol=1e-5)


def test_evaluate_base_and_adapter(ray_cluster, tiny_model_dir, corpora, tmp_path):
    model = nexus.load_model(tiny_model_dir)
    nexus.attach_shared_experts(model, init="random")
    nexus.save_adapter(model, tmp_path / "adapter")
    spec = parse_corpora([f"domain={corpora / 'a.jsonl'}", f"general={corpora / 'b.txt'}"])
    res = evaluate.run(
        model=tiny_model_dir,
        adapter=tmp_path / "adapter",
        corpus=spec,
        output=tmp_path / "eval",
        seq_len=32,
        max_tokens=640,
        generate_tokens=5,
    )
    for name in ("domain", "general"):
        row = res["corpora"][name]
        assert row["tokens"] > 0 and row["base_ppl"] > 1 and row["specialised_ppl"] != row["base_ppl"]
    assert len(res["generations"]) == 3 and all("specialised" in g for g in res["generations"])
    assert (tmp_path / "eval" / "perplexity.png").stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["corpora"].keys() == {
        "domain",
        "general",
    }
    assert "| domain |" in format_table(res)
    # the base-only evaluation gives the same base numbers
    base_only = evaluate.run(
        model=tiny_model_dir, adapter=None, corpus=spec, seq_len=32, max_tokens=640, generate_tokens=5
    )
    assert base_only["corpora"]["domain"]["base_ppl"] == res["corpora"]["domain"]["base_ppl"]


def test_bad_corpus_specs():
    assert parse_corpora(["x/held.jsonl"]) == {"held": ["x/held.jsonl"]}
    with pytest.raises(nexus.NexusError, match="NAME=PATH"):
        parse_corpora(["=path"])
