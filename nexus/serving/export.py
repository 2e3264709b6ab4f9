"""``nexus export``: turn a base model + adapter into something a serving engine runs.

Two formats:

- ``vllm``: a model directory that ``vllm serve DIR`` runs with NEXUS installed (its
  plugin registers the architecture). config.json is the base's with ``architectures``
  naming the NEXUS class (``NexusQwen3MoeForCausalLM``...) and the adapter's config under
  ``nexus``; the base weights are linked, not copied (hard links where the filesystem
  allows, else symlinks, else copies; MXFP4 and other quantised files kept as they are);
  the adapter's ``adapter.safetensors`` and ``nexus_config.json`` sit beside them, so the
  directory is also a NEXUS adapter directory; the safetensors index lists the adapter's
  tensors too, so vLLM's own weight loader hands them to the model's ``load_weights``.
- ``merged``: the native merge of :mod:`nexus.merge` (families with an ungated native
  shared expert): a stock checkpoint, no NEXUS needed to run it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from nexus.errors import NexusError
from nexus.serving.vllm_plugin import ARCHITECTURES

FORMATS = ("vllm", "merged")
CONFIG_KEY = "nexus"


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
        if item.is_file() and item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            shutil.copy2(item, out / item.name)


def data_bytes(file: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the 8-byte length and the header),
    what a safetensors index's ``total_size`` adds up."""
    with open(file, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return Path(file).stat().st_size - 8 - header


def vllm_architecture(family: str) -> str:
    """The NEXUS vLLM architecture of a family, or a one-line error naming the supported ones."""
    if family not in ARCHITECTURES:
        raise NexusError(
            f"vLLM export supports {', '.join(sorted(ARCHITECTURES))}, not {family}; serve the adapter "
            "with transformers and nexus.load_adapter, or use --format merged where the family has an "
            "ungated native shared expert"
        )
    return ARCHITECTURES[family][0]


def export_vllm(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write a directory that ``vllm serve`` runs as base + adapter (see the module docstring)."""
    from nexus.adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors
    from nexus.artifacts import atomic_dir, write_json
    from nexus.checkpoint import INDEX_NAME, Checkpoint
    from nexus.identity import check_identity, model_identity
    from nexus.loading import load_config

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
    raw = json.loads((model_dir / "config.json").read_text())
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


def export_adapter(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    format: str,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Export ``adapter_dir`` on ``model_dir`` as ``format`` (``vllm`` or ``merged``)."""
    if format not in FORMATS:
        raise NexusError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    if format == "vllm":
        fn = export_vllm
    else:
        from nexus.merge import merge_adapter as fn
    return fn(model_dir, adapter_dir, output_dir, overwrite=overwrite, trust_remote_code=trust_remote_code)
