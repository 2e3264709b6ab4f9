"""The bad-input catalogue (docs/errors.md): one parametrized test per case.

Every case runs a real command line (``nexus ...``, the job as ``nexus specialize ...``, through
:func:`nexus.cli.main`) and checks what a user sees: a non-zero exit status, exactly one
line on stderr that names the problem (no traceback), and nothing left behind (no output
directory, no temporary directory, inputs untouched). The message, with the test's paths
replaced by placeholders, must appear verbatim in docs/errors.md, so the catalogue cannot
drift from the code. ``NEXUS_ERRORS_DUMP=FILE`` appends each case's command and message to
FILE as JSON lines (how docs/errors.md was written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"


@dataclass
class Inputs:
    """Read-only inputs shared by the cases (built once per module)."""

    root: Path
    model: Path  # tiny GPT-OSS: 2 MoE layers x 4 experts, 128 positions
    other: Path  # tiny Qwen3-MoE: another family, same layer and expert counts
    wide: Path  # tiny GPT-OSS with 8 experts per layer
    corpus: Path
    stats: Path  # router statistics of `model`
    selection: Path  # analysis of `stats`
    adapter: Path  # a zero-init adapter for `model`
    deepseek: Path  # tiny DeepSeek-V3 (ungated native shared expert: native merge)
    deepseek_adapter: Path  # scalar-gated adapter for `deepseek`
    deepseek_sigmoid: Path  # sigmoid-gated adapter for `deepseek`


@pytest.fixture(scope="module")
def inputs(ray_cluster, tiny_model_dir, tmp_path_factory) -> Inputs:
    import numpy as np
    from model_dirs import sample_texts, write_tiny_model_dir

    import nexus
    from nexus.models.identity import model_identity
    from nexus.stages import analyze
    from nexus.stages.collect import RouterCollector

    root = tmp_path_factory.mktemp("catalogue_inputs")
    other = write_tiny_model_dir(root / "qwen3_moe", family="qwen3_moe")
    wide = write_tiny_model_dir(root / "gpt_oss_8", num_local_experts=8)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(60)))

    collector = RouterCollector(tiny_model_dir)
    rng = np.random.default_rng(0)
    stats = collector.collect_batch([rng.integers(3, 300, 30) for _ in range(4)], [0, 1, 2, 3])
    stats.meta = {"kind": "nexus-router-stats", "identity": model_identity(collector.model.config)}
    (root / "stats").mkdir()
    stats.save(root / "stats")
    analyze.run(stats=root / "stats", output=root / "selection", top_k=2, plots=False)
    nexus.attach_shared_experts(collector.model, init="zero")
    nexus.save_adapter(collector.model, root / "adapter")
    del collector
    deepseek = write_tiny_model_dir(root / "deepseek_v3", family="deepseek_v3")
    for gate in ("scalar", "sigmoid"):
        model = nexus.load_model(deepseek)
        nexus.attach_shared_experts(model, init="zero", gate=gate)
        nexus.save_adapter(model, root / f"deepseek_{gate}")
    return Inputs(
        root,
        tiny_model_dir,
        other,
        wide,
        corpus,
        root / "stats",
        root / "selection",
        root / "adapter",
        deepseek,
        root / "deepseek_scalar",
        root / "deepseek_sigmoid",
    )


# -- the cases -------------------------------------------------------------------------------
# name -> (build(inputs, tmp) -> argv, expected regex, runner: "nexus" or "job")
CASES: dict[str, tuple] = {}


def case(name: str, expected: str, runner: str = "nexus", gpu: bool = False, hide: tuple[str, ...] = ()):
    """Register a case; ``hide`` names modules made unimportable for it (a missing extra)."""

    def register(build):
        CASES[name] = (build, expected, runner, gpu, hide)
        return build

    return register


def _copy_model(src: Path, tmp: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(src, tmp / name))


def _argv(command: str, defaults: dict, changes: dict) -> list[str]:
    """``command --flag value ...`` from defaults and changes (``--flag_name`` as ``flag_name``;
    True: a bare flag)."""
    argv = [command]
    for key, value in {**defaults, **changes}.items():
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def _collect(model, corpus, tmp, **changes) -> list[str]:
    defaults = dict(model=model, corpus=corpus, output=tmp / "stats", seq_len=64, target_tokens=500)
    return [*_argv("collect", defaults, changes), "--no-progress"]


def _train(model, corpus, tmp, **changes) -> list[str]:
    defaults = dict(model=model, corpus=corpus, output=tmp / "trained", seq_len=32, max_steps=2, batch_size=2)
    return _argv("train", defaults, changes)


def _evaluate(model, corpus, tmp, **changes) -> list[str]:
    defaults = dict(model=model, corpus=f"domain={corpus}", output=tmp / "eval", seq_len=32, max_tokens=256)
    return _argv("evaluate", defaults, changes)


def _sample(model, corpus, tmp, **changes) -> list[str]:
    return _argv(
        "sample", dict(model=model, corpus=corpus, output=tmp / "sample", target_tokens=500), changes
    )


def _convert(model, tmp, **changes) -> list[str]:
    return _argv("convert", dict(model=model, output=tmp / "adapter"), changes)


def _job(inp: Inputs, tmp: Path, **sections) -> list[str]:
    cfg = {
        "output": str(tmp / "run"),
        "model": {"path": str(inp.model)},
        "data": {"train": [str(inp.corpus)], "eval": {"domain": [str(inp.corpus)]}},
        "collect": {"seq_len": 64},
        "train": {"seq_len": 32},
        "evaluate": {"seq_len": 32},
    }
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["--config", str(path)]


# model directories


@case("dense-model", r"model type 'llama' is not a Mixture-of-Experts architecture")
def _(inp, tmp):
    d = tmp / "dense"
    d.mkdir()
    config = {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 4, "num_hidden_layers": 1}
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": 32}))
    return _collect(d, inp.corpus, tmp)


@case("missing-config-json", r"has no config\.json")
def _(inp, tmp):
    d = _copy_model(inp.model, tmp)
    (d / "config.json").unlink()
    return ["info", "--model", str(d)]


@case("malformed-config-json", r"config\.json is not valid JSON")
def _(inp, tmp):
    d = _copy_model(inp.model, tmp)
    (d / "config.json").write_text('{"model_type": "gpt_oss",')
    return _convert(d, tmp, init="zero")


@case("config-without-model-type", r"config\.json has no model_type")
def _(inp, tmp):
    d = _copy_model(inp.model, tmp)
    (d / "config.json").write_text(json.dumps({"hidden_size": 32}))
    return _train(d, inp.corpus, tmp)


@case("truncated-safetensors", r"model\.safetensors is truncated or corrupted")
def _(inp, tmp):
    d = _copy_model(inp.model, tmp)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return _collect(d, inp.corpus, tmp)


@case("corrupted-safetensors", r"model\.safetensors is truncated or corrupted")
def _(inp, tmp):
    d = _copy_model(inp.model, tmp)
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    return _train(d, inp.corpus, tmp)


@case("missing-shard", r"checkpoint shard model-00002-of-00002\.safetensors listed in .* is missing")
def _(inp, tmp):
    from safetensors.torch import load_file, save_file

    d = _copy_model(inp.model, tmp)
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "model-00002-of-00002.safetensors").unlink()
    return _collect(d, inp.corpus, tmp)


@case("pickled-weights-only", r"has no \.safetensors weights")
def _(inp, tmp):
    d = _copy_model(inp.model, tmp)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")  # never unpickled: refused by name
    return _evaluate(d, inp.corpus, tmp)


@case("missing-tokenizer", r"has no tokenizer \(tokenizer\.json\)")
def _(inp, tmp):
    d = _copy_model(inp.model, tmp)
    for f in d.glob("tokenizer*"):
        f.unlink()
    return _sample(d, inp.corpus, tmp)


@case("remote-code-without-flag", r"ships custom code .* pass --trust-remote-code")
def _(inp, tmp):
    d = _copy_model(inp.model, tmp)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomMoE"}
    (d / "config.json").write_text(json.dumps(cfg))
    return _collect(d, inp.corpus, tmp)


# corpora


@case("empty-corpus", r"the corpus is empty")
def _(inp, tmp):
    (tmp / "empty.jsonl").write_text("")
    return _collect(inp.model, tmp / "empty.jsonl", tmp)


@case("corpus-without-text-field", r"has no field 'text' \(line 1 has: body\); pass --text-field")
def _(inp, tmp):
    (tmp / "docs.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    return _train(inp.model, tmp / "docs.jsonl", tmp)


@case("parquet-without-text-column", r"has no column 'text' \(columns: body\); pass --text-field")
def _(inp, tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text"]}), tmp / "docs.parquet")
    return _sample(inp.model, tmp / "docs.parquet", tmp)


@case("not-parquet", r"docs\.parquet is not a readable Parquet file")
def _(inp, tmp):
    (tmp / "docs.parquet").write_text('{"text": "JSON in disguise"}\n')
    return _collect(inp.model, tmp / "docs.parquet", tmp)


@case("malformed-jsonl", r"line 2 is not valid JSON")
def _(inp, tmp):
    (tmp / "docs.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{'text': 'single quotes'}\n")
    return _evaluate(inp.model, tmp / "docs.jsonl", tmp)


@case("missing-corpus", r"corpus path not found")
def _(inp, tmp):
    return _sample(inp.model, tmp / "nowhere.jsonl", tmp)


# artifacts of another model


@case(
    "statistics-from-another-model",
    r"was made for a model with family=gpt_oss, but this model has family=qwen3_moe",
)
def _(inp, tmp):
    return ["analyze", "--stats", str(inp.stats), "--model", str(inp.other), "--output", str(tmp / "sel")]


@case(
    "selection-from-another-model",
    r"4 experts per layer, but this model has 8; it comes from a different model",
)
def _(inp, tmp):
    return _convert(inp.wide, tmp, selection=inp.selection)


@case(
    "adapter-from-another-model-evaluate",
    r"adapter .* was made for a model with family=gpt_oss, but this model has family=qwen3_moe",
)
def _(inp, tmp):
    return _evaluate(inp.other, inp.corpus, tmp, adapter=inp.adapter)


@case(
    "adapter-from-another-model-train",
    r"adapter .* was made for a model with num_experts=4, but this model has num_experts=8",
)
def _(inp, tmp):
    return _train(inp.wide, inp.corpus, tmp, adapter=inp.adapter)


@case("missing-statistics", r"router statistics directory not found: .*; run `nexus collect` first")
def _(inp, tmp):
    return ["analyze", "--stats", str(tmp / "stats"), "--output", str(tmp / "sel")]


@case("top-k-above-expert-count", r"top-k 9 is larger than the 4 experts per layer")
def _(inp, tmp):
    return ["analyze", "--stats", str(inp.stats), "--top-k", "9", "--output", str(tmp / "sel")]


# sizes, steps and settings


@case("zero-steps", r"argument --max-steps: Input should be greater than 0 \(got 0\)")
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, max_steps=0)


@case("negative-batch-size", r"argument --batch-size: Input should be greater than 0 \(got -2\)")
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, batch_size=-2)


@case("zero-target-tokens", r"argument --target-tokens: Input should be greater than 0 \(got 0\)")
def _(inp, tmp):
    return _collect(inp.model, inp.corpus, tmp, target_tokens=0)


@case("negative-seq-len", r"argument --seq-len: Input should be greater than 0 \(got -8\)")
def _(inp, tmp):
    return _evaluate(inp.model, inp.corpus, tmp, seq_len=-8)


@case("job-zero-workers", r"config key 'collect.workers': Input should be greater than 0 \(got 0\)", "job")
def _(inp, tmp):
    return _job(inp, tmp, collect={"workers": 0})


@case("unknown-config-key", r"unknown config key 'train.max_step'", "job")
def _(inp, tmp):
    return _job(inp, tmp, train={"max_step": 3})


@case("unknown-override-key", r"unknown config key 'colect'", "job")
def _(inp, tmp):
    return [*_job(inp, tmp), "--set", "colect.workers=2"]


@case("unknown-job-flag", r"nexus specialize: error: unrecognized arguments: --bogus", "job")
def _(inp, tmp):
    return [*_job(inp, tmp), "--bogus"]


@case("unknown-stage-to-force", r"unknown stage\(s\) to force: trian", "job")
def _(inp, tmp):
    return [*_job(inp, tmp), "--force", "trian"]


@case("seq-len-above-maximum-collect", r"seq_len 512 exceeds the model's maximum of 128 positions")
def _(inp, tmp):
    return _collect(inp.model, inp.corpus, tmp, seq_len=512)


@case("seq-len-above-maximum-train", r"seq_len 256 exceeds the model's maximum of 128 positions")
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, seq_len=256)


def _teacher(inp) -> Path:
    """A `nexus distill` output for `model` on `corpus`, covering `_train`'s blocks (built once)."""
    out = inp.root / "distill"
    if not out.is_dir():
        from nexus.stages import distill

        distill.run(
            model=inp.model, corpus=[inp.corpus], output=out, seq_len=32, batch_size=2, steps=2, top_k=8
        )
    return out


