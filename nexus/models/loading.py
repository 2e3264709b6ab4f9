"""The project's one way to load a base model and its tokenizer.

Everything that opens a model goes through here so that the same checks apply everywhere:
a clear error for missing or malformed configs, dense or unsupported architectures, custom
code without ``trust_remote_code``, and damaged safetensors; MXFP4 checkpoints (GPT-OSS)
are dequantised with transformers' own ``Mxfp4Config(dequantize=True)`` when no kernels can
run them; pickled ``.bin`` weights are refused (``use_safetensors=True``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

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


def _is_mxfp4(config) -> bool:
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(method).lower().endswith("mxfp4")


def load_model(
    path_or_name: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    dequantize: bool | None = None,
    **kwargs,
):
    """Load a supported MoE causal LM for NEXUS, in eval mode.

    Args:
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's).
        device: where to put it (``cpu``, ``cuda``, ``cuda:1``...).
        trust_remote_code: run custom modelling code shipped with the checkpoint (off by default).
        dequantize: for MXFP4 checkpoints, dequantise on load; default: whenever the model is
            not going to a GPU (the MXFP4 kernels need one) or NEXUS will train on it.
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(path_or_name, trust_remote_code=trust_remote_code)
    torch_dtype = parse_dtype(dtype)
    if _is_mxfp4(config) and dequantize is not False:
        from transformers import Mxfp4Config

        kwargs.setdefault("quantization_config", Mxfp4Config(dequantize=True))
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
            **kwargs,
        )
    except NexusError:
        raise
    except Exception as exc:  # transformers raises many types for damaged checkpoints
        raise NexusError(f"cannot load model weights from '{path_or_name}': {first_line(exc)}") from exc
    return model.to(device).eval()


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
