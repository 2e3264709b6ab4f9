"""Native merge: fold an adapter into a family's own ungated shared expert.

DeepSeek-V2/V3, GLM4-MoE and ERNIE-4.5-MoE add an ungated shared MLP of width
``count x moe_intermediate_size`` to every MoE layer. A SwiGLU MLP is a sum over its
intermediate units, so appending our expert's units (zero-padded to a whole number of
``moe_intermediate_size`` slices, the scalar gate folded into the down projection) and
raising ``count`` gives a checkpoint that stock transformers loads, with the same outputs
as base + adapter. The base checkpoint is streamed one shard at a time; only the shared
expert tensors of MoE layers change.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nexus.config import RemoteCode, input_
from nexus.errors import NexusError
from nexus.method.adapter import read_adapter_config, read_adapter_tensors, tensor_name
from nexus.models import FAMILIES, Family, find_moe_blocks
from nexus.models.identity import check_identity, model_identity
from nexus.models.loading import load_config
from nexus.util.artifacts import atomic_dir, write_json


def _shards(model_dir: Path) -> tuple[dict[str, str], dict | None]:
    """Map tensor name -> shard file, and the index (None for a single-file checkpoint)."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        return dict(index["weight_map"]), index
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise NexusError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}, None


def _merged_shared(
    native: dict[str, torch.Tensor] | None, ours: dict[str, torch.Tensor], slots: int, unit: int, dtype
) -> dict[str, torch.Tensor]:
    """Append our expert (padded to ``slots * unit`` units) to the native shared MLP."""
    w_in, w_out = ours["w_in"].float(), ours["w_out"].float()
    if "scale" in ours:
        w_out = w_out * ours["scale"].float()
    inter = w_out.shape[1]
    gate, up = w_in.chunk(2, dim=0)
    pad = slots * unit - inter
    gate = torch.nn.functional.pad(gate, (0, 0, 0, pad))
    up = torch.nn.functional.pad(up, (0, 0, 0, pad))
    down = torch.nn.functional.pad(w_out, (0, pad))
    new = {"gate_proj": gate, "up_proj": up, "down_proj": down}
    if native is not None:
        new = {
            "gate_proj": torch.cat([native["gate_proj"].float(), gate], 0),
            "up_proj": torch.cat([native["up_proj"].float(), up], 0),
            "down_proj": torch.cat([native["down_proj"].float(), down], 1),
        }
    return {k: v.to(dtype).contiguous() for k, v in new.items()}


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
        raise NexusError(
            f"{family.name} has {native}, so the adapter cannot be merged into a stock checkpoint; "
            f"the adapter itself is the export (load it with nexus.load_adapter). Native merge supports: {supported}"
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


def merge_adapter(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write a checkpoint of ``model_dir`` with ``adapter_dir`` merged into its native shared experts."""
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

    unit = int(config.moe_intermediate_size)
    count = int(getattr(config, family.merge_count_attr) or 0)
    slots = math.ceil(adapter["spec"]["intermediate_size"] / unit)
    tensors = read_adapter_tensors(adapter_dir)

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    blocks = {b.layer: b.name for b in find_moe_blocks(meta)}
    weight_map, index = _shards(model_dir)
    per_shard: dict[str, list] = {}  # shard -> [(tensor names, our tensors)] to rewrite there
    for layer in adapter["layers"]:
        block = blocks[layer]
        shard = next((s for k, s in weight_map.items() if k.startswith(f"{block}.")), None)
        if shard is None:
            raise NexusError(f"cannot find layer {layer}'s MoE tensors ({block}.*) in {model_dir}")
        names = {
            p: f"{block}.{family.native_shared}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
        }
        ours = {
            p: tensors[tensor_name(layer, p)]
            for p in ("w_in", "w_out", "scale")
            if tensor_name(layer, p) in tensors
        }
        per_shard.setdefault(shard, []).append((names, ours))
        weight_map.update(dict.fromkeys(names.values(), shard))

    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        for item in model_dir.iterdir():
            if (
                item.suffix != ".safetensors"
                and item.is_file()
                and item.name != "model.safetensors.index.json"
            ):
                shutil.copy2(item, tmp / item.name)
        for shard in sorted(set(weight_map.values())):
            with safe_open(str(model_dir / shard), "pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {"format": "pt"}
            for names, ours in per_shard.get(shard, []):
                native = {p: state[n] for p, n in names.items()} if names["gate_proj"] in state else None
                dtype = next(iter(native.values())).dtype if native else next(iter(state.values())).dtype
                for p, t in _merged_shared(native, ours, slots, unit, dtype).items():
                    state[names[p]] = t
            save_file(state, str(tmp / shard), metadata=metadata)
        if index is not None:
            index["weight_map"] = weight_map
            write_json(tmp / "model.safetensors.index.json", index)
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg[family.merge_count_attr] = count + slots
        write_json(tmp / "config.json", cfg)
    return Path(output_dir)


# -- the stage ----------------------------------------------------------------------------------


class ExportConfig(RemoteCode):
    """``nexus export``: the adapter merged into the family's native shared expert, as a stock checkpoint."""

    model: str = input_(help="base model directory", identity="model")
    adapter: str = input_(help="adapter directory")
    output: str = input_(help="directory for the merged checkpoint (written atomically)")
    overwrite: bool = input_(False, help="replace the output directory if it exists")


def run(cfg: ExportConfig | None = None, /, **kwargs) -> Path:
    """Write ``cfg.model`` with ``cfg.adapter`` merged in to ``cfg.output``; returns it."""
    cfg = ExportConfig.build(cfg, **kwargs)
    return merge_adapter(
        cfg.model, cfg.adapter, cfg.output, overwrite=cfg.overwrite, trust_remote_code=cfg.trust_remote_code
    )


def summary_lines(out: Path, cfg: ExportConfig) -> list[str]:
    return [f"merged checkpoint: {out} (loads with AutoModelForCausalLM.from_pretrained, no nexus needed)"]


def job_inputs(job) -> dict:
    """In the job: the trained adapter."""
    return {"model": job.model_dir, "adapter": job.stage_dir("train", "adapter")}
