"""Packing documents into fixed-length token blocks, for training, evaluation and the demo.

Documents are joined into one stream with an end-of-text token after each and cut into
blocks of ``seq_len`` tokens; the tail that does not fill a block is dropped. ``nexus train``
packs each Ray Data batch of documents this way, ``nexus evaluate`` reads the same blocks, and
the demo base model is pretrained on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def join_documents(docs: Iterable[Sequence[int]], eos_id: int, dtype=np.int64) -> np.ndarray:
    """One token stream: every document followed by ``eos_id``."""
    pieces = []
    eos = np.asarray([eos_id], dtype=dtype)
    for doc in docs:
        pieces.append(np.asarray(doc, dtype=dtype))
        pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def pack_blocks(stream: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """``[N, seq_len]`` blocks cut from ``stream`` (at most ``max_tokens`` worth, at least one block
    if the stream has one); the remainder is dropped, so N may be 0."""
    if max_tokens is not None:
        stream = stream[: max(seq_len, (max_tokens // seq_len) * seq_len)]
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)
