"""The built-in demo: stdlib corpus, tokenizer, tiny GPT-OSS demo model, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nexus.demo import corpus as corpus_mod


def test_split_docstrings_moves_prose_out_of_code():
    source = (
        '"""Module doc."""\n'
        "import os\n\n"
        "class A:\n"
        '    """Only a docstring."""\n\n'
        "def f(x):\n"
        "    '''Return x.\n\n        Twice.\n    '''\n"
        "    # a comment stays\n"
        "    return x\n\n"
        'def g(): "same line stays"; return 1\n'
    )
    code, docs = corpus_mod.split_docstrings(source)
    assert docs == ["Module doc.", "Only a docstring.", "Return x.\n\nTwice."]
    assert "Module doc" not in code and "Return x" not in code and "Only a" not in code
    assert "class A:\n    pass\n" in code
    assert "# a comment stays" in code and "same line stays" in code
    compile(code, "<demo>", "exec")


def test_chunk_respects_limit_and_keeps_text():
    text = "\n\n".join(f"para {i} " + "x" * (i * 37 % 300) for i in range(200))
    pieces = corpus_mod.chunk(text, max_chars=500)
    assert all(0 < len(p) <= 500 for p in pieces)
    assert "\n\n".join(pieces) == text
    long_line = "y" * 1300
    assert "".join(corpus_mod.chunk(long_line, max_chars=500)) == long_line


def test_demo_corpus_cli(demo_tiny, tmp_path):
    import pyarrow.parquet as pq

    from nexus.cli import main

    corpus_dir, _ = demo_tiny
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert manifest["format"] == corpus_mod.FORMAT
    sources = {}
    for split in corpus_mod.SPLITS:
        rows = [json.loads(line) for line in (corpus_dir / f"{split}.jsonl").read_text().splitlines()]
        table = pq.read_table(corpus_dir / f"{split}.parquet")
        assert table.column("text").to_pylist() == [r["text"] for r in rows]
        assert rows and manifest["splits"][split]["rows"] == len(rows)
        sources[split] = {r["source"] for r in rows}
        kinds = {r["kind"] for r in rows}
        assert kinds == ({"code"} if split.startswith("general") else {"docstring", "reference"})
    # held-out modules and topics never reach the training splits
    assert not sources["general"] & sources["general_heldout"]
    assert not sources["domain"] & sources["domain_heldout"]
    assert not sources["general"] & sources["domain_heldout"]
    # deterministic: gathering again (not from the in-process memo) gives the recorded hash
    corpus_mod._GATHERED.clear()
    assert corpus_mod.gather_corpus().sha256 == manifest["content_sha256"]
    # existing output is refused with a one-line error unless --overwrite
    assert main(["demo-corpus", "--output", str(corpus_dir)]) == 2


def test_tiny_model_loads_with_stock_transformers_and_generates(demo_tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model_dir = demo_tiny
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    assert type(model).__name__ == "GptOssForCausalLM"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= model.config.vocab_size
    inputs = tok("def main(", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0]), str)

    meta = json.loads((model_dir / "demo_metadata.json").read_text())
    assert meta["size"] == "tiny" and meta["seed"] == 0
    assert meta["training"]["tokens"] > 0 and meta["training"]["seconds"] > 0
    for split in ("general", "domain"):
        res = meta["heldout"][split]
        assert res["perplexity"] > 1 and res["unigram_perplexity"] > 1
        assert len(res["router"]) == model.config.num_hidden_layers
        for layer in res["router"]:
            assert 0 <= layer["entropy"] <= layer["log_num_experts"] + 1e-6
            assert len(layer["expert_shares"]) == model.config.num_local_experts
            assert sum(layer["expert_shares"]) == pytest.approx(1.0, abs=1e-4)
    # it learned something: better than the unigram model on held-out general text
    assert meta["heldout"]["general"]["perplexity"] < meta["heldout"]["general"]["unigram_perplexity"]


def test_nexus_finds_the_demo_moe_layers(demo_tiny):
    import nexus
    from nexus.models import find_moe_blocks

    _, model_dir = demo_tiny
    model = nexus.load_model(model_dir)
    blocks = find_moe_blocks(model)
    assert [b.layer for b in blocks] == list(range(model.config.num_hidden_layers))
    assert nexus.load_tokenizer(model_dir).eos_token == "<|eos|>"


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_ensure_demo_builds_identical_weights_and_reuses_cache(
    demo_tiny, demo_tiny_mxfp4, tmp_path, monkeypatch
):
    import nexus.demo.pretrain as pretrain
    from nexus.demo import ensure_demo
    from nexus.weights import mxfp4

    corpus_dir, model_dir = demo_tiny
    c_dir, m_dir = ensure_demo("tiny", cache_dir=tmp_path, progress=False)
    # a second build with the same seed (other route: Python API, corpus gathered in memory)
    # gives bit-identical weights and the same tokenizer
    a, b = _state(model_dir), _state(m_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (model_dir / "tokenizer.json").read_text() == (m_dir / "tokenizer.json").read_text()
    assert (c_dir / "general.jsonl").read_bytes() == (corpus_dir / "general.jsonl").read_bytes()

    # cached: a second call reuses both directories without building
    def boom(*args, **kwargs):
        raise AssertionError("rebuilt a cached demo model")

    monkeypatch.setattr(pretrain, "build_demo_model", boom)
    assert ensure_demo("tiny", cache_dir=tmp_path, progress=False) == (c_dir, m_dir)
    # a different seed is a different model
    meta = json.loads((m_dir / "demo_metadata.json").read_text())
    assert meta["build_key"] != pretrain.build_key(meta["corpus_sha256"], "tiny", 1)

    # the MXFP4 variant: the cached base quantised (not rebuilt, not retrained) into a directory
    # of its own, the same checkpoint `nexus demo-model --mxfp4` writes
    _, q_dir = ensure_demo("tiny", cache_dir=tmp_path, progress=False, format="mxfp4")
    assert q_dir != m_dir and q_dir.parent == m_dir.parent
    ours, cli, base = _state(q_dir), _state(demo_tiny_mxfp4), _state(m_dir)
    assert ours.keys() == cli.keys() and all(torch.equal(ours[k], cli[k]) for k in ours)
    for key, live in base.items():  # experts: MXFP4 of the trained weights; the rest: bf16 of them
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.encode(live.transpose(1, 2))
            assert torch.equal(ours[f"{key}_blocks"], blocks) and torch.equal(ours[f"{key}_scales"], scales)
            assert key not in ours
        else:
            assert torch.equal(ours[key], live.to(torch.bfloat16)), key
    config = json.loads((q_dir / "config.json").read_text())
    assert config["quantization_config"] == mxfp4.GPT_OSS_QUANTIZATION_CONFIG
    q_meta = json.loads((q_dir / "demo_metadata.json").read_text())
    assert q_meta["experts_format"] == "mxfp4" and q_meta["quantized_from"]["model"] == m_dir.name
    assert q_meta["summary"]["float32_general_perplexity"] == meta["summary"]["general_perplexity"]
    monkeypatch.setattr(pretrain, "write_mxfp4_demo", boom)
    assert ensure_demo("tiny", cache_dir=tmp_path, progress=False, format="mxfp4")[1] == q_dir


def test_demo_model_cli_errors(tmp_path, capsys):
    from nexus.cli import main

    assert (
        main(["demo-model", "--size", "tiny", "--output", str(tmp_path / "m"), "--corpus", str(tmp_path)])
        == 2
    )
    assert "demo corpus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo-model", "--size", "huge", "--output", str(tmp_path / "m")])
