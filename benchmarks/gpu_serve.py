"""GPU check of serving: the vLLM plugin on a GPU (CUDA kernels, CUDA graphs, MXFP4), in < 8 minutes.

The CPU serving test (tests/test_serving.py) runs every family on vLLM's CPU build; what only a
GPU exercises is vLLM's CUDA path: Triton/CUTLASS fused-MoE kernels, CUDA-graph capture with the
shared expert inside the graph, and GPT-OSS with MXFP4 experts (vLLM's CPU backend has no MXFP4
MoE kernel). This script, on one H100/H200 with vLLM (CUDA build, the version ``./dev`` pins)
and NEXUS installed in ``--vllm-python``'s environment:

1. exports tiny models of GPT-OSS, Qwen3-MoE, Mixtral and OLMoE (the serving test's shapes) and
   checks, in bf16 with CUDA graphs, that the NEXUS architecture loads and a zero adapter equals
   vLLM's base model bit for bit (bf16 kernels make transformers-vs-vLLM equality a tolerance
   question, which the CPU test settles in fp32);
2. builds a GPT-OSS-20B-shaped model cut to ``--layers`` layers (hidden and expert width 2880,
   32 experts top-4, 64/8 heads of 64, vocabulary 201,088), random weights, experts stored as
   MXFP4 like the released checkpoint, with a NEXUS adapter of the experts' width on every
   layer, and measures decode tokens/s of base and NEXUS at batch 1 and 16 (CUDA graphs on);
   target: NEXUS >= 0.9x base.

It prints one JSON line (also written to ``benchmarks/results/gpu_serve.json``).

    python benchmarks/gpu_serve.py --vllm-python /path/to/vllm-env/bin/python
    python benchmarks/gpu_serve.py --tiny --vllm-python .venv-vllm/bin/python   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FAMILY_EXTRA = {
    "gpt_oss": {"sliding_window": 8},
    "qwen3_moe": {"moe_intermediate_size": 64},
    "mixtral": {},
    "olmoe": {},
}


def gpt_oss_20b_cut(layers: int, tiny: bool):
    from transformers import GptOssConfig

    if tiny:
        shape = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, num_local_experts=4, vocab_size=320)  # fmt: skip
    else:
        shape = dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                     head_dim=64, num_local_experts=32, vocab_size=201_088)  # fmt: skip
    return GptOssConfig(
        num_hidden_layers=layers,
        num_experts_per_tok=4 if not tiny else 2,
        sliding_window=128,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **shape,
    )


def write_mxfp4_model(config, out: Path) -> Path:
    """Random bf16 model with its experts re-stored as MXFP4 blocks/scales (as released)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from nexus.weights import mxfp4

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    for file in sorted(out.glob("*.safetensors")):
        sd = load_file(str(file))
        for key in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            sd[f"{key}_blocks"], sd[f"{key}_scales"] = mxfp4.encode(sd.pop(key).float().transpose(1, 2))
        save_file(sd, str(file), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        for key in [
            k for k in data["weight_map"] if k.endswith(("experts.gate_up_proj", "experts.down_proj"))
        ]:
            shard = data["weight_map"].pop(key)
            data["weight_map"][f"{key}_blocks"] = data["weight_map"][f"{key}_scales"] = shard
        index.write_text(json.dumps(data))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def export_with_adapter(base: Path, work: Path, name: str, zero: bool = False, **attach) -> Path:
    import nexus
    from nexus.stages.export import export_vllm

    model = nexus.load_model(base)
    nexus.attach_shared_experts(model, init="zero" if zero else "random", seed=4, **attach)
    nexus.save_adapter(model, work / f"{name}-adapter")
    return export_vllm(base, work / f"{name}-adapter", work / name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", required=True, help="python of an environment with vLLM and NEXUS")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, eager, fp32: a CPU smoke test")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_serve.json"))
    args = p.parse_args(argv)
    from model_dirs import write_tiny_model_dir
    from tiny_models import VLLM_SHAPES

    from nexus.serving.vllm_run import run_in_vllm_env

    started = time.perf_counter()
    dtype, eager = ("float32", True) if args.tiny else ("bfloat16", False)
    result: dict = {"families": {}, "decode": {}}
    with tempfile.TemporaryDirectory(prefix="nexus-gpu-serve-") as tmp:
        work = Path(tmp)
        models = {}
        for family, extra in FAMILY_EXTRA.items():
            base = write_tiny_model_dir(
                work / f"{family}-base", family=family, seed=3, **VLLM_SHAPES, **extra
            )
            models[f"{family}/base"] = str(base)
            models[f"{family}/nexus"] = str(export_with_adapter(base, work, f"{family}-nexus"))
            models[f"{family}/zero"] = str(export_with_adapter(base, work, f"{family}-zero", zero=True))
        prompts = [[1, *range(40, 51)], [1, *range(200, 222, 2)]]
        job = {"models": models, "prompts": prompts, "max_tokens": 32, "dtype": dtype, "enforce_eager": eager}
        out = run_in_vllm_env(args.vllm_python, job, work)
        for family in FAMILY_EXTRA:
            base, nexus_out, zero = (out[f"{family}/{k}"] for k in ("base", "nexus", "zero"))
            result["families"][family] = {
                "arch": nexus_out["arch"],
                "zero_equals_base": zero["generated"] == base["generated"]
                and zero["prompt_logprobs"] == base["prompt_logprobs"],
                "adapter_changes_output": nexus_out["prompt_logprobs"] != base["prompt_logprobs"],
            }

        base = write_mxfp4_model(gpt_oss_20b_cut(args.layers, args.tiny), work / "gpt-oss-cut")
        export = export_with_adapter(base, work, "gpt-oss-cut-nexus")
        vocab = 320 if args.tiny else 201_088
        prompts = torch.randint(3, vocab, (16, 64), generator=torch.Generator().manual_seed(0)).tolist()
        job = {
            "models": {"base": str(base), "nexus": str(export)},
            "prompts": prompts,
            "max_tokens": 0,
            "dtype": dtype,
            "enforce_eager": eager,
            "max_model_len": 64 + args.new_tokens + 8,
            "timing": {"batch_sizes": [1, 16], "new_tokens": args.new_tokens, "repeats": 3},
        }
        out = run_in_vllm_env(args.vllm_python, job, work)
        result["decode"] = {k: v.get("tokens_per_s") for k, v in out.items()}
        result["nexus_vs_base"] = {bs: out["nexus"]["tokens_per_s"][bs] / out["base"]["tokens_per_s"][bs]
                                   for bs in out["base"]["tokens_per_s"]}  # fmt: skip
    result["seconds"] = time.perf_counter() - started
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    line = json.dumps(result)
    print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