@case("train-offline-kd-without-teacher", r"--kd offline needs --teacher DIR")
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, kd="offline")


@case(
    "train-teacher-from-another-model",
    r"the distill output .* num_experts=4, but this model has num_experts=8",
)
def _(inp, tmp):
    return _train(inp.wide, inp.corpus, tmp, kd="offline", teacher=_teacher(inp))


@case("train-teacher-other-seq-len", r"has seq_len=32 but training uses 16")
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, seq_len=16, kd="offline", teacher=_teacher(inp))


@case("train-teacher-other-corpus", r"does not match the training data: block 0's tokens differ")
def _(inp, tmp):
    from model_dirs import sample_texts

    other = tmp / "other.jsonl"
    other.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(sample_texts(60))))
    return _train(inp.model, other, tmp, kd="offline", teacher=_teacher(inp))


@case("train-teacher-too-few-blocks", r"covers 4 blocks but training reads \d+")
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, max_steps=8, kd="offline", teacher=_teacher(inp))


@case("train-teacher-not-a-distill-output", r"distill manifest not found")
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, kd="offline", teacher=inp.adapter)


@case("seq-len-above-maximum-evaluate", r"seq_len 129 exceeds the model's maximum of 128 positions")
def _(inp, tmp):
    return _evaluate(inp.model, inp.corpus, tmp, seq_len=129)


