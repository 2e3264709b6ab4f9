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


def _raw_bytes_of_predicted_tokens(blocks, tok) -> int:
    """Bytes of the predicted tokens straight from the byte-level BPE alphabet (each token is a
    string of byte symbols), not by decoding; one byte per end-of-text separator."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    total = 0
    for block in blocks.tolist():
        for t in block[1:]:  # the first token of a block is not predicted
            symbols = tok.convert_ids_to_tokens(t)
            assert t == tok.eos_token_id or all(c in byte_of for c in symbols)
            total += 1 if t == tok.eos_token_id else len(symbols)
    return total


def test_bits_per_byte_counts_the_bytes_of_the_predicted_text(ray_cluster, tiny_model_dir, tmp_path):
    """Bits-per-byte against a direct computation: the predicted tokens' raw bytes from the
    byte-level alphabet, one byte per separator, and the model's own summed NLL."""
    from nexus.models.loading import load_tokenizer
    from nexus.stages.evaluate import packed_blocks, predicted_bytes

    tok = load_tokenizer(tiny_model_dir)
    ascii_texts = [t for t in sample_texts(60) if t.isascii()][:30]
    corpora = {"ascii": ascii_texts, "unicode": [t + " — café, naïve, 日本語 → ok" for t in ascii_texts]}
    blocks = {}
    for name, texts in corpora.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        blocks[name] = packed_blocks([str(tmp_path / f"{name}.jsonl")], str(tiny_model_dir), seq_len=32)
    expected = {name: _raw_bytes_of_predicted_tokens(b, tok) for name, b in blocks.items()}
    assert expected["ascii"] > blocks["ascii"].shape[0] * 31  # many tokens hold several bytes

    # ASCII: exact; split multi-byte characters at block ends: over by at most 8 bytes a block
    assert predicted_bytes(blocks["ascii"], tok) == expected["ascii"]
    got = predicted_bytes(blocks["unicode"], tok)
    assert expected["unicode"] <= got <= expected["unicode"] + 8 * len(blocks["unicode"])

    model = nexus.load_model(tiny_model_dir)
    res = evaluate.run(
        model=tiny_model_dir, corpus={"ascii": [str(tmp_path / "ascii.jsonl")]}, seq_len=32, generate_tokens=1
    )
    row = res["corpora"]["ascii"]
    with torch.no_grad():
        nll = sum(model(b[None], labels=b[None]).loss.item() * 31 for b in blocks["ascii"])
    assert row["bytes"] == expected["ascii"] and row["tokens"] == blocks["ascii"].shape[0] * 31
    # float32 losses summed in another order: equal to ~1e-6 relative
    assert math.isclose(row["base_bpb"], nll / (math.log(2) * expected["ascii"]), rel_tol=1e-5)
    assert math.isclose(row["base_ppl"], math.exp(nll / row["tokens"]), rel_tol=1e-5)
