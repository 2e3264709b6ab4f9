"""The ``export`` stage: base model + adapter as something a serving engine runs.

Two formats (``format``):

- ``vllm``: a model directory that ``vllm serve DIR`` runs with NEXUS installed (its plugin,
  :mod:`nexus.serving.vllm_plugin`, registers the architecture). config.json is the base's
  with ``architectures`` naming the NEXUS class (``NexusQwen3MoeForCausalLM``...) and the
  adapter's config under ``nexus`` (a GPT-OSS with plain RoPE gets the equivalent YaRN
  parameters, the only kind vLLM's GPT-OSS reads); the base weights are linked, not copied
  (hard links where the filesystem allows, else symlinks, else copies; MXFP4 and other
  quantised files kept as they are); the adapter's ``adapter.safetensors`` and
  ``nexus_config.json`` sit beside them, so the directory is also a NEXUS adapter directory;
  the safetensors index lists the adapter's tensors too, so vLLM's own weight loader hands
  them to the model's ``load_weights``.
- ``merged``: native merge, the adapter folded into the family's own ungated shared expert: a
  stock checkpoint, no NEXUS needed to run it. DeepSeek-V2/V3, GLM4-MoE and ERNIE-4.5-MoE add
  an ungated shared MLP of width ``count x moe_intermediate_size`` to every MoE layer. A
  SwiGLU MLP is a sum over its intermediate units, so appending our expert's units
  (zero-padded to a whole number of ``moe_intermediate_size`` slices, the scalar gate folded
  into the down projection) and raising ``count`` gives a checkpoint that stock transformers
  loads, with the same outputs as base + adapter.

  Real releases split one layer over several safetensors shards (a layer's gate, up and down
  projections can each sit in a different file), so every tensor is rewritten in the shard
  where it lives, one shard in memory at a time; shards without a changed tensor are linked,
  not rewritten, and the index is rewritten to list every tensor exactly once. FP8
  block-quantised checkpoints are refused: appending units would mean requantising the
  adapter, which changes its outputs.

In the job the stage runs when ``export.format`` is set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nexus.config import RemoteCode, input_, setting
from nexus.errors import NexusError
from nexus.method.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_adapter_config,
    read_adapter_tensors,
    tensor_name,
)
from nexus.models import FAMILIES, Family, find_moe_blocks, split_gate_up
from nexus.models.identity import check_identity, model_identity
from nexus.models.loading import load_config
from nexus.serving.vllm_plugin import ARCHITECTURES
from nexus.util.artifacts import atomic_dir, claim_output, claims_released, write_json
from nexus.weights.checkpoint import INDEX_NAME, Checkpoint, meta_model

#: the key of an exported vLLM directory's config.json that holds the adapter's config
CONFIG_KEY = "nexus"


# -- files ----------------------------------------------------------------------------------------
def link_file(src: Path, dst: Path) -> str:
    """Make ``dst`` the same file as ``src``: a hard link, else a symlink, else a copy.

    Returns which one it made. Hard links fail across filesystems (and on some network
    mounts), symlinks where the filesystem has none; a copy always works.
    """
    src = Path(src).resolve()
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        pass
    try:
        os.symlink(src, dst)
        return "symlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def copy_model_files(model_dir: Path, out: Path) -> None:
    """Copy the model directory's small files (config, tokenizer, generation config...):
    everything but weights and the safetensors index, which the caller writes."""
    for item in Path(model_dir).iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != INDEX_NAME:
            shutil.copy2(item, out / item.name)


def data_bytes(file: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the 8-byte length and the header),
    what a safetensors index's ``total_size`` adds up."""
    with open(file, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return Path(file).stat().st_size - 8 - header


# -- vLLM -----------------------------------------------------------------------------------------
def vllm_architecture(family: str) -> str:
    """The NEXUS vLLM architecture of a family, or a one-line error naming the supported ones."""
    if family not in ARCHITECTURES:
        raise NexusError(
            f"vLLM export supports {', '.join(sorted(ARCHITECTURES))}, not {family}; serve the adapter "
            "with transformers and nexus.load_adapter, or use --format merged where the family has an "
            "ungated native shared expert"
        )
    return ARCHITECTURES[family][0]


#: YaRN parameters that compute plain RoPE: no interpolation (factor 1, so the ramp between
#: interpolated and extrapolated frequencies blends equal values) and attention scale 1
_PLAIN_ROPE_AS_YARN = {
    "rope_type": "yarn",
    "factor": 1.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
}


def vllm_rope(raw: dict) -> dict:
    """``raw`` (a config.json) with rotary parameters that vLLM's class for the family reads.

    Why: vLLM's GPT-OSS builds YaRN rotary embeddings whatever the config says and reads
    ``factor``, ``beta_fast``... from it; the published GPT-OSS checkpoints use YaRN, but a
    GPT-OSS with plain RoPE (the demo base) would fail there with a KeyError. It gets the YaRN
    parameters that compute plain RoPE (transformers gives bit-identical logits for both).
    """
    if raw.get("model_type") != "gpt_oss":
        return raw
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "yarn":
        return raw
    if kind != "default":
        raise NexusError(
            f"vLLM's GPT-OSS runs YaRN or plain RoPE, and this model's config.json has rope_type {kind!r}; "
            "serve it with transformers and nexus.load_adapter"
        )
    yarn = {
        **_PLAIN_ROPE_AS_YARN,
        "rope_theta": rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
        "original_max_position_embeddings": raw["max_position_embeddings"],
    }
    return {**{k: v for k, v in raw.items() if k != "rope_scaling"}, "rope_parameters": yarn}


def vllm_base_dir(model_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """The base model as stock vLLM runs it: its files linked, config.json through
    :func:`vllm_rope`; what the NEXUS export's base part is, to serve the two side by side
    (the decode-speed benchmark, the serving test)."""
    model_dir, out = Path(model_dir), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.name != "config.json":
            link_file(item, out / item.name)
    write_json(out / "config.json", vllm_rope(json.loads((model_dir / "config.json").read_text())))
    return out


def export_vllm(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write a directory that ``vllm serve`` runs as base + adapter (see the module docstring)."""
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    ident = model_identity(config)
    arch = vllm_architecture(ident["family"])
    adapter = read_adapter_config(adapter_dir)
    check_identity(
        adapter["base_identity"],
        ident,
        f"adapter {adapter_dir}",
        "export it with the base model it was made from",
    )
    ckpt = Checkpoint(model_dir)
    adapter_names = sorted(read_adapter_tensors(adapter_dir))
    clash = sorted(set(adapter_names) & set(ckpt.tensors))
    if clash:
        raise NexusError(
            f"base checkpoint {model_dir} already has a tensor named {clash[0]}; it is not a base model"
        )
    raw = vllm_rope(json.loads((model_dir / "config.json").read_text()))
    raw["architectures"] = [arch]
    raw[CONFIG_KEY] = {**adapter, "weights": WEIGHTS_NAME}
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        copy_model_files(model_dir, tmp)
        weight_map = {key: Path(info.file).name for key, info in ckpt.tensors.items()}
        for file in ckpt.files:
            link_file(Path(file), tmp / Path(file).name)
        shutil.copy2(adapter_dir / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        shutil.copy2(adapter_dir / CONFIG_NAME, tmp / CONFIG_NAME)
        weight_map.update(dict.fromkeys(adapter_names, WEIGHTS_NAME))
        files = {*weight_map.values()}
        total = sum(data_bytes(tmp / f) for f in files)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(tmp / INDEX_NAME, index)
        write_json(tmp / "config.json", raw)
    return Path(output_dir)


# -- native merge ---------------------------------------------------------------------------------
_PROJ = ("gate_proj", "up_proj", "down_proj")
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _check_mergeable(family: Family, spec: dict, adapter_dir) -> None:
    if not family.mergeable:
        native = (
            "a gated native shared expert"
            if family.native_shared_gate
            else (
                "a native shared expert of fixed width" if family.native_shared else "no native shared expert"
            )
        )
        supported = ", ".join(n for n, f in FAMILIES.items() if f.mergeable)
        serve = " or serve it with nexus export --format vllm" if family.name in ARCHITECTURES else ""
        raise NexusError(
            f"{family.name} has {native}, so the adapter cannot be merged into a stock checkpoint; "
            f"the adapter itself is the export (load it with nexus.load_adapter{serve}). "
            f"Native merge supports: {supported}"
        )
    if spec["gate"] == "sigmoid":
        raise NexusError(
            f"adapter {adapter_dir} uses a per-token sigmoid gate, which the ungated native shared expert of "
            f"{family.name} cannot express; export the adapter instead, or train with --gate scalar"
        )
    if spec["bias"] or spec["activation"] != "swiglu":
        raise NexusError(
            f"adapter {adapter_dir} has biases or a non-SwiGLU activation; {family.name} cannot absorb it"
        )


def _check_not_fp8(model_dir: Path, raw_config: dict, ckpt: Checkpoint, native_keys: list[str]) -> None:
    """Refuse FP8 / block-quantised shared experts in one line (config or tensors say so)."""
    q = raw_config.get("quantization_config") or {}
    scales = [k for k in native_keys if k.endswith(".weight") and f"{k}_scale_inv" in ckpt]
    fp8 = [k for k in native_keys if k in ckpt and ckpt.info(k).dtype.startswith("F8")]
    if q.get("quant_method") == "fp8" or scales or fp8:
        block = q.get("weight_block_size")
        what = f"quant_method={q.get('quant_method')}" + (f", weight_block_size={block}" if block else "")
        if not q:
            what = f"tensor {(fp8 or scales)[0]} is {ckpt.info((fp8 or scales)[0]).dtype} with a weight_scale_inv"
        raise NexusError(
            f"model {model_dir} is FP8 block-quantised ({what}); merging would requantise the adapter and "
            "change its outputs: dequantise the checkpoint to bf16 first, or keep base + adapter unmerged"
        )


def _merged_tensor(proj: str, kind: str, native: torch.Tensor | None, ours: dict, slots: int, unit: int):
    """``native`` with our expert's units appended (zero-padded to ``slots * unit`` units).

    ``kind`` is ``weight`` or ``bias``. Gate and up rows (and their biases) get our units
    appended; down columns get them, with the scalar gate folded in; the down bias is the
    native one (our experts have none here, ``_check_mergeable`` refused biased adapters).
    """
    inter = ours["w_out"].shape[1]
    pad = slots * unit - inter
    if kind == "bias":
        if proj == "down_proj":
            return native
        extra = torch.zeros(slots * unit, dtype=native.dtype)
        return torch.cat([native, extra]).contiguous()
    if proj == "down_proj":
        down = ours["w_out"].float()
        if "scale" in ours:
            down = down * ours["scale"].float()
        new = torch.nn.functional.pad(down, (0, pad))
        dim = 1
    else:
        gate, up = split_gate_up(ours["w_in"].float(), "concat")
        new = torch.nn.functional.pad(gate if proj == "gate_proj" else up, (0, 0, 0, pad))
        dim = 0
    if native is None:
        return new.contiguous()
    return torch.cat([native.float(), new], dim).to(native.dtype).contiguous()


def _layer_dtype(ckpt: Checkpoint, block: str) -> torch.dtype:
    """The most common float dtype among ``block``'s tensors (for shared experts made from nothing)."""
    counts = Counter(
        i.dtype for k, i in ckpt.tensors.items() if k.startswith(f"{block}.") and i.dtype in _ST_DTYPES
    )
    return _ST_DTYPES[counts.most_common(1)[0][0]] if counts else torch.float32


def merge_adapter(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write a checkpoint of ``model_dir`` with ``adapter_dir`` merged into its native shared experts.

    Every tensor stays in the shard it came from (only the native shared expert's grow);
    shards that hold none of them are hard-linked (else symlinked, else copied).
    """
    model_dir = Path(model_dir)
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    ident = model_identity(config)
    adapter = read_adapter_config(adapter_dir)
    family = FAMILIES[ident["family"]]
    _check_mergeable(family, adapter["spec"], adapter_dir)
    check_identity(
        adapter["base_identity"],
        ident,
        f"adapter {adapter_dir}",
        "merge it into the base model it was made from",
    )
    if adapter["spec"]["act_fn"] != getattr(config, family.act_attr):
        raise NexusError(
            f"adapter activation {adapter['spec']['act_fn']} differs from the model's {getattr(config, family.act_attr)}"
        )
    raw_config = json.loads((model_dir / "config.json").read_text())
    ckpt = Checkpoint(model_dir)
    blocks = {b.layer: b.name for b in find_moe_blocks(meta_model(config))}
    # name of every changed tensor -> (layer, projection, weight|bias), and the shard it goes to
    changes: dict[str, tuple[int, str, str]] = {}
    placement: dict[str, str] = {}
    native_keys = []
    for layer in adapter["layers"]:
        block = blocks[layer]
        layer_keys = [k for k in ckpt.tensors if k.startswith(f"{block}.")]
        if not layer_keys:
            raise NexusError(f"cannot find layer {layer}'s MoE tensors ({block}.*) in {model_dir}")
        home = ckpt.info(sorted(layer_keys)[0]).file
        for proj in _PROJ:
            for kind in ("weight", "bias"):
                key = f"{block}.{family.native_shared}.{proj}.{kind}"
                if key in ckpt:
                    placement[key] = ckpt.info(key).file
                elif kind == "weight":  # no native shared expert yet (count 0): made in the layer's shard
                    placement[key] = home
                else:
                    continue
                changes[key] = (layer, proj, kind)
                native_keys.append(key)
    _check_not_fp8(model_dir, raw_config, ckpt, native_keys)

    unit = int(config.moe_intermediate_size)
    count = int(getattr(config, family.merge_count_attr) or 0)
    slots = math.ceil(adapter["spec"]["intermediate_size"] / unit)
    tensors = read_adapter_tensors(adapter_dir)
    ours_by_layer = {
        layer: {
            p: tensors[tensor_name(layer, p)]
            for p in ("w_in", "w_out", "scale")
            if tensor_name(layer, p) in tensors
        }
        for layer in adapter["layers"]
    }
    by_file: dict[str, list[str]] = {}
    for key, file in placement.items():
        by_file.setdefault(file, []).append(key)

    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        copy_model_files(model_dir, tmp)
        for file in ckpt.files:
            name = Path(file).name
            if file not in by_file:
                link_file(Path(file), tmp / name)
                continue
            with safe_open(file, "pt") as f:  # one shard in memory at a time
                state = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {"format": "pt"}
            for key in by_file[file]:
                layer, proj, kind = changes[key]
                block = blocks[layer]
                native = state.get(key)
                new = _merged_tensor(proj, kind, native, ours_by_layer[layer], slots, unit)
                state[key] = new if native is not None else new.to(_layer_dtype(ckpt, block))
            save_file(state, str(tmp / name), metadata=metadata)
            del state
        if (model_dir / INDEX_NAME).is_file():
            _write_index(model_dir / INDEX_NAME, tmp)
        raw_config[family.merge_count_attr] = count + slots
        write_json(tmp / "config.json", raw_config)
    return Path(output_dir)


def _write_index(base_index: Path, out: Path) -> None:
    """The index of the shards written to ``out``: every tensor once, total size recomputed."""
    index = json.loads(base_index.read_text())
    weight_map, total = {}, 0
    for shard in sorted(set(index["weight_map"].values())):
        weight_map.update(dict.fromkeys(Checkpoint._read_header(out / shard), shard))
        total += data_bytes(out / shard)
    index["weight_map"] = dict(sorted(weight_map.items()))
    index.setdefault("metadata", {})["total_size"] = total
    write_json(out / INDEX_NAME, index)


# -- the stage ----------------------------------------------------------------------------------
#: what ``nexus export`` prints per format
_DONE = {
    "vllm": "vLLM model directory: {out} (serve it with: vllm serve {out}, NEXUS installed beside vLLM)",
    "merged": "merged checkpoint: {out} (loads with AutoModelForCausalLM.from_pretrained, no nexus needed)",
}


class ExportConfig(RemoteCode):
    """``nexus export``: a directory ``vllm serve`` runs (GPT-OSS, Qwen3-MoE, Mixtral, OLMoE), or the
    adapter merged into the family's native shared expert, a stock checkpoint (DeepSeek-V2/V3,
    GLM4-MoE, ERNIE-4.5-MoE)."""

    model: str = input_(help="base model directory", identity="model")
    adapter: str = input_(help="adapter directory")
    output: str = input_(help="directory to write (atomically)")
    overwrite: bool = input_(False, help="replace the output directory if it exists")
    format: Literal["vllm", "merged"] | None = setting(
        None,
        help="vllm: base weights linked + adapter, for `vllm serve`; merged: native merge into a stock "
        "checkpoint (needed; in the job the stage runs only when it is set)",
    )


@claims_released()
def run(cfg: ExportConfig | None = None, /, **kwargs) -> Path:
    """Write ``cfg.model`` + ``cfg.adapter`` as ``cfg.format`` to ``cfg.output``; returns it."""
    cfg = ExportConfig.build(cfg, **kwargs)
    if cfg.format is None:
        raise NexusError("export needs a format: --format vllm (for vllm serve) or --format merged")
    claim_output(cfg.output, cfg.overwrite)
    fn = export_vllm if cfg.format == "vllm" else merge_adapter
    return fn(
        cfg.model, cfg.adapter, cfg.output, overwrite=cfg.overwrite, trust_remote_code=cfg.trust_remote_code
    )


def summary_lines(out: Path, cfg: ExportConfig) -> list[str]:
    return [_DONE[cfg.format].format(out=out)]


def job_inputs(job) -> dict:
    """In the job: the trained adapter."""
    return {"model": job.model_dir, "adapter": job.stage_dir("train", "adapter")}
