"""The demo tokenizer: a byte-level BPE (``tokenizers``) that ``AutoTokenizer`` loads back.

Special tokens have fixed ids: ``<|pad|>`` 0, ``<|bos|>`` 1, ``<|eos|>`` 2. Every byte is in
the alphabet, so any text encodes without unknown tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
#: 256 byte symbols plus the special tokens
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, model_max_length: int = 4096
):
    """Train a byte-level BPE with at most ``vocab_size`` tokens on ``texts``.

    Returns a ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos set. Training is
    deterministic for the same texts.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB} (bytes and special tokens), got {vocab_size}"
        )
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=model_max_length,
    )
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def save_tokenizer(tok, out: str | os.PathLike) -> Path:
    """Save so that ``AutoTokenizer.from_pretrained(out)`` loads it (tokenizer.json + config)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out
