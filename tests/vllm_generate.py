"""Run in vLLM's own environment (``.venv-vllm``) by tests/test_serving.py and benchmarks/serve.py.

    python tests/vllm_generate.py JOB.json OUT.json

JOB: ``{"models": {name: dir}, "prompts": [[token ids]...], "max_tokens": 32,
"dtype": "float32", "prompt_logprobs": true}``. For each model, one vLLM engine (offline
``LLM`` API, the model's NEXUS architecture registered by the plugin that NEXUS's package
metadata names) generates greedily from every prompt; OUT gets, per model, the generated
token ids and the log-probability of every prompt token after the first. Imports nothing of
NEXUS itself: vLLM finds the plugin on its own, as under ``vllm serve``.
"""

from __future__ import annotations

import gc
import json
import sys
import time


def run_model(path: str, job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(
        model=path,
        dtype=job.get("dtype", "float32"),
        max_model_len=job.get("max_model_len", 256),
        enforce_eager=job.get("enforce_eager", True),
        seed=0,
        max_num_seqs=job.get("max_num_seqs", 16),
        # the tests' models have a toy tokenizer; vLLM needs none to work on token ids
        skip_tokenizer_init=job.get("skip_tokenizer_init", True),
        # one process: no engine-core and worker processes to start (each imports vLLM again)
        distributed_executor_backend="uni",
    )
    loaded = time.perf_counter()
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=job.get("max_tokens", 32),
        ignore_eos=True,
        prompt_logprobs=0 if job.get("prompt_logprobs", True) else None,
        detokenize=False,
    )
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {"generated": [], "prompt_logprobs": [], "arch": llm.llm_engine.model_config.architecture}
    for ids, out in zip(job["prompts"], outputs):
        result["generated"].append(list(out.outputs[0].token_ids))
        if out.prompt_logprobs is not None:
            # entry i (i >= 1) maps token ids to logprobs at prompt position i; entry 0 is None
            result["prompt_logprobs"].append(
                [entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])]
            )
    result["load_s"] = loaded - started
    result["generate_s"] = time.perf_counter() - loaded
    del llm
    gc.collect()
    return result


def main() -> None:
    job = json.load(open(sys.argv[1]))
    results = {name: run_model(path, job) for name, path in job["models"].items()}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
