"""Reading single experts straight from a model's safetensors files, without loading the model.

The conversion stage needs a handful of experts per layer; loading the model would need
all of them (GPT-OSS-120B: ~250 GB dequantised). Here a checkpoint directory is opened
through ``model.safetensors.index.json`` (or its lone / several ``*.safetensors`` files),
every header is checked up front (missing shards, truncated or corrupted files, keys the
index promises but the shard lacks), and one expert at a time is read with
``safe_open(...).get_slice(key)[e]``, which touches only that expert's bytes.

Checkpoints store experts in one of four layouts, resolved per layer by looking at the keys
(not by trusting the family alone, since transformers 5 writes many families back in the
legacy per-expert form and hub checkpoints come in both):

- ``fused``: ``...experts.gate_up_proj`` / ``...experts.down_proj`` [E, ...] (+ ``_bias``),
  exactly the live model's tensors (GPT-OSS bf16, Llama4: transposed; GPT-OSS interleaved);
- ``mxfp4``: ``...experts.gate_up_proj_blocks`` / ``_scales`` (GPT-OSS as released),
  decoded per expert by :mod:`nexus.weights.mxfp4`;
- ``granite``: ``...input_linear.weight`` / ``...output_linear.weight`` [E, out, in];
- ``per_expert``: ``...experts.{e}.{gate_proj|w1}.weight`` and friends, one tensor per
  expert and projection, which transformers merges on load (Qwen, DeepSeek, Mixtral, ...).

Everything is returned as :class:`~nexus.models.ExpertWeights` in the canonical
``nn.Linear`` orientation (gate/up ``[I, H]``, down ``[H, I]``), in float32.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from nexus.errors import NexusError
from nexus.models.live import ExpertWeights, split_gate_up
from nexus.weights import mxfp4

INDEX_NAME = "model.safetensors.index.json"
#: safetensors dtypes accepted for expert weights (converted to float32 on read)
FLOAT_DTYPES = {"F32", "F16", "BF16"}
_PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class TensorInfo:
    file: str  # absolute path of the shard
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string (F32, BF16, U8, ...)


class Checkpoint:
    """The safetensors tensors of a model directory: names, shapes, dtypes and lazy reads.

    Opening validates every shard's header (so a missing, truncated or corrupted file is
    reported before any work starts) but reads no tensor data.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise NexusError(f"model directory not found: {self.path}")
        self.tensors: dict[str, TensorInfo] = {}
        index = self.path / INDEX_NAME
        if index.is_file():
            self._open_indexed(index)
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise NexusError(
                    f"model directory {self.path} has no .safetensors weights (and no {INDEX_NAME})"
                )
            for file in files:
                for key, info in self._read_header(file).items():
                    if key in self.tensors:
                        raise NexusError(
                            f"tensor {key} appears in both {Path(self.tensors[key].file).name} and "
                            f"{file.name}; add a {INDEX_NAME} or remove the stray file"
                        )
                    self.tensors[key] = info

    def _open_indexed(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise NexusError(f"{index} is not a valid safetensors index ({_first_line(exc)})") from exc
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (self.path / s).is_file()]
        if missing:
            raise NexusError(
                f"checkpoint shard {missing[0]} listed in {index} is missing"
                + (f" ({len(missing)} shards missing)" if len(missing) > 1 else "")
                + "; re-download the model or restore the file"
            )
        headers = {s: self._read_header(self.path / s) for s in shards}
        for key, shard in weight_map.items():
            info = headers[shard].get(key)
            if info is None:
                raise NexusError(
                    f"{index} says tensor {key} is in {shard}, but that file does not contain it; "
                    "the shard is from another checkpoint or damaged"
                )
            self.tensors[key] = info

    @staticmethod
    def _read_header(file: Path) -> dict[str, TensorInfo]:
        try:
            with safe_open(str(file), framework="pt") as f:
                out = {}
                for key in f.keys():
                    s = f.get_slice(key)
                    out[key] = TensorInfo(str(file), tuple(int(d) for d in s.get_shape()), s.get_dtype())
                return out
        except (SafetensorError, OSError) as exc:
            raise NexusError(
                f"checkpoint file {file} is truncated or corrupted ({_first_line(exc)}); "
                "re-download or re-save it"
            ) from exc

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise NexusError(f"checkpoint {self.path} has no tensor {key}") from None

    @property
    def files(self) -> list[str]:
        return sorted({i.file for i in self.tensors.values()})


