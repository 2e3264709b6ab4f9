"""NEXUS: specialise Mixture-of-Experts language models with one trainable shared expert per MoE layer.

Public API (imported lazily so that ``nexus --help`` stays fast)::

    import nexus
    model = nexus.load_model("path/to/moe-model")
    layers = nexus.attach_shared_experts(model, init="zero", gate="scalar")
    with nexus.shared_experts_disabled(model):
        ...  # exactly the base model
    nexus.save_adapter(model, "adapter/")
    nexus.load_adapter(other_model, "adapter/")
    nexus.detach_shared_experts(model)
    print(nexus.plan("path/to/moe-model", gpus=2, gpu_memory="80GB").table())  # memory per stage
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "attach_shared_experts": "nexus.method.attach",
    "detach_shared_experts": "nexus.method.attach",
    "shared_experts_disabled": "nexus.method.attach",
    "shared_expert_modules": "nexus.method.attach",
    "save_adapter": "nexus.method.adapter",
    "load_adapter": "nexus.method.adapter",
    "read_adapter_config": "nexus.method.adapter",
    "load_model": "nexus.models.loading",
    "load_tokenizer": "nexus.models.loading",
    "merge_adapter": "nexus.stages.export",
    "plan": "nexus.planner",
    "NexusError": "nexus.errors",
    "supported_families": "nexus.models",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'nexus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