@case(
    "job-seq-len-above-maximum",
    r"seq_len 256 exceeds the model's maximum of 128 positions; lower evaluate.seq_len",
    "job",
)
def _(inp, tmp):
    return _job(inp, tmp, evaluate={"seq_len": 256})


# output locations


@case("output-exists", r"output directory .*/sel already exists; pass --overwrite to replace it")
def _(inp, tmp):
    (tmp / "sel").mkdir()
    (tmp / "sel" / "selection.json").write_text("{}\n")  # must survive untouched
    return ["analyze", "--stats", str(inp.stats), "--output", str(tmp / "sel")]


@case("output-under-a-file", r"cannot create output location .*/notes\.txt: .*/notes\.txt is a file")
def _(inp, tmp):
    (tmp / "notes.txt").write_text("a regular file\n")
    return _convert(inp.model, tmp, init="zero", output=tmp / "notes.txt" / "adapter")


@case("output-not-writable", r"cannot write to output location /proc: No such file or directory")
def _(inp, tmp):
    return _sample(inp.model, inp.corpus, tmp, output="/proc/nexus-sample")


# export


def _export(model, adapter, tmp, fmt) -> list[str]:
    return [
        "export",
        "--format",
        fmt,
        "--model",
        str(model),
        "--adapter",
        str(adapter),
        "--output",
        str(tmp / "out"),
    ]