# -- per-layer expert layout ---------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """What the model (built on the meta device) expects of one MoE layer's experts."""

    layer: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    bias: bool
    #: the fused live tensors are [E, in, out] (GPT-OSS, Llama4) rather than [E, out, in]
    transposed: bool
    #: "concat" or "interleaved" order of gate and up inside the fused tensor
    gate_up_layout: str
    gate_up_shape: tuple[int, ...]
    down_shape: tuple[int, ...]


@dataclass(frozen=True)
class LayerPlan:
    """Where one layer's experts are in the checkpoint and how to turn them canonical."""

    layer: int
    kind: str  # fused | mxfp4 | granite | per_expert
    shape: LayerShape
    #: role -> TensorInfo-like (key, file); roles depend on kind (see read_expert)
    keys: dict = field(default_factory=dict)
    #: per_expert only: "{prefix}experts.{e}." and the (gate, up, down) names
    prefix: str = ""
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    files: dict = field(default_factory=dict)  # key -> file

    def key_for(self, role: str, expert: int | None = None) -> str:
        if self.kind == "per_expert":
            name = dict(zip(("gate", "up", "down"), self.names))[role]
            return f"{self.prefix}experts.{expert}.{name}.weight"
        return self.keys[role]

    def bytes_per_expert(self) -> int:
        """Bytes read from disk for one expert (for memory estimates)."""
        s = self.shape
        n = 3 * s.intermediate_size * s.hidden_size
        if self.kind == "mxfp4":
            return n // 2 + n // 32 + 4 * (3 * s.intermediate_size + s.hidden_size)
        return 4 * n


def _layer_pattern(layer: int, tail: str) -> re.Pattern:
    # prefix: anything ending in "layers.{L}." then whole dotted components (never "shared_experts")
    return re.compile(rf"^(?P<pre>(?:.*\.)?layers\.{layer}\.(?:\w+\.)*?){tail}$")


def _pick_prefix(candidates: set[str], layer: int, path: Path) -> str:
    if len(candidates) == 1:
        return next(iter(candidates))
    raise NexusError(
        f"checkpoint {path} has expert tensors for layer {layer} under several prefixes "
        f"{sorted(candidates)}; cannot tell which belongs to the language model"
    )


