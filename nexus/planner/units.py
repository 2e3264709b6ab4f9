"""Sizes and dtypes: bytes of ``80GB`` or ``79GiB``, and how plans print them."""

from __future__ import annotations

import re

from nexus.errors import NexusError

GB = 10**9
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
CANONICAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_SIZE_UNITS = {
    "": GB,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | float | int, what: str = "memory size") -> int:
    """Bytes of ``80GB``, ``79.1GiB``, ``512 MB`` or a bare number of GB (decimal GB, as GPU
    vendors and the rest of NEXUS count them)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise NexusError(f"bad {what} '{text}'; give a number with a unit, e.g. 80GB, 79GiB or 512MB")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not value > 0:
        raise NexusError(f"bad {what} '{text}'; it must be more than zero")
    return int(value * _SIZE_UNITS[unit])


def gb(n: float) -> float:
    return round(n / GB, 3)


def gb_text(n: float) -> str:
    """``88.7 GB``, or ``31.4 MB`` below 1 GB (small models should not read ``0.0 GB``)."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 10**6:.1f} MB"


def count_text(n: int) -> str:
    """``116.8B``, ``597M``, ``9,473``: parameter counts as people say them."""
    if n >= 10**9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M" if n >= 10**7 else f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n:,}"
