"""The adapter format: ``nexus_config.json`` plus ``adapter.safetensors``.

The adapter is NEXUS's primary artifact: a few MB of shared-expert tensors under names of
our own (``layers.{L}.w_in`` ...), never passed through transformers' key renaming, and a
JSON config that says what they fit (family, widths, MoE layers, a hash of the base
config) and how they were made. Loading onto another model fails with the mismatch named.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nexus.errors import NexusError
from nexus.method.attach import install, shared_expert_modules
from nexus.method.shared_expert import SharedExpert, SharedExpertSpec
from nexus.models import find_moe_blocks
from nexus.models.identity import check_identity, model_identity
from nexus.util.artifacts import atomic_dir, read_json, write_json

FORMAT = "nexus-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "nexus_config.json"
WEIGHTS_NAME = "adapter.safetensors"
_PARAMS = ("w_in", "w_out", "b_in", "b_out", "scale", "mix")


def tensor_name(layer: int, param: str) -> str:
    """Adapter tensor name of ``param`` (w_in, w_out, b_in, b_out, scale, mix) at ``layer``."""
    return f"layers.{layer}.{param}"


def adapter_state_dict(model: nn.Module, *, gather=None) -> dict[str, torch.Tensor]:
    """Shared-expert tensors of ``model`` under adapter names (contiguous CPU copies);
    ``gather`` makes each a whole tensor first (training's FSDP shards)."""
    out = {}
    for layer, se in shared_expert_modules(model).items():
        for name, t in se.state_dict().items():
            param = name.replace(".weight", "")
            t = gather(t) if gather else t
            out[tensor_name(layer, param)] = t.detach().to("cpu").contiguous().clone()
    return out


def adapter_config(
    *,
    spec: SharedExpertSpec,
    layers: list[int],
    identity: dict,
    base_model: str = "",
    dtype: str = "float32",
    init: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """The ``nexus_config.json`` contents for an adapter of ``spec`` experts on ``layers``."""
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": identity["family"],
        "base_model": base_model,
        "base_config_hash": identity["config_hash"],
        "base_identity": identity,
        "layers": sorted(layers),
        "spec": spec.to_dict(),
        "dtype": dtype,
        "init": init or {"method": "unknown"},
        "nexus_version": _version(),
    }
    if extra:
        config["extra"] = extra
    return config


def _version() -> str:
    from nexus import __version__

    return __version__


def write_adapter(
    path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor], *, overwrite: bool = True
) -> Path:
    """Write an adapter directory atomically from its config and adapter-named tensors.

    Used both by :func:`save_adapter` (live model) and by the conversion stage, which builds
    the tensors straight from checkpoint slices without ever loading the model.
    """
    expected = {tensor_name(layer, p) for layer in config["layers"] for p in ("w_in", "w_out")}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"adapter tensors missing: {missing[:4]}")
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp / WEIGHTS_NAME),
            metadata={"format": FORMAT},
        )
        write_json(tmp / CONFIG_NAME, config)
    return Path(path)


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model: str | None = None,
    init: dict | None = None,
    extra: dict | None = None,
    overwrite: bool = True,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's shared experts as an adapter directory (atomically).

    ``init`` records how the experts were initialised (method, selection); ``extra`` adds
    free-form metadata (training summary). Like ``save_pretrained``, an existing directory
    is replaced unless ``overwrite=False``. ``tensors``: the :func:`adapter_state_dict` to write,
    when the caller gathered it already (training under FSDP gathers on every rank).
    """
    modules = shared_expert_modules(model)
    if not modules:
        raise NexusError(
            "this model has no shared experts; call nexus.attach_shared_experts or nexus.load_adapter first"
        )
    specs = {se.spec for se in modules.values()}
    if len(specs) != 1:
        raise NexusError(
            "shared experts of different shapes in one model are not supported by the adapter format"
        )
    config = adapter_config(
        spec=specs.pop(),
        layers=list(modules),
        identity=model_identity(model.config),
        base_model=base_model or getattr(model.config, "_name_or_path", "") or "",
        dtype=str(next(iter(modules.values())).w_in.dtype).replace("torch.", ""),
        init=init,
        extra=extra,
    )
    tensors = adapter_state_dict(model) if tensors is None else tensors
    return write_adapter(path, config, tensors, overwrite=overwrite)


def read_adapter_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise NexusError(f"adapter directory not found: {path}")
    config = read_json(path / CONFIG_NAME, "adapter config")
    if config.get("format") != FORMAT:
        raise NexusError(
            f"{path / CONFIG_NAME} is not a NEXUS adapter config (format={config.get('format')!r})"
        )
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise NexusError(
            f"adapter {path} has format version {config['format_version']}, newer than this NEXUS "
            f"understands ({FORMAT_VERSION}); upgrade nexus"
        )
    return config


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise NexusError(f"adapter weights not found: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise NexusError(f"adapter weights {file} are unreadable ({exc}); re-export the adapter") from exc


def load_adapter(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False) -> list[int]:
    """Attach (if needed) and load an adapter into ``model``; returns its MoE layer indices.

    The adapter must come from a model with the same family, widths and MoE layers; the
    first mismatch is named. Attaching freezes the base model (as
    :func:`~nexus.attach_shared_experts` does); the base's weights are never changed.

    With ``trainable=False`` (inference) the shared experts are frozen too and keep the
    adapter's stored dtype. With ``trainable=True`` every layer's shared expert is trainable
    and held in float32 whatever the stored dtype: these are the optimiser's master weights
    (a bf16 adapter is widened exactly; training it in bf16 would round away updates smaller
    than 2^-8 of a weight).
    """
    config = read_adapter_config(path)
    check_identity(
        config.get("base_identity", {}),
        model_identity(model.config),
        f"adapter {path}",
        "load it onto the base model it was made from",
    )
    spec = SharedExpertSpec(**config["spec"])
    tensors = read_adapter_tensors(path)
    dtype = torch.float32 if trainable else getattr(torch, config.get("dtype", "float32"))
    blocks = {b.layer: b for b in find_moe_blocks(model)}
    existing = shared_expert_modules(model)
    if any(layer not in existing for layer in config["layers"]):
        model.requires_grad_(False)  # once, before any shared expert is installed
    for layer in config["layers"]:
        se = existing.get(layer)
        if se is None:
            se = SharedExpert(spec, dtype=dtype)
            install(blocks[layer], se)
        elif se.spec != spec:
            raise NexusError(
                f"the shared expert attached at layer {layer} differs from adapter {path}; detach it first"
            )
        state = {}
        for param in _PARAMS:
            key = tensor_name(layer, param)
            if key in tensors:
                state[f"{param}.weight" if param == "mix" else param] = tensors.pop(key)
        try:
            se.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise NexusError(f"adapter {path} does not match its own config at layer {layer}: {exc}") from exc
        if trainable:
            se.float()
        se.requires_grad_(trainable)
    if tensors:
        raise NexusError(
            f"adapter {path} has tensors for layers not listed in its config: {sorted(tensors)[:3]}"
        )
    return list(config["layers"])


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


__all__ = ["load_adapter", "save_adapter", "read_adapter_config", "adapter_state_dict", "SharedExpert"]