@case(
    "export-vllm-unsupported-family",
    r"vLLM export supports gpt_oss, mixtral, olmoe, qwen3_moe, not deepseek_v3",
)
def _(inp, tmp):
    return _export(inp.deepseek, inp.deepseek_adapter, tmp, "vllm")


@case(
    "export-vllm-rope-type",
    r"vLLM's GPT-OSS runs YaRN or plain RoPE, and this model's config.json has rope_type 'linear'",
)
def _(inp, tmp):
    d = _copy_model(inp.model, tmp)
    config = json.loads((d / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(config))
    return _export(d, inp.adapter, tmp, "vllm")


@case(
    "merge-family-without-native-shared-expert",
    r"gpt_oss has no native shared expert, so the adapter cannot be merged",
)
def _(inp, tmp):
    return _export(inp.model, inp.adapter, tmp, "merged")


@case(
    "merge-sigmoid-gate",
    r"uses a per-token sigmoid gate, which the ungated native shared expert of deepseek_v3",
)
def _(inp, tmp):
    return _export(inp.deepseek, inp.deepseek_sigmoid, tmp, "merged")


@case("merge-fp8-checkpoint", r"is FP8 block-quantised \(quant_method=fp8, weight_block_size=\[128, 128\]\)")
def _(inp, tmp):
    d = _copy_model(inp.deepseek, tmp)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(config))
    return _export(d, inp.deepseek_adapter, tmp, "merged")