def plan_layer(ckpt: Checkpoint, shape: LayerShape) -> LayerPlan:
    """Find layer ``shape.layer``'s expert tensors in ``ckpt`` and check their shapes."""
    L, E, H, I = shape.layer, shape.num_experts, shape.hidden_size, shape.intermediate_size  # noqa: E741
    found: dict[str, set[str]] = {"fused": set(), "mxfp4": set(), "granite": set(), "per_expert": set()}
    pats = {
        "fused": _layer_pattern(L, r"experts\.gate_up_proj"),
        "mxfp4": _layer_pattern(L, r"experts\.gate_up_proj_blocks"),
        "granite": _layer_pattern(L, r"input_linear\.weight"),
        "per_expert": _layer_pattern(L, r"experts\.0\.(?:gate_proj|w1)\.weight"),
    }
    marker = f"layers.{L}."
    for key in ckpt.tensors:
        if marker not in key:
            continue
        for kind, pat in pats.items():
            m = pat.match(key)
            if m:
                found[kind].add(m.group("pre"))
    kinds = [k for k, v in found.items() if v]
    if not kinds:
        raise NexusError(
            f"checkpoint {ckpt.path} has no expert tensors for MoE layer {L} (looked for "
            f"'layers.{L}...experts.gate_up_proj', its MXFP4 '_blocks', 'input_linear.weight' and "
            f"per-expert 'experts.0.gate_proj.weight'/'w1.weight'); is it a checkpoint of this model?"
        )
    if len(kinds) > 1:
        raise NexusError(
            f"checkpoint {ckpt.path} stores layer {L}'s experts in several layouts at once ({kinds}); "
            "it mixes two checkpoints"
        )
    kind = kinds[0]
    pre = _pick_prefix(found[kind], L, ckpt.path)
    t = shape.transposed
    if kind == "per_expert":
        names = next(n for n in _PER_EXPERT_NAMES if f"{pre}experts.0.{n[0]}.weight" in ckpt)
        plan = LayerPlan(L, kind, shape, prefix=pre, names=names)
        want = {"gate": (I, H), "up": (I, H), "down": (H, I)}
        for e in range(E):
            for role, dims in want.items():
                key = plan.key_for(role, e)
                if key not in ckpt:
                    raise NexusError(
                        f"checkpoint {ckpt.path} lacks {key} (layer {L} has {E} experts in this model); "
                        "is the checkpoint from a model with fewer experts, or incomplete?"
                    )
                _check(ckpt, key, dims, FLOAT_DTYPES)
        files = {plan.key_for(r, e): ckpt.info(plan.key_for(r, e)).file for e in range(E) for r in want}
        return LayerPlan(L, kind, shape, prefix=pre, names=names, files=files)
    if kind == "mxfp4":
        keys = {
            "gate_up_blocks": f"{pre}experts.gate_up_proj_blocks",
            "gate_up_scales": f"{pre}experts.gate_up_proj_scales",
            "down_blocks": f"{pre}experts.down_proj_blocks",
            "down_scales": f"{pre}experts.down_proj_scales",
        }
        if H % mxfp4.BLOCK or I % mxfp4.BLOCK:
            raise NexusError(f"layer {L}: MXFP4 needs widths divisible by 32, the model has H={H}, I={I}")
        _check(ckpt, keys["gate_up_blocks"], (E, 2 * I, H // 32, 16), {"U8"})
        _check(ckpt, keys["gate_up_scales"], (E, 2 * I, H // 32), {"U8"})
        _check(ckpt, keys["down_blocks"], (E, H, I // 32, 16), {"U8"})
        _check(ckpt, keys["down_scales"], (E, H, I // 32), {"U8"})
    elif kind == "granite":
        keys = {"gate_up": f"{pre}input_linear.weight", "down": f"{pre}output_linear.weight"}
        _check(ckpt, keys["gate_up"], (E, 2 * I, H), FLOAT_DTYPES)
        _check(ckpt, keys["down"], (E, H, I), FLOAT_DTYPES)
    else:
        keys = {"gate_up": f"{pre}experts.gate_up_proj", "down": f"{pre}experts.down_proj"}
        _check(ckpt, keys["gate_up"], (E, H, 2 * I) if t else (E, 2 * I, H), FLOAT_DTYPES)
        _check(ckpt, keys["down"], (E, I, H) if t else (E, H, I), FLOAT_DTYPES)
    if shape.bias:
        keys["gate_up_bias"] = f"{pre}experts.gate_up_proj_bias"
        keys["down_bias"] = f"{pre}experts.down_proj_bias"
        _check(ckpt, keys["gate_up_bias"], (E, 2 * I), FLOAT_DTYPES)
        _check(ckpt, keys["down_bias"], (E, H), FLOAT_DTYPES)
    return LayerPlan(L, kind, shape, keys=keys, files={k: ckpt.info(k).file for k in keys.values()})


def _check(ckpt: Checkpoint, key: str, shape: tuple, dtypes: set[str]) -> None:
    if key not in ckpt:
        raise NexusError(f"checkpoint {ckpt.path} lacks {key}; the file set is incomplete")
    info = ckpt.info(key)
    if info.dtype not in dtypes:
        hint = " (FP8 checkpoints need dequantising to bf16 first)" if info.dtype.startswith("F8") else ""
        raise NexusError(
            f"checkpoint tensor {key} has dtype {info.dtype}; NEXUS reads {'/'.join(sorted(dtypes))} here{hint}"
        )
    if tuple(info.shape) != tuple(shape):
        raise NexusError(
            f"checkpoint tensor {key} has shape {list(info.shape)} but this model's config implies "
            f"{list(shape)}; the checkpoint and config.json belong to different models"
        )


# -- reading -------------------------------------------------------------------------------


class ExpertReader:
    """Reads experts of one planned layer.

    Shard files are opened per expert and closed again, so the memory-mapped pages an
    expert's read touched are released before the next one (they count as resident memory
    while mapped). :meth:`average` streams each expert in row chunks straight into float32
    accumulators laid out like the shared expert's parameters, so besides the result only
    a few MB are ever held, whatever the checkpoint's dtype or layout.
    """

    def __init__(self, plan: LayerPlan, chunk_elems: int = 1 << 20) -> None:
        self.plan = plan
        self.chunk_elems = int(chunk_elems)
        self._handles: dict[str, object] = {}

    def _read(self, key: str, index=None) -> torch.Tensor:
        file = self.plan.files[key]
        try:
            f = self._handles.get(file)
            if f is None:
                f = self._handles[file] = safe_open(file, framework="pt")
            s = f.get_slice(key)
            return s[index] if index is not None else s[:]
        except (SafetensorError, OSError) as exc:
            raise NexusError(
                f"cannot read {key} from {file} ({_first_line(exc)}); the file is truncated or corrupted"
            ) from exc

    def _check_expert(self, expert: int) -> None:
        n = self.plan.shape.num_experts
        if not 0 <= int(expert) < n:
            raise NexusError(f"layer {self.plan.layer} has experts 0..{n - 1}, not {expert}")

    def read(self, expert: int) -> ExpertWeights:
        """Expert ``expert`` in canonical orientation, float32 (whole tensors at once)."""
        self._check_expert(expert)
        p, s = self.plan, self.plan.shape
        try:
            if p.kind == "per_expert":
                gate, up, down = (self._read(p.key_for(r, expert)).float() for r in ("gate", "up", "down"))
                return ExpertWeights(gate, up, down)
            if p.kind == "mxfp4":
                k = p.keys
                gu = mxfp4.decode(
                    self._read(k["gate_up_blocks"], expert), self._read(k["gate_up_scales"], expert)
                )
                down = mxfp4.decode(
                    self._read(k["down_blocks"], expert), self._read(k["down_scales"], expert)
                )
            else:
                gu = self._read(p.keys["gate_up"], expert).float()
                down = self._read(p.keys["down"], expert).float()
                if p.kind == "fused" and s.transposed:
                    gu, down = gu.t().contiguous(), down.t().contiguous()
            gate, up = split_gate_up(gu, s.gate_up_layout)
            gb = ub = db = None
            if s.bias:
                gb, ub = split_gate_up(self._read(p.keys["gate_up_bias"], expert).float(), s.gate_up_layout)
                db = self._read(p.keys["down_bias"], expert).float()
            return ExpertWeights(gate, up, down, gb, ub, db)
        finally:
            self.close()

    # -- streaming accumulation --------------------------------------------------------------
    def _add_rows(self, dst: torch.Tensor, key: str, lead: tuple, weight: float, transposed: bool) -> None:
        """``dst`` [out, in] += weight * tensor[lead] (on disk [out, in], or [in, out] when
        ``transposed``), read in chunks of rows."""
        rows = dst.shape[1] if transposed else dst.shape[0]
        width = dst.shape[0] if transposed else dst.shape[1]
        step = max(1, self.chunk_elems // max(1, width))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = self._read(key, (*lead, slice(r0, r1))).float()
            if transposed:
                dst[:, r0:r1].add_(x.t(), alpha=weight)
            else:
                dst[r0:r1].add_(x, alpha=weight)

    def _add_mxfp4(self, dst: torch.Tensor, blocks: str, scales: str, expert: int, weight: float) -> None:
        rows, width = dst.shape
        step = max(1, self.chunk_elems // width)
        buf = torch.empty(min(step, rows), width, dtype=torch.float32)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            b = self._read(blocks, (expert, slice(r0, r1)))
            s = self._read(scales, (expert, slice(r0, r1)))
            dst[r0:r1].add_(mxfp4.decode(b, s, out=buf[: r1 - r0]), alpha=weight)

    def accumulate(self, acc: dict[str, torch.Tensor], expert: int, weight: float) -> None:
        """``acc += weight * expert`` for accumulators shaped like the shared expert's parameters:
        ``w_in`` [2I, H] (gate/up in the family's fused layout), ``w_out`` [H, I], and
        ``b_in`` [2I], ``b_out`` [H] when the experts have biases."""
        self._check_expert(expert)
        p, s = self.plan, self.plan.shape
        w = float(weight)
        try:
            if p.kind == "per_expert":
                gate, up = split_gate_up(acc["w_in"], s.gate_up_layout)  # views
                for dst, role in ((gate, "gate"), (up, "up"), (acc["w_out"], "down")):
                    self._add_rows(dst, p.key_for(role, expert), (), w, False)
            elif p.kind == "mxfp4":
                self._add_mxfp4(acc["w_in"], p.keys["gate_up_blocks"], p.keys["gate_up_scales"], expert, w)
                self._add_mxfp4(acc["w_out"], p.keys["down_blocks"], p.keys["down_scales"], expert, w)
            else:
                t = p.kind == "fused" and s.transposed
                self._add_rows(acc["w_in"], p.keys["gate_up"], (expert,), w, t)
                self._add_rows(acc["w_out"], p.keys["down"], (expert,), w, t)
            if s.bias:
                acc["b_in"].add_(self._read(p.keys["gate_up_bias"], expert).float(), alpha=w)
                acc["b_out"].add_(self._read(p.keys["down_bias"], expert).float(), alpha=w)
        finally:
            self.close()

    def new_accumulators(self) -> dict[str, torch.Tensor]:
        s = self.plan.shape
        H, I = s.hidden_size, s.intermediate_size  # noqa: E741
        acc = {"w_in": torch.zeros(2 * I, H), "w_out": torch.zeros(H, I)}
        if s.bias:
            acc["b_in"], acc["b_out"] = torch.zeros(2 * I), torch.zeros(H)
        return acc

    def average(self, experts: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
        """``sum_e w_e * expert_e`` in float32 as shared-expert parameters (w_in, w_out, b_in, b_out)."""
        if not experts or len(experts) != len(weights):
            raise ValueError("need one weight per expert and at least one expert")
        acc = self.new_accumulators()
        for e, w in zip(experts, weights):
            self.accumulate(acc, e, w)
        return acc

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> ExpertReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- from a model directory ----------------------------------------------------------------


def meta_model(config):
    """The model of ``config`` on the meta device (no memory, exact module structure)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layer_shapes(config, model=None) -> dict[int, LayerShape]:
    """Expert shapes of every MoE layer, from the config (via a meta-device model)."""
    from nexus.models import expert_weights, family_for_config, find_moe_blocks

    family = family_for_config(config)
    model = model if model is not None else meta_model(config)
    out = {}
    for b in find_moe_blocks(model):
        w = expert_weights(b, family, 0)
        E, H, I = b.num_experts, int(w.gate.shape[1]), int(w.gate.shape[0])  # noqa: E741
        transposed = bool(getattr(b.experts, "is_transposed", family.transposed))
        out[b.layer] = LayerShape(
            layer=b.layer,
            num_experts=E,
            hidden_size=H,
            intermediate_size=I,
            bias=w.has_bias,
            transposed=transposed,
            gate_up_layout=family.gate_up_layout,
            # the live fused tensors' shapes (packed experts stand in for these)
            gate_up_shape=(E, H, 2 * I) if transposed else (E, 2 * I, H),
            down_shape=(E, I, H) if transposed else (E, H, I),
        )
    return out


def checkpoint_expert_weights(path: str | os.PathLike, layer: int, expert: int) -> ExpertWeights:
    """Expert ``expert`` of MoE layer ``layer`` read from the checkpoint in ``path`` (float32).

    Reads only that expert's slices (MXFP4 decoded); the model is never built.
    """
    from nexus.models.loading import load_config

    shapes = layer_shapes(load_config(path))
    if layer not in shapes:
        raise NexusError(f"layer {layer} is not an MoE layer of {path}; MoE layers: {sorted(shapes)}")
    with ExpertReader(plan_layer(Checkpoint(path), shapes[layer])) as reader:
        return reader.read(expert)


# -- streaming safetensors writer ----------------------------------------------------------

_NP_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "BF16": np.uint16,  # raw bits
}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8}
TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a CPU tensor as a flat numpy array (bf16 as its uint16 bits)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def safetensors_layout(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included) of a safetensors file holding ``entries``
    (name, dtype, shape) in that order, and each tensor's (absolute offset, size in bytes)."""
    header: dict = {}
    offset = 0
    spans = {}
    for name, dtype, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, offset + n],
        }
        spans[name] = (offset, n)
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    return head, {k: (len(head) + o, n) for k, (o, n) in spans.items()}


def preallocate_safetensors(
    path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None
) -> dict[str, tuple[int, int]]:
    """Create a safetensors file with its header and (sparse) room for every tensor; the
    tensors are then filled in with :func:`write_at`, by any process that sees the file."""
    head, spans = safetensors_layout(entries, metadata)
    end = max((o + n for o, n in spans.values()), default=len(head))
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(end)
    return spans


def write_at(path: str | os.PathLike, span: tuple[int, int], data) -> None:
    """Write one tensor's bytes (numpy array or tensor) at its ``span`` of a preallocated file."""
    arr = tensor_bytes(data) if isinstance(data, torch.Tensor) else np.ascontiguousarray(data).reshape(-1)
    view = memoryview(arr).cast("B")
    if view.nbytes != span[1]:
        raise ValueError(f"{view.nbytes} bytes for a tensor of {span[1]} bytes")
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], span[0] + done)
    finally:
        os.close(fd)


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, with every shape declared up front.

    ``save_file`` needs all tensors in memory at once; this writes the header first and
    then each tensor's bytes as they become available (in the declared order), so a file
    far larger than RAM can be produced with one tensor (or one chunk) in memory.
    """

    def __init__(
        self, path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]], metadata=None
    ) -> None:
        head, spans = safetensors_layout(entries, metadata)
        self._order = [(name, spans[name][1]) for name, _, _ in entries]
        self.path = Path(path)
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._f.write(head)
        self._pos = -1  # index into _order of the tensor being written
        self._left = 0  # bytes it still needs
        self._next()

    def _next(self) -> None:
        while self._left == 0 and self._pos < len(self._order):
            self._pos += 1
            self._left = self._order[self._pos][1] if self._pos < len(self._order) else 0

    def write(self, name: str, data) -> None:
        """Append ``data`` (numpy array or tensor, possibly a chunk) to tensor ``name``."""
        if self._pos >= len(self._order) or self._order[self._pos][0] != name:
            expected = self._order[self._pos][0] if self._pos < len(self._order) else None
            raise ValueError(f"expected data for {expected!r}, got {name!r}")
        arr = tensor_bytes(data) if isinstance(data, torch.Tensor) else np.ascontiguousarray(data).reshape(-1)
        view = memoryview(arr).cast("B")
        if view.nbytes > self._left:
            raise ValueError(f"too many bytes for {name}")
        self._f.write(view)
        self._left -= view.nbytes
        self._next()

    def close(self) -> None:
        complete = self._pos >= len(self._order)
        self._f.close()
        if not complete:
            raise ValueError(
                f"safetensors file {self.path} incomplete: {self._order[self._pos][0]} unwritten"
            )

    def abort(self) -> None:
        self._f.close()
