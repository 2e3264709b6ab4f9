"""NEXUS architectures for vLLM: vLLM's own MoE models plus one shared expert per MoE layer.

Each class subclasses vLLM's model class for the family (no fork, no patch of vLLM). After
vLLM's ``__init__`` builds the model, every MoE block listed in the adapter config
(``config.json`` -> ``nexus``) gets a child module ``nexus``, a :class:`VllmSharedExpert`: the
adapter's MLP (the family's shape and activation, :class:`~nexus.method.shared_expert.SharedExpertSpec`)
built from vLLM's own layers, so that it runs on the kernels that make the base fast: vLLM's
linear layers (on a CPU, oneDNN matmuls with weights packed after loading; on a GPU, its GEMM
dispatch) and its fused activation-and-multiply ops (``SiluAndMul``, GPT-OSS's
``SwigluOAIAndMul``). A forward hook adds ``shared(x)`` to the block's output, ``x`` being the
block's input: vLLM's MoE blocks return a new tensor and leave their input untouched (the
fused-MoE op is out of place), so reading the input after the routed path is the same as before
it. The shared expert is replicated on every tensor-parallel rank (it is one expert's size) and
added after the routed experts' all-reduce.

``load_weights`` takes the adapter's tensors (``layers.{L}.w_in`` ..., listed in the exported
directory's safetensors index, file ``adapter.safetensors``) out of vLLM's weight stream, hands
the rest to the base class's loader, and copies them into the shared experts in the model's
dtype, with two rewrites that change no value of the function: a scalar gate is folded into
the down projection (``s * (W h + b) = (s W) h + s b``: one multiplication fewer per token) and
an interleaved gate/up of a SwiGLU family is reordered to vLLM's gate-then-up halves. A missing
tensor is an error, never a silently unchanged model.

Imported by vLLM (by name, from :mod:`nexus.serving.vllm_plugin`) in its own processes, with
its own pinned transformers: module level imports only torch and vLLM; the adapter's spec
comes from :mod:`nexus.method.shared_expert`, which needs only torch and
``transformers.activations``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.layers.activation import SwigluOAIAndMul, get_act_and_mul_fn
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.olmoe import OlmoeForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

#: child module name of the shared expert inside each MoE block (as in nexus.method.attach)
ATTR = "nexus"
#: adapter tensor names (nexus.method.adapter.tensor_name)
ADAPTER_KEY = re.compile(r"^layers\.(\d+)\.(w_in|w_out|b_in|b_out|scale|mix)$")


class VllmSharedExpert(nn.Module):
    """``g(x) * down(act_and_mul(gate_up(x)))`` on vLLM's layers (see the module docstring)."""

    def __init__(self, spec, dtype: torch.dtype, prefix: str) -> None:
        super().__init__()
        self.spec, self.prefix = spec, prefix
        h, i = spec.hidden_size, spec.intermediate_size
        linear = dict(params_dtype=dtype, quant_config=None, return_bias=False)
        self.gate_up = ReplicatedLinear(h, 2 * i, bias=spec.bias, prefix=f"{prefix}.gate_up", **linear)
        self.down = ReplicatedLinear(i, h, bias=spec.bias, prefix=f"{prefix}.down", **linear)
        self.mix = (
            ReplicatedLinear(h, 1, bias=False, prefix=f"{prefix}.mix", **linear)
            if spec.gate == "sigmoid"
            else None
        )
        if spec.activation == "gpt_oss":  # interleaved gate/up, as the adapter stores it
            self.act = SwigluOAIAndMul(alpha=spec.alpha, limit=spec.limit)
        else:
            self.act = get_act_and_mul_fn(spec.act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down(self.act(self.gate_up(x)))
        if self.mix is not None:
            out = out * torch.sigmoid(self.mix(x))
        return out

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Copy one layer's adapter tensors in (see the module docstring); returns the model's
        names of the parameters filled. Raises ``ValueError`` on a missing or misshapen tensor."""
        from nexus.models.live import fuse_gate_up, split_gate_up

        spec = self.spec
        #: adapter tensor -> parameter of this module
        targets = {"w_in": "gate_up.weight", "w_out": "down.weight"}
        if spec.bias:
            targets.update(b_in="gate_up.bias", b_out="down.bias")
        if spec.gate == "sigmoid":
            targets["mix"] = "mix.weight"
        needed = [*targets, "scale"] if spec.gate == "scalar" else list(targets)
        missing = [n for n in needed if n not in tensors]
        if missing:
            raise ValueError(f"the exported model lacks adapter tensors {missing}; re-export it")
        scale = tensors["scale"].float() if spec.gate == "scalar" else None
        reorder = spec.activation != "gpt_oss" and spec.gate_up_layout == "interleaved"
        for name, param in targets.items():
            value, target = tensors[name].float(), self.get_parameter(param)
            if reorder and name in ("w_in", "b_in"):  # to vLLM's gate-then-up halves
                value = fuse_gate_up(*split_gate_up(value, "interleaved"), "concat")
            if scale is not None and name in ("w_out", "b_out"):
                value = value * scale
            if target.shape != value.shape:
                raise ValueError(
                    f"adapter tensor {name} has shape {list(value.shape)}, expected {list(target.shape)}"
                )
            target.copy_(value.to(target.dtype))
        return [f"{self.prefix}.{param}" for param in targets.values()]


def _add_shared(block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    return output + getattr(block, ATTR)(x).reshape(output.shape).to(output.dtype)


class NexusMixin:
    """Adds the adapter's shared experts to a vLLM MoE model (put before the vLLM class)."""

    #: attribute of a decoder layer holding its MoE block
    moe_attr = "mlp"

    def _attach_shared_experts(self, vllm_config) -> None:
        from nexus.method.shared_expert import SharedExpertSpec

        hf_config = vllm_config.model_config.hf_config
        nexus_config = getattr(hf_config, "nexus", None)
        if not isinstance(nexus_config, dict):
            raise ValueError(
                f"{type(self).__name__} needs the adapter config under 'nexus' in config.json; "
                "export the model with `nexus export --format vllm`"
            )
        spec = SharedExpertSpec(**nexus_config["spec"])
        dtype = vllm_config.model_config.dtype
        #: MoE layer -> its shared expert (layers of this pipeline stage only)
        self.nexus_layers: dict[int, VllmSharedExpert] = {}
        self.nexus_all_layers = [int(layer) for layer in nexus_config["layers"]]
        for layer in self.nexus_all_layers:
            decoder = self.model.layers[layer]
            if isinstance(decoder, PPMissingLayer):
                continue
            block = getattr(decoder, self.moe_attr)
            name = f"model.layers.{layer}.{self.moe_attr}.{ATTR}"
            block.add_module(ATTR, VllmSharedExpert(spec, dtype, prefix=name))
            block.register_forward_hook(_add_shared)
            self.nexus_layers[layer] = getattr(block, ATTR)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        adapter: dict[int, dict[str, torch.Tensor]] = {}

        def base_weights():
            for name, tensor in weights:
                m = ADAPTER_KEY.match(name)
                if m:
                    adapter.setdefault(int(m[1]), {})[m[2]] = tensor
                else:
                    yield name, tensor

        loaded = set(super().load_weights(base_weights()))
        unknown = sorted(set(adapter) - set(self.nexus_all_layers))
        if unknown:
            raise ValueError(
                f"adapter tensors layers.{unknown[0]}.* are for a layer the config does not list"
            )
        for layer, shared in self.nexus_layers.items():
            loaded.update(shared.load(adapter.get(layer, {})))
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
