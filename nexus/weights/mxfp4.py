"""MXFP4 (OCP microscaling FP4) decoding and encoding for GPT-OSS expert tensors.

GPT-OSS checkpoints store each expert matrix ``W`` of shape ``[out, in]`` as

- ``*_blocks``: uint8 ``[..., out, in/32, 16]``, two FP4 (E2M1) codes per byte, low nibble
  first, so byte ``j`` of a block holds elements ``2j`` (low) and ``2j+1`` (high);
- ``*_scales``: uint8 ``[..., out, in/32]``, one E8M0 exponent per 32 elements: the block is
  multiplied by ``2**(scale - 127)``.

:func:`decode` reproduces transformers' ``Mxfp4Config(dequantize=True)`` exactly (same
lookup table, same ``ldexp``), but works on any leading shape and in row chunks, so one
expert can be decoded with a few MB of temporaries; it returns ``[..., out, in]`` (the
``nn.Linear`` orientation), whereas transformers transposes to its fused ``[E, in, out]``.
"""

from __future__ import annotations

import torch

#: FP4 E2M1 code -> value (codes 8..15 are the negatives of 0..7)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
SCALE_BIAS = 127
#: rows of 32 elements decoded per step; bounds the int/float temporaries to a few MB
_ROWS_PER_CHUNK = 1 << 16


def check_shapes(blocks_shape, scales_shape) -> None:
    """Raise ``ValueError`` unless ``blocks``/``scales`` shapes form a valid MXFP4 pair."""
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    if len(blocks_shape) < 2 or blocks_shape[-1] != BLOCK // 2 or blocks_shape[:-1] != scales_shape:
        raise ValueError(
            f"MXFP4 blocks {list(blocks_shape)} and scales {list(scales_shape)} do not match "
            f"(expected blocks [..., G, {BLOCK // 2}] and scales [..., G])"
        )


def decode(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantise MXFP4 ``blocks`` [..., G, 16] and ``scales`` [..., G] to ``[..., G * 32]``."""
    check_shapes(blocks.shape, scales.shape)
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    *lead, groups, half = blocks.shape
    if out is None:
        out = torch.empty(*lead, groups * BLOCK, dtype=dtype, device=blocks.device)
    elif tuple(out.shape) != (*lead, groups * BLOCK) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {[*lead, groups * BLOCK]}")
    # byte -> (value of low nibble, value of high nibble): one gather decodes both
    codes = torch.arange(256)
    pairs = torch.tensor(FP4_VALUES, dtype=out.dtype, device=blocks.device)[
        torch.stack([codes & 15, codes >> 4], -1)
    ]
    rows = blocks.reshape(-1, half)  # one row per 32-element block
    exps = scales.reshape(-1, 1)
    flat = out.view(-1, BLOCK)
    for r0 in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        r1 = min(r0 + _ROWS_PER_CHUNK, rows.shape[0])
        sub = flat[r0:r1]
        torch.index_select(pairs, 0, rows[r0:r1].reshape(-1).to(torch.int32), out=sub.view(-1, 2))
        # == torch.ldexp(sub, e, out=sub), which is mul(sub, pow(2, e)); one pow per block, not per element
        sub.mul_(torch.pow(2.0, exps[r0:r1].to(torch.int32) - SCALE_BIAS))
    return out


def encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``weight`` [..., in] (``in`` a multiple of 32) to MXFP4 (blocks, scales).

    Round-to-nearest onto the FP4 grid with a per-block power-of-two scale chosen so the
    block's largest magnitude fits in 6.0; ``decode(*encode(w))`` is the MXFP4 rounding of
    ``w``. Used to write test and benchmark checkpoints shaped like the real ones.
    """
    w = weight.detach().to(torch.float32)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {BLOCK}")
    *lead, n = w.shape
    g = w.reshape(*lead, n // BLOCK, BLOCK)
    amax = g.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 127)
    scaled = g / torch.exp2(exp).unsqueeze(-1)
    grid = torch.tensor(FP4_VALUES[:8], dtype=torch.float32)
    mag = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(-1)
    codes = (mag | ((scaled < 0) & (mag > 0)).to(torch.int64) << 3).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exp + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
