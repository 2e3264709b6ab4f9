"""Run exported models through vLLM's offline ``LLM`` API, inside vLLM's own environment.

    .venv-vllm/bin/python -m nexus.serving.vllm_run JOB.json OUT.json

Used by the serving test (tests/test_serving.py) and the decode-speed benchmark
(benchmarks/serve.py), which run in NEXUS's environment and call this in vLLM's (whose
pinned transformers differs). Imports nothing of NEXUS: vLLM finds the NEXUS architectures
through the plugin entry point, exactly as under ``vllm serve``.

JOB (JSON): ``models`` {name: directory}, ``prompts`` [[token ids]...], ``max_tokens``,
``dtype``, and optionally ``prompt_logprobs`` (default true), ``timing`` {``batch_sizes``,
``new_tokens``, ``repeats``}. For each model, one engine: greedy generations from every
prompt (EOS ignored) and the log-probability of every prompt token after the first; with
``timing``, generation tokens/s at each batch size (median of the repeats, after a warm-up).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: environment of the vLLM process: a small KV cache (GiB) for tiny models, the engine in the
#: calling process (one vLLM import instead of three processes), nothing fetched from a hub
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


def _engine(path: str, job: dict, lora_rank: int | None = None):
    from vllm import LLM

    # vLLM accepts only some max_lora_rank values: the smallest one that holds the adapter's rank
    max_rank = next((r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= (lora_rank or 0)), lora_rank)
    lora = {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": 1} if lora_rank else {}
    return LLM(
        **lora,
        model=path,
        dtype=job.get("dtype", "float32"),
        max_model_len=job.get("max_model_len", 256),
        enforce_eager=job.get("enforce_eager", True),
        seed=0,
        max_num_seqs=job.get("max_num_seqs", 16),
        # token ids in, token ids out: no tokenizer needed (the tests' toy tokenizers are not chat ones)
        skip_tokenizer_init=True,
        # one process: no engine-core and worker processes to start (each imports vLLM again)
        distributed_executor_backend="uni",
    )


def _generate(llm, prompts: list[list[int]], max_tokens: int, prompt_logprobs: bool, lora=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        ignore_eos=True,
        prompt_logprobs=0 if prompt_logprobs else None,
        detokenize=False,
    )
    return llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False, lora_request=lora
    )


def _tokens_per_s(llm, prompts: list[list[int]], timing: dict, lora=None) -> dict[str, float]:
    out = {}
    for bs in timing["batch_sizes"]:
        batch = [prompts[i % len(prompts)] for i in range(bs)]
        _generate(llm, batch, 4, False, lora)  # warm-up
        rates = []
        for _ in range(timing.get("repeats", 3)):
            started = time.perf_counter()
            _generate(llm, batch, timing["new_tokens"], False, lora)
            rates.append(bs * timing["new_tokens"] / (time.perf_counter() - started))
        out[str(bs)] = statistics.median(rates)
    return out


def run_model(path: str | dict, job: dict) -> dict:
    """One engine for ``path`` (a directory, or ``{"path", "lora", "rank"}`` for base + a PEFT LoRA)."""
    lora = None
    if isinstance(path, dict):
        from vllm.lora.request import LoRARequest

        lora, rank, path = LoRARequest("adapter", 1, path["lora"]), path["rank"], path["path"]
    started = time.perf_counter()
    try:
        llm = _engine(path, job, rank if lora else None)
    except Exception as exc:  # noqa: BLE001 (recorded: e.g. LoRA on fused experts unsupported on this backend)
        if lora is None:
            raise
        return {
            "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        }
    loaded = time.perf_counter()
    result = {"arch": llm.llm_engine.model_config.architecture, "generated": [], "prompt_logprobs": []}
    if job.get("max_tokens"):
        outputs = _generate(llm, job["prompts"], job["max_tokens"], job.get("prompt_logprobs", True), lora)
        for ids, out in zip(job["prompts"], outputs):
            result["generated"].append(list(out.outputs[0].token_ids))
            if out.prompt_logprobs is not None:
                # entry i (i >= 1) maps token ids to logprobs at prompt position i; entry 0 is None
                result["prompt_logprobs"].append(
                    [entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])]
                )
    if job.get("timing"):
        try:
            result["tokens_per_s"] = _tokens_per_s(llm, job["prompts"], job["timing"], lora)
        except Exception as exc:  # noqa: BLE001 (same: recorded, not fatal, for LoRA only)
            if lora is None:
                raise
            result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    result["load_s"] = loaded - started
    result["run_s"] = time.perf_counter() - loaded
    del llm
    gc.collect()
    return result


def run_in_vllm_env(python: str | os.PathLike, job: dict, workdir: Path, timeout: float = 1800) -> dict:
    """Run ``job`` with ``python`` (vLLM's environment) from NEXUS's environment; its results."""
    workdir = Path(workdir)
    (workdir / "vllm_job.json").write_text(json.dumps(job))
    out = workdir / "vllm_out.json"
    proc = subprocess.run(
        [os.path.abspath(python), "-m", "nexus.serving.vllm_run", str(workdir / "vllm_job.json"), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **VLLM_ENV},
        cwd=workdir,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"vLLM run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        job = json.load(f)
    results = {name: run_model(path, job) for name, path in job["models"].items()}
    with open(argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
