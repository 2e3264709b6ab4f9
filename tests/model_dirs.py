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
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sample_texts(),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    tok.save_pretrained(str(out))


def write_tiny_model_dir(out: Path, family: str = "gpt_oss", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of ``family`` with a tokenizer into ``out``."""
    model = tiny_model(family, seed=seed, vocab_size=TOKENIZER_VOCAB, **overrides)
    model.save_pretrained(str(out))
    write_tokenizer(out)
    return out