# GPUs that are not there


@case(
    "gpus-for-collection",
    r"collection with 1 worker\(s\) asks for 1 GPU\(s\) but the Ray cluster has 0",
    gpu=True,
)
def _(inp, tmp):
    return _collect(inp.model, inp.corpus, tmp, gpus_per_worker=1)


@case("gpus-for-training", r"training asks for 1 GPU\(s\) but the Ray cluster has 0", gpu=True)
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, use_gpu=True)


@case(
    "job-gpus-for-training", r"train.use_gpu asks for 1 GPU\(s\) but the Ray cluster has 0", "job", gpu=True
)
def _(inp, tmp):
    return _job(inp, tmp, train={"use_gpu": True})


@case("fsdp-with-one-worker", r"strategy fsdp shards the base over the workers and needs at least 2")
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, strategy="fsdp")


@case("job-fsdp-with-one-worker", r"config key 'train': strategy fsdp .* needs at least 2", "job")
def _(inp, tmp):
    return _job(inp, tmp, train={"strategy": "fsdp"})


@case("gpu-for-evaluation", r"evaluation asks for 1 GPU\(s\) but the Ray cluster has 0", gpu=True)
def _(inp, tmp):
    return _evaluate(inp.model, inp.corpus, tmp, gpus=1)


# memory


@case("plan-bad-gpu-memory", r"bad GPU memory '80XB'; give a number with a unit")
def _(inp, tmp):
    return ["plan", "--model", str(inp.model), "--gpu-memory", "80XB"]


@case("plan-packed-experts-without-mxfp4", r"packed experts need an MXFP4 checkpoint \(GPT-OSS\)")
def _(inp, tmp):
    return ["plan", "--model", str(inp.model), "--experts", "packed"]


@case(
    "job-stage-does-not-fit",
    r"stage collect will not fit: predicted peak .* per worker, 32\.0 MB available",
    "job",
)
def _(inp, tmp):
    return _job(inp, tmp, plan={"cpu_memory_gb": 0.032})


# how the frozen routed experts are held (--experts, model.experts)


@case(
    "packed-experts-on-a-float-checkpoint",
    r"packed experts need an MXFP4 checkpoint \(GPT-OSS\), but .* stores its experts in a float dtype",
)
def _(inp, tmp):
    return _collect(inp.model, inp.corpus, tmp, experts="packed")


@case("packed-experts-on-an-fp8-checkpoint", r"stores its experts in block-scaled FP8 \(quant_method fp8\)")
def _(inp, tmp):
    from model_dirs import write_fp8_model_dir

    write_fp8_model_dir(tmp / "fp8")
    return _train(tmp / "fp8", inp.corpus, tmp, experts="packed")


@case(
    "unknown-experts-layout",
    r"argument --experts: invalid choice 'int4' \(choose from auto, packed, dequantized\)",
)
def _(inp, tmp):
    return _evaluate(inp.model, inp.corpus, tmp, experts="int4")


@case("job-packed-experts-on-a-float-checkpoint", r"packed experts need an MXFP4 checkpoint", runner="job")
def _(inp, tmp):
    return _job(inp, tmp, model={"experts": "packed"})


# downstream tasks (evaluate --tasks) and experiment trackers (train --report-to)


@case(
    "unknown-harness-task",
    r"unknown lm-evaluation-harness task\(s\): no_such_task \(not in the harness's catalogue or in .*/tasks\)",
)
def _(inp, tmp):
    (tmp / "tasks").mkdir()
    return _evaluate(inp.model, inp.corpus, tmp, tasks="no_such_task", task_dir=tmp / "tasks")


