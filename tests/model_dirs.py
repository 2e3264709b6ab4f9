"""Tiny model directories on disk (config, safetensors, tokenizer), as users hand them to NEXUS."""

from __future__ import annotations

from pathlib import Path

from tiny_models import tiny_model

TOKENIZER_VOCAB = 320


def sample_texts(n: int = 200) -> list[str]:
    """Deterministic text from the standard library's own sources (always present)."""
    import json as _json

    src = Path(_json.__file__).parent
    texts: list[str] = []
    for f in sorted(src.glob("*.py")):
        texts.extend(p.strip() for p in f.read_text().split("\n\n") if p.strip())
    return texts[:n]


def write_tokenizer(out: Path, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """A byte-level BPE tokenizer trained on a little stdlib text, loadable by AutoTokenizer."""
    from nexus.demo.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(sample_texts(), vocab_size), out)


def write_tiny_model_dir(out: Path, family: str = "gpt_oss", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of ``family`` with a tokenizer into ``out``."""
    model = tiny_model(family, seed=seed, vocab_size=TOKENIZER_VOCAB, **overrides)
    model.save_pretrained(str(out))
    write_tokenizer(out)
    return out
