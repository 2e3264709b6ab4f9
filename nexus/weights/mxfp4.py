"""MXFP4 (OCP microscaling FP4) decoding and encoding for GPT-OSS expert tensors.

GPT-OSS checkpoints store each expert matrix ``W`` of shape ``[out, in]`` as

- ``*_blocks``: uint8 ``[..., out, in/32, 16]``, two FP4 (E2M1) codes per byte, low nibble
  first, so byte ``j`` of a block holds elements ``2j`` (low) and ``2j+1`` (high);
- ``*_scales``: uint8 ``[..., out, in/32]``, one E8M0 exponent per 32 elements: the block is
  multiplied by ``2**(scale - 127)``.

:func:`decode` reproduces transformers' ``Mxfp4Config(dequantize=True)`` bit for bit, but works
on any leading shape and in row chunks, so one expert can be decoded with a few MB of
temporaries; it returns ``[..., out, in]`` (the ``nn.Linear`` orientation), whereas
transformers transposes to its fused ``[E, in, out]``.

Speed matters: packed experts (:mod:`nexus.weights.packed`) decode every routed expert on every
forward and backward pass. A byte and its block's scale byte determine both decoded values
completely, so :func:`decode_table` tabulates all 256 x 256 (scale, byte) pairs once per
dtype and device, computed with transformers' own formula (FP4 value times ``2**(scale -
127)``, rounded into the dtype), and decoding becomes one gather of a pair of values per byte
(read as one 4- or 8-byte word), with no per-element arithmetic. Being a table of the
reference formula over every possible input, it is bit-identical by construction.
"""

from __future__ import annotations

import torch

#: FP4 E2M1 code -> value (codes 8..15 are the negatives of 0..7)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
SCALE_BIAS = 127
#: rows of 32 elements decoded per step: on a CPU the int32 index (64 B per row) stays in
#: cache; on an accelerator, large steps keep the kernel launches few
_ROWS_PER_CHUNK = 1 << 14
_ROWS_PER_CHUNK_DEVICE = 1 << 20


def check_shapes(blocks_shape, scales_shape) -> None:
    """Raise ``ValueError`` unless ``blocks``/``scales`` shapes form a valid MXFP4 pair."""
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    if len(blocks_shape) < 2 or blocks_shape[-1] != BLOCK // 2 or blocks_shape[:-1] != scales_shape:
        raise ValueError(
            f"MXFP4 blocks {list(blocks_shape)} and scales {list(scales_shape)} do not match "
            f"(expected blocks [..., G, {BLOCK // 2}] and scales [..., G])"
        )


def _reference_decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' formula, element by element: the FP4 value in ``dtype``, then
    ``torch.ldexp`` by ``scale - 127`` into ``dtype``; only used to fill :func:`decode_table`."""
    fp4 = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    codes = blocks.to(torch.int64)
    pairs = torch.stack([fp4[codes & 15], fp4[codes >> 4]], -1).flatten(-2)
    return torch.ldexp(pairs, scales.to(torch.int32).unsqueeze(-1) - SCALE_BIAS, out=pairs)


#: word type holding a (low, high) pair of decoded values, by element size
_PAIR_WORD = {2: torch.int32, 4: torch.int64}
_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def decode_table(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 65536 decoded (low, high) pairs indexed by ``scale << 8 | byte``, as one word each.

    Cached per (dtype, device): 256 KB for 2-byte dtypes, 512 KB for 4-byte ones.
    """
    device = torch.device(device)
    key = (dtype, device)
    table = _TABLES.get(key)
    if table is None:
        if torch.empty((), dtype=dtype).element_size() not in _PAIR_WORD:
            raise ValueError(f"MXFP4 decoding supports 2- and 4-byte float dtypes, not {dtype}")
        with torch.inference_mode(False):  # usable inside and outside inference mode
            byte = torch.arange(256, dtype=torch.uint8, device=device).view(1, 1, 256)
            scale = torch.arange(256, dtype=torch.uint8, device=device).view(256, 1)
            pairs = _reference_decode(byte.expand(256, 1, 256), scale, dtype)  # [256 scales, 512]
            word = _PAIR_WORD[pairs.element_size()]
            table = pairs.reshape(65536, 2).contiguous().view(word).reshape(65536)
        _TABLES[key] = table
    return table


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
    table = decode_table(out.dtype, out.device)
    rows = blocks.reshape(-1, half)  # one row per 32-element block
    exps = scales.reshape(-1, 1)
    words = out.view(table.dtype).view(-1, half)  # one word per byte: its (low, high) pair
    step = _ROWS_PER_CHUNK if blocks.device.type == "cpu" else _ROWS_PER_CHUNK_DEVICE
    for r0 in range(0, rows.shape[0], step):
        r1 = min(r0 + step, rows.shape[0])
        index = rows[r0:r1].to(torch.int32)
        index.add_(exps[r0:r1].to(torch.int32) << 8)
        torch.index_select(table, 0, index.view(-1), out=words[r0:r1].view(-1))
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


# -- GPT-OSS checkpoints as published ---------------------------------------------------------

#: ``quantization_config`` of the published GPT-OSS checkpoints (config.json)
GPT_OSS_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
_FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def save_gpt_oss_mxfp4(
    model, out, *, max_shard_size: str | int | None = None, dtype: torch.dtype = torch.bfloat16
):
    """Save a dense GPT-OSS model (transformers' ``GptOssForCausalLM``) the way the published
    GPT-OSS checkpoints are stored: experts as MXFP4 ``mlp.experts.{gate_up,down}_proj_blocks``
    [E, out, in/32, 16] and ``_scales`` [E, out, in/32] (uint8, ``nn.Linear`` orientation), every
    other tensor (expert biases included) in ``dtype``, and ``quantization_config`` in
    config.json. Sharded like ``save_pretrained`` (with an index) when ``max_shard_size`` says so.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    out = Path(out)
    model.save_pretrained(str(out), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    shard_of: dict[str, str] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors = {}
        for key, value in load_file(str(file)).items():
            if key.endswith(_FUSED_EXPERTS):  # live [E, in, out]
                blocks, scales = encode(value.transpose(1, 2))
                tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
            else:
                tensors[key] = value.to(dtype) if value.is_floating_point() else value
        shard_of.update(dict.fromkeys(tensors, file.name))
        save_file(tensors, str(file), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(shard_of.items()))
        index.write_text(json.dumps(data, indent=2))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = GPT_OSS_QUANTIZATION_CONFIG
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