@case(
    "harness-not-installed",
    r"downstream tasks need lm-evaluation-harness, which is not installed: pip install 'nexus-moe\[eval\]'",
    hide=("lm_eval",),
)
def _(inp, tmp):
    return _evaluate(inp.model, inp.corpus, tmp, tasks="arc_easy")


@case(
    "job-unknown-demo-task",
    r"unknown demo task 'demo:quiz'; choose one of demo:docstrings, demo:code",
    runner="job",
)
def _(inp, tmp):
    return _job(inp, tmp, evaluate={"tasks": ["demo:quiz"]})


@case(
    "unknown-tracker",
    r"argument --report-to: invalid choice 'neptune' \(choose from tensorboard, mlflow, wandb\)",
)
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, report_to="neptune")


@case(
    "tracker-not-installed",
    r"report_to names mlflow, but mlflow is not installed: pip install 'nexus-moe\[mlflow\]'",
    hide=("mlflow",),
)
def _(inp, tmp):
    return _train(inp.model, inp.corpus, tmp, report_to="mlflow")


@case(
    "job-tracker-not-installed",
    r"report_to names wandb, but wandb is not installed: pip install 'nexus-moe\[wandb\]'",
    runner="job",
    hide=("wandb",),
)
def _(inp, tmp):
    return _job(inp, tmp, train={"report_to": ["wandb"]})


# -- the test ---------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with size and mtime (directories: None)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = None if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def _run(runner: str, argv: list[str]) -> int:
    from nexus.cli import main

    try:
        return main(["specialize", *argv] if runner == "job" else argv)
    except SystemExit as exc:  # argparse errors
        return int(exc.code or 0)


def _placeholders(text: str, paths: dict[str, Path]) -> str:
    for name, path in sorted(paths.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(path), name)
    return text


def test_catalogue_is_large_enough():
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, inputs, tmp_path, capsys, monkeypatch):
    build, expected, runner, gpu, hide = CASES[name]
    for module in hide:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    if gpu:
        import ray
        import torch

        if torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0):
            pytest.skip("this machine has GPUs")
    work = tmp_path / "work"
    work.mkdir()
    argv = build(inputs, work)
    before, inputs_before = _tree(tmp_path), _tree(inputs.root)
    capsys.readouterr()

    status = _run(runner, argv)

    out, err = capsys.readouterr()
    assert status == 2, (status, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one line on stderr, got: {err!r}"
    line = lines[0]
    assert line.startswith("nexus") and ": error: " in line, line
    assert re.search(expected, line), f"{line!r} does not match {expected!r}"
    # nothing left behind: no output, no temporary or probe directory, inputs unchanged
    assert _tree(tmp_path) == before
    assert _tree(inputs.root) == inputs_before
    assert not Path("/proc/nexus-sample").exists()

    paths = {"WORK": work, "INPUTS": inputs.root, "MODEL": inputs.model}
    shown = _placeholders(line, paths)
    command = " ".join(
        ["nexus specialize" if runner == "job" else "nexus", *(_placeholders(a, paths) for a in argv)]
    )
    if os.environ.get("NEXUS_ERRORS_DUMP"):
        with open(os.environ["NEXUS_ERRORS_DUMP"], "a") as f:
            f.write(json.dumps({"case": name, "command": command, "message": shown}) + "\n")
    doc = DOC.read_text()
    assert f"`{name}`" in doc, f"case {name} is not in {DOC}"
    assert shown in doc, f"the message of case {name} is not in {DOC}:\n{shown}"


def test_a_real_process_prints_one_line_and_debug_shows_the_traceback(inputs, tmp_path, capsys):
    """The same contract for a real ``python -m nexus`` process (logging set up, nothing captured);
    ``--debug`` re-raises instead, for a full traceback."""
    import subprocess
    import sys

    from nexus.cli import main
    from nexus.errors import NexusError

    argv = ["analyze", "--stats", str(inputs.stats), "--top-k", "9", "--output", str(tmp_path / "sel")]
    proc = subprocess.run(
        [sys.executable, "-m", "nexus", *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == "nexus: error: top-k 9 is larger than the 4 experts per layer in these statistics; choose at most 4\n"
    )
    assert not (tmp_path / "sel").exists()
    with pytest.raises(NexusError, match="top-k 9 is larger"):
        main(["--debug", *argv])
    assert not (tmp_path / "sel").exists()
