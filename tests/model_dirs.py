"""Tiny model directories on disk (config, safetensors, tokenizer), as users hand them to NEXUS."""

from __future__ import annotations

from pathlib import Path

from tiny_models import tiny_model

TOKENIZER_VOCAB = 320


def sample_texts(n: int = 200) -> list[str]:
    """Deterministic text from the standard library's own sources (always present)."""
    import json as _json

    src = Path(_json.__file__).parent
    texts: list[str] = []
    for f in sorted(src.glob("*.py")):
        texts.extend(p.strip() for p in f.read_text().split("\n\n") if p.strip())
    return texts[:n]


def write_tokenizer(out: Path, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """A byte-level BPE tokenizer trained on a little stdlib text, loadable by AutoTokenizer."""
    from nexus.demo.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(sample_texts(), vocab_size), out)


def write_tiny_model_dir(out: Path, family: str = "gpt_oss", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of ``family`` with a tokenizer into ``out``."""
    model = tiny_model(family, seed=seed, vocab_size=TOKENIZER_VOCAB, **overrides)
    model.save_pretrained(str(out))
    write_tokenizer(out)
    return out


def write_fp8_model_dir(out: Path, family: str = "qwen3_moe", block: int = 16, **overrides) -> dict:
    """A tiny checkpoint stored like DeepSeek-V3's and Qwen3's official FP8 releases: every
    projection weight (attention and experts; not the router, embeddings, LM head or norms)
    as F8_E4M3 with a float32 ``weight_scale_inv`` per ``block x block`` tile, and
    ``quantization_config: {quant_method: fp8, weight_block_size: [block, block]}``.

    Returns the dequantised value of every FP8 weight (``fp8 * scale_inv`` tile by tile)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    overrides.setdefault("moe_intermediate_size", 32)  # whole tiles
    write_tiny_model_dir(out, family=family, **overrides)
    dequantised = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors = {}
        for key, w in load_file(str(file)).items():
            quantise = w.ndim == 2 and key.endswith("proj.weight") and "shared_expert_gate" not in key
            if not quantise:
                tensors[key] = w
                continue
            rows, cols = w.shape
            tiles = w.reshape(rows // block, block, cols // block, block)
            scale = tiles.abs().amax((1, 3)).clamp_min(1e-12) / 448.0  # E4M3's largest value
            q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
            tensors[key], tensors[f"{key}_scale_inv"] = q.reshape(rows, cols), scale.float()
            dequantised[key] = (q.float() * scale[:, None, :, None]).reshape(rows, cols)
        save_file(tensors, str(file), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [block, block],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return dequantised
