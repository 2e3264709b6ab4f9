"""The project's one way to load a base model and its tokenizer.

Everything that opens a model goes through here so that the same checks apply everywhere:
a clear error for missing or malformed configs, dense or unsupported architectures, custom
code without ``trust_remote_code``, and damaged safetensors; pickled ``.bin`` weights are
refused (``use_safetensors=True``).

Quantised checkpoints: the routed experts of an MXFP4 checkpoint (GPT-OSS) stay packed on the
device by default (:mod:`nexus.weights.packed`, ``experts="packed"``), or are dequantised on load with
transformers' own ``Mxfp4Config(dequantize=True)`` (``experts="dequantized"``). Block-scaled
FP8 checkpoints (DeepSeek-V3's and Qwen3's official FP8 releases) are dequantised on load with
transformers' ``FineGrainedFP8Config(dequantize=True)``; they cannot stay packed.

Models are built on the meta device and every tensor is loaded shard by shard straight onto
the target device (``device_map``): no full CPU copy first, no dequantised copy of packed
experts ever.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import get_args

import torch

from nexus.config import EXPERTS_LAYOUTS
from nexus.errors import NexusError, first_line
from nexus.models import family_for_config

_DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise NexusError(f"unknown dtype '{dtype}'; choose one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def load_config(path_or_name: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load and check a config: it must exist, parse, and describe a supported MoE model."""
    from transformers import AutoConfig

    path = Path(path_or_name)
    if path.exists():
        cfg_file = path / "config.json"
        if not path.is_dir() or not cfg_file.is_file():
            raise NexusError(
                f"model directory {path} has no config.json; point --model at a Hugging Face model directory"
            )
        try:
            raw = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NexusError(
                f"{cfg_file} is not valid JSON ({exc.__class__.__name__}: {exc}); fix or re-download it"
            ) from exc
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise NexusError(f"{cfg_file} has no model_type; it is not a transformers model config")
        if raw.get("auto_map") and not trust_remote_code:
            raise NexusError(
                f"model {path} ships custom code (auto_map in config.json); NEXUS does not run it unless you "
                "pass --trust-remote-code (trust_remote_code=True) after reviewing that code"
            )
    try:
        config = AutoConfig.from_pretrained(str(path_or_name), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise NexusError(
            f"cannot load a model config from '{path_or_name}': not a local directory and not reachable on the Hub"
        ) from exc
    except Exception as exc:  # ValueError, KeyError, TypeError, transformers' strict-dataclass validation
        raise NexusError(f"config of '{path_or_name}' is not usable: {first_line(exc)}") from exc
    family_for_config(config)
    return config


#: ``experts=`` choices of :func:`load_model` and every stage that runs the model
EXPERTS: tuple[str, ...] = get_args(EXPERTS_LAYOUTS)


def quant_method(config) -> str | None:
    """The checkpoint's ``quantization_config.quant_method`` (lower case), or None."""
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    method = getattr(method, "value", method)
    return str(method).lower() if method is not None else None


def _is_mxfp4(config) -> bool:
    return (quant_method(config) or "").endswith("mxfp4")


def experts_layout(experts: str, method: str | None, *, model: str | os.PathLike = "the model") -> str:
    """``packed`` or ``dequantized``: how routed experts stored with quantisation ``method``
    (``quantization_config.quant_method``, None for float weights) will be held.

    ``auto`` is ``packed`` for MXFP4 checkpoints and ``dequantized`` otherwise (experts stored
    in a float dtype are simply loaded; FP8 ones are dequantised on load). The one rule for
    loading and for ``nexus plan``.
    """
    if experts not in EXPERTS:
        raise NexusError(f"unknown experts layout '{experts}'; choose one of {', '.join(EXPERTS)}")
    if (method or "").endswith("mxfp4"):
        return "packed" if experts == "auto" else experts
    if experts == "packed":
        stored = f"quantised with '{method}'" if method else "in a float dtype"
        if method == "fp8":
            stored = "in block-scaled FP8 (quant_method fp8), which NEXUS dequantises on load"
        raise NexusError(
            f"packed experts need an MXFP4 checkpoint (GPT-OSS), but {model} stores its experts {stored}; "
            "use --experts dequantized or auto (model.experts in a job)"
        )
    return "dequantized"


def resolve_experts(config, experts: str = "auto", *, model: str | os.PathLike = "the model") -> str:
    """:func:`experts_layout` for a loaded transformers config."""
    return experts_layout(experts, quant_method(config), model=model)


def _quantization_kwargs(config, layout: str) -> dict:
    """What ``from_pretrained`` needs to load the checkpoint's experts as ``layout``."""
    method = quant_method(config)
    if layout == "packed":
        from nexus.weights.packed import QUANT_METHOD, register_packed_quantizer

        register_packed_quantizer()
        q = config.quantization_config
        q = dict(q) if isinstance(q, dict) else q.to_dict()
        # the checkpoint's own config names our quantizer (config is this call's private copy)
        config.quantization_config = {**q, "quant_method": QUANT_METHOD}
        return {}
    if method and method.endswith("mxfp4"):
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    if method == "fp8":
        # explicit, so a GPU dequantises too: frozen experts run in the compute dtype
        from transformers import FineGrainedFP8Config

        return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    return {}


def load_model(
    path_or_name: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    experts: str = "auto",
    **kwargs,
):
    """Load a supported MoE causal LM for NEXUS, in eval mode, straight onto ``device``.

    Args:
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's).
        device: where to put it (``cpu``, ``cuda``, ``cuda:1``...); tensors go there shard by
            shard, without a full CPU copy first.
        trust_remote_code: run custom modelling code shipped with the checkpoint (off by default).
        experts: ``auto`` (packed for MXFP4 checkpoints, else dequantized), ``packed`` (the
            routed experts stay MXFP4 on the device and are decoded on the fly) or
            ``dequantized`` (decoded once, on load, into ``dtype``).
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(path_or_name, trust_remote_code=trust_remote_code)
    layout = resolve_experts(config, experts, model=path_or_name)
    torch_dtype = parse_dtype(dtype)
    kwargs = {**_quantization_kwargs(config, layout), **kwargs}
    path = Path(path_or_name)
    if (
        path.is_dir()
        and not any(path.glob("*.safetensors"))
        and not (path / "model.safetensors.index.json").exists()
    ):
        raise NexusError(
            f"model directory {path} has no .safetensors weights (NEXUS never loads pickled .bin files)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path_or_name),
            config=config,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            device_map={"": torch.device(device)},
            **kwargs,
        )
    except NexusError:
        raise
    except Exception as exc:  # transformers raises many types for damaged checkpoints
        raise NexusError(f"cannot load model weights from '{path_or_name}': {first_line(exc)}") from exc
    return model.eval()


def load_tokenizer(path_or_name: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load the tokenizer stored with a model, with a one-line error when it is missing."""
    from transformers import AutoTokenizer

    path = Path(path_or_name)
    if path.is_dir() and not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        raise NexusError(
            f"model directory {path} has no tokenizer (tokenizer.json); copy the base model's tokenizer files into it"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path_or_name), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise NexusError(f"cannot load the tokenizer of '{path_or_name}': {first_line(exc)}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
