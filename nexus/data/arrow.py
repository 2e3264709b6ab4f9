"""Arrow helpers shared by the stages that read token lists from Ray Data blocks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def list_column(table: pa.Table, name: str, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """A ``list<int>`` column as ``(values, offsets)``: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``.

    Zero-copy where Arrow allows; ``offsets`` start at 0 even for a sliced column.
    """
    col = table.column(name)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ChunkedArray):  # a column without chunks
        return np.zeros(0, dtype=dtype), np.zeros(1, dtype=np.int64)
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = np.asarray(arr.values, dtype=dtype)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def list_rows(table: pa.Table, name: str, dtype=np.int64) -> list[np.ndarray]:
    """A ``list<int>`` column as one array per row (views into one buffer)."""
    values, offsets = list_column(table, name, dtype)
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
