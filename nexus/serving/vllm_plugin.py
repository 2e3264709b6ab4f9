"""vLLM plugin entry point (group ``vllm.general_plugins``): registers the NEXUS architectures.

vLLM calls :func:`register` in every one of its processes (engine, workers) after
importing this module through NEXUS's package metadata. It runs with vLLM's own pinned
transformers, so this module imports nothing of NEXUS and nothing heavy: the model classes
are registered by ``"module:Class"`` name and imported by vLLM only when a model of that
architecture is built. Importing it without vLLM installed costs nothing.
"""

from __future__ import annotations

#: transformers ``model_type`` -> (NEXUS architecture in an exported config.json, vLLM base class)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "gpt_oss": ("NexusGptOssForCausalLM", "GptOssForCausalLM"),
    "qwen3_moe": ("NexusQwen3MoeForCausalLM", "Qwen3MoeForCausalLM"),
    "mixtral": ("NexusMixtralForCausalLM", "MixtralForCausalLM"),
    "olmoe": ("NexusOlmoeForCausalLM", "OlmoeForCausalLM"),
}

MODELS_MODULE = "nexus.serving.vllm_models"


def register() -> None:
    """Register every NEXUS architecture with vLLM's model registry (lazily, by name)."""
    from vllm import ModelRegistry

    for arch, _base in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")
