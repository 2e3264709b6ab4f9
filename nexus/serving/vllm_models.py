"""NEXUS architectures for vLLM: vLLM's own MoE models plus one shared expert per MoE layer.

Each class subclasses vLLM's model class for the family (no fork, no patch of vLLM). After
vLLM's ``__init__`` builds the model, every MoE block listed in the adapter config
(``config.json`` -> ``nexus``) gets a child module ``nexus``: NEXUS's own
:class:`~nexus.method.shared_expert.SharedExpert` (the family's MLP shape and activation, its
scalar / sigmoid / no gate), so the maths is the very module training used. A forward hook
adds ``shared(x)`` to the block's output, ``x`` being the block's input: vLLM's MoE blocks
return a new tensor and leave their input untouched (the fused-MoE op is out of place), so
reading the input after the routed path is the same as before it. The shared expert is
replicated on every tensor-parallel rank (it is one expert's size) and added after the
routed experts' all-reduce.

``load_weights`` takes the adapter's tensors (``layers.{L}.w_in`` ..., listed in the
exported directory's safetensors index, file ``adapter.safetensors``) out of vLLM's weight
stream, hands the rest to the base class's loader, and copies them into the shared experts
in the model's dtype; a missing one is an error, never a silently unchanged model.

Imported by vLLM (by name, from :mod:`nexus.serving.vllm_plugin`) in its own processes, with
its own pinned transformers: module level imports only torch and vLLM; the shared expert
comes from :mod:`nexus.method.shared_expert`, which needs only torch and
``transformers.activations``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.olmoe import OlmoeForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

#: child module name of the shared expert inside each MoE block (as in nexus.method.attach)
ATTR = "nexus"
#: adapter tensor names (nexus.method.adapter.tensor_name)
ADAPTER_KEY = re.compile(r"^layers\.(\d+)\.(w_in|w_out|b_in|b_out|scale|mix)$")


def _add_shared(block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    return output + getattr(block, ATTR)(x).reshape(output.shape).to(output.dtype)


class NexusMixin:
    """Adds the adapter's shared experts to a vLLM MoE model (put before the vLLM class)."""

    #: attribute of a decoder layer holding its MoE block
    moe_attr = "mlp"

    def _attach_shared_experts(self, vllm_config) -> None:
        from nexus.method.shared_expert import SharedExpert, SharedExpertSpec

        hf_config = vllm_config.model_config.hf_config
        nexus_config = getattr(hf_config, "nexus", None)
        if not isinstance(nexus_config, dict):
            raise ValueError(
                f"{type(self).__name__} needs the adapter config under 'nexus' in config.json; "
                "export the model with `nexus export --format vllm`"
            )
        spec = SharedExpertSpec(**nexus_config["spec"])
        dtype = vllm_config.model_config.dtype
        #: MoE layer -> qualified name of its shared expert (layers of this pipeline stage only)
        self.nexus_layers: dict[int, str] = {}
        self.nexus_all_layers = [int(layer) for layer in nexus_config["layers"]]
        for layer in self.nexus_all_layers:
            decoder = self.model.layers[layer]
            if isinstance(decoder, PPMissingLayer):
                continue
            block = getattr(decoder, self.moe_attr)
            block.add_module(ATTR, SharedExpert(spec, dtype=dtype))
            block.register_forward_hook(_add_shared)
            self.nexus_layers[layer] = f"model.layers.{layer}.{self.moe_attr}.{ATTR}"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        adapter: dict[tuple[int, str], torch.Tensor] = {}

        def base_weights():
            for name, tensor in weights:
                m = ADAPTER_KEY.match(name)
                if m:
                    adapter[(int(m[1]), m[2])] = tensor
                else:
                    yield name, tensor

        loaded = set(super().load_weights(base_weights()))
        for (layer, param), tensor in adapter.items():
            if layer not in self.nexus_all_layers:
                raise ValueError(
                    f"adapter tensor layers.{layer}.{param} is for a layer the config does not list"
                )
            if layer not in self.nexus_layers:  # another pipeline stage's layer
                continue
            name = f"{self.nexus_layers[layer]}.{param}" + (".weight" if param == "mix" else "")
            target = self.get_parameter(name)
            if target.shape != tensor.shape:
                raise ValueError(
                    f"adapter tensor {name} has shape {list(tensor.shape)}, expected {list(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))
            loaded.add(name)
        missing = sorted({n for n, _ in self.named_parameters() if f".{ATTR}." in n} - loaded)
        if missing:
            raise ValueError(f"the exported model lacks adapter tensors for {missing[:3]}; re-export it")
        return loaded


class NexusGptOssForCausalLM(NexusMixin, GptOssForCausalLM):
    """GPT-OSS + NEXUS shared experts (clamped SwiGLU with biases, interleaved gate/up)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_shared_experts(vllm_config)


class NexusQwen3MoeForCausalLM(NexusMixin, Qwen3MoeForCausalLM):
    """Qwen3-MoE + NEXUS shared experts."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_shared_experts(vllm_config)


class NexusMixtralForCausalLM(NexusMixin, MixtralForCausalLM):
    """Mixtral + NEXUS shared experts (the MoE block is ``block_sparse_moe``)."""

    moe_attr = "block_sparse_moe"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_shared_experts(vllm_config)


class NexusOlmoeForCausalLM(NexusMixin, OlmoeForCausalLM):
    """OLMoE + NEXUS shared experts."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_shared_experts(vllm_config)
