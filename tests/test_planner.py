"""``nexus plan``: the memory arithmetic against the formats, the published GPT-OSS shapes from
config.json alone, verdicts and advice, the job's preflight, and predictions against measured
peaks of the real stages (``tests/memory_probe.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import nexus
from nexus.errors import NexusError
from nexus.planner import GB, model_facts, parse_size
from nexus.planner.units import gb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from memory_probe import CASES  # noqa: E402

#: published GPT-OSS shapes: (layers, experts); hidden = expert width = 2880, top-4, vocab 201,088
GPT_OSS = {"gpt-oss-20b": (24, 32), "gpt-oss-120b": (36, 128)}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """Directories holding only GPT-OSS-20B's and -120B's config.json (as published, MXFP4)."""
    from convert_memory import gpt_oss_20b_config

    root = tmp_path_factory.mktemp("gpt_oss_configs")
    out = {}
    for name, (layers, experts) in GPT_OSS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(gpt_oss_20b_config(layers, experts, 2880)))
        out[name] = root / name
    return out


def _facts(path: Path):
    from nexus.models.loading import load_config

    return model_facts(load_config(path))


# -- arithmetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GB", 80 * 10**9),
        ("79GiB", 79 * 2**30),
        ("141 gb", 141 * 10**9),
        ("512MB", 512 * 10**6),
        ("24", 24 * GB),
    ],
)
def test_sizes_parse_with_their_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["80XB", "GB", "-4GB", "0", "eighty"])
def test_bad_sizes_are_refused_in_one_line(text):
    with pytest.raises(NexusError, match="give a number with a unit|more than zero"):
        parse_size(text, "GPU memory")


def test_packed_replica_is_exactly_the_mxfp4_checkpoint(published):
    """Packed frozen weights in bf16 = every byte of the published checkpoint's tensors (the
    convert benchmark's writer lists them: uint8 blocks and scales, bf16 for the rest)."""
    from convert_memory import _nbytes, tensor_list

    from nexus.planner import Workload, frozen_weights

    for name, (layers, experts) in GPT_OSS.items():
        f = _facts(published[name])
        tensors = tensor_list(layers, experts, 2880)
        mxfp4 = sum(_nbytes(d, s) for n, d, s in tensors if n.endswith(("_blocks", "_scales")))
        assert f.packed_bytes == mxfp4
        # 4.25 bits per weight: 16 bytes of nibbles and one scale byte per 32 weights
        assert f.packed_bytes * 32 == f.expert_params * 17
        w = Workload("collect", "gpu", 1, 1, 128, "bfloat16", "packed")
        resident, working = frozen_weights(f, w)
        assert resident == sum(_nbytes(d, s) for _, d, s in tensors)
        # working memory: one scratch of gate_up's 2I x H in bf16, the 256 KB decoding table and
        # the int32 indices of one chunk of 2**20 blocks (17 x 4 bytes each) on a GPU
        assert working == 2 * 2880 * 2880 * 2 + 65536 * 4 + min(2 * 2880 * 90, 1 << 20) * 17 * 4


def test_design_arithmetic_of_the_published_shapes(published):
    """/work/shared/DESIGN.md section 5: expert parameters, MXFP4 and bf16 sizes, trainable state."""
    from nexus.planner import shared_params

    f120, f20 = _facts(published["gpt-oss-120b"]), _facts(published["gpt-oss-20b"])
    assert (f120.layers, f120.experts, f120.top_k, f120.vocab) == (36, 128, 4, 201_088)
    assert f120.expert_params == 36 * 128 * (2880 * 5760 + 2880 * 2880)  # 114.6 B
    assert round(f120.packed_bytes / GB) == 61 and round(f120.expert_params * 2 / GB) == 229
    assert round(f120.other_params / 1e9, 1) == 2.1  # attention, embeddings, unembedding
    assert round(f20.expert_params / 1e9, 1) == 19.1 and round(f20.packed_bytes / GB) == 10
    # one shared expert per layer at the experts' width (+ its biases and scalar gate), fp32
    # weights + gradients + AdamW moments: 16 bytes per parameter
    one = 2880 * 5760 + 2880 * 2880 + 5760 + 2880 + 1
    assert shared_params(f120, None, "scalar", False) == 36 * one
    assert round(16 * 36 * one / GB, 1) == 14.3 and round(16 * 24 * one / GB, 1) == 9.6


# -- the published shapes, from config.json alone ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(GPT_OSS))
def test_plan_reads_only_config_json(name, published, capsys):
    from nexus.cli import main

    argv = [
        "plan",
        "--model",
        str(published[name]),
        "--gpus",
        "2",
        "--gpu-memory",
        "98GB",
        "--dtype",
        "bfloat16",
    ]
    status = main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in published[name].iterdir()) == ["config.json"]  # no weights to read
    assert status == (0 if out["fits"] else 1)
    assert out["mxfp4"] and out["layers"] == GPT_OSS[name][0] and out["experts"] == GPT_OSS[name][1]
    assert set(out["stages"]) == {"collect", "train", "evaluate"}
    for stage in out["stages"].values():
        assert stage["settings"]["experts"] == "packed"  # auto: packed for MXFP4 checkpoints
        assert stage["device"] == "gpu" and stage["available_gb"] == 98.0
        assert stage["peak_gb"] == pytest.approx(sum(stage["parts_gb"].values()), abs=0.05)
        assert stage["fits"] == (stage["peak_gb"] <= 98.0)
    train = out["stages"]["train"]
    assert {"frozen weights", "trainable shared experts", "gradients", "AdamW state", "activations"} <= set(
        train["parts_gb"]
    )
    assert set(train["activations_gb"]) == {"checkpointing", "no checkpointing"}
    assert train["activations_gb"]["checkpointing"] < train["activations_gb"]["no checkpointing"]
    # the text table carries the same numbers
    main(argv)
    table = capsys.readouterr().out
    assert f"{train['peak_gb']:.1f}" in table.split("peak per worker (GB)")[1].split("\n")[0]


def test_example_configs_fit_the_gpus_they_name(published):
    """jobs/configs: 120B fits two 98 GB GPUs (not 80 GB ones), 20B one 40 GB GPU (not 24 GB)."""
    from nexus.job.config import load_config

    def plan(name: str, memory: str, gpus: int):
        return nexus.plan(
            published[name], config=ROOT / "jobs" / "configs" / f"{name}.yaml", gpus=gpus, gpu_memory=memory
        )

    big = plan("gpt-oss-120b", "98GB", 2)
    assert big.fits and all(s.workload.device == "gpu" for s in big.stages.values())
    assert 80 * GB < big.stages["train"].peak < 98 * GB
    small = plan("gpt-oss-120b", "80GB", 2)
    assert small.stages["train"].fits is False and small.stages["collect"].fits
    assert any("convert.intermediate_size" in a for a in small.stages["train"].advice)
    assert plan("gpt-oss-20b", "40GB", 1).fits
    assert plan("gpt-oss-20b", "24GB", 1).stages["train"].fits is False
    # the tables in the configs' comments are the plan's
    for name, memory, gpus in (("gpt-oss-120b", "98GB", 2), ("gpt-oss-20b", "40GB", 1)):
        text = (ROOT / "jobs" / "configs" / f"{name}.yaml").read_text()
        table = plan(name, memory, gpus).table().split("\n\n")[1]
        assert all(f"# {line}".rstrip() in text for line in table.splitlines()), name
        assert load_config(ROOT / "jobs" / "configs" / f"{name}.yaml").model.experts == "packed"


def test_settings_move_memory_the_right_way(published):
    d = published["gpt-oss-20b"]
    base = dict(gpus=1, gpu_memory="80GB", dtype="bfloat16", batch_size=2, seq_len=1024)

    def peak(stage="train", **changes):
        return nexus.plan(d, **{**base, **changes}).stages[stage].peak

    assert peak(batch_size=4) > peak() and peak(seq_len=2048) > peak()
    assert peak(gradient_checkpointing=True) < peak(gradient_checkpointing=False)
    assert peak(intermediate_size=1440) < peak()
    assert peak(kd_weight=0) < peak()
    for stage in ("collect", "train", "evaluate"):
        assert peak(stage, experts="packed") < peak(stage, experts="dequantized")


def test_advice_names_a_setting_that_fits(published):
    result = nexus.plan(
        published["gpt-oss-20b"], gpus=1, gpu_memory="40GB", dtype="bfloat16", batch_size=4, seq_len=2048,
        gradient_checkpointing=False, stages=("train",),
    )  # fmt: skip
    train = result.stages["train"]
    assert train.fits is False
    assert train.advice[0].startswith("set train.gradient_checkpointing: true")
    predicted = float(train.advice[0].rsplit("-> ", 1)[1].split()[0])
    assert predicted <= 40.0
    assert "does NOT fit" in result.table()


def test_packed_experts_need_an_mxfp4_checkpoint(tiny_model_dir):
    with pytest.raises(NexusError, match="packed experts need an MXFP4 checkpoint"):
        nexus.plan(tiny_model_dir, experts="packed")


def test_plan_command_registers_without_importing_torch():
    code = (
        "import sys; from nexus.cli import build_parser; "
        "build_parser('plan').parse_args(['plan', '--model', 'x']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the job's preflight ------------------------------------------------------------------------------


def _tiny_job(tiny_model_dir, tmp_path, **sections):
    from nexus.job.config import parse_config

    data = {
        "output": str(tmp_path / "run"),
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": ["x.jsonl"], "eval": {"domain": ["x.jsonl"]}},
        "collect": {"seq_len": 64},
        "train": {"seq_len": 32},
        "evaluate": {"seq_len": 32},
    }
    for key, values in sections.items():
        data.setdefault(key, {}).update(values)
    return parse_config(data)


def test_preflight_passes_a_tiny_job_and_refuses_one_that_does_not_fit(ray_cluster, tiny_model_dir, tmp_path):
    from nexus.job.run import JobContext

    JobContext(_tiny_job(tiny_model_dir, tmp_path)).preflight()  # this machine's memory: fits
    cramped = _tiny_job(tiny_model_dir, tmp_path, plan={"cpu_memory_gb": 0.001})
    with pytest.raises(NexusError, match=r"stage collect will not fit: predicted peak .* MB per worker"):
        JobContext(cramped).preflight()
    skipped = _tiny_job(tiny_model_dir, tmp_path, plan={"cpu_memory_gb": 0.001, "check": False})
    JobContext(skipped).preflight()


def test_job_check_names_the_stage_the_peak_and_the_fix(published, tmp_path):
    from nexus.job.config import load_config as load_job
    from nexus.models.loading import load_config
    from nexus.planner import Devices, check_job, make_plan

    cfg = load_job(
        ROOT / "jobs" / "configs" / "gpt-oss-120b.yaml", [f"model.path={published['gpt-oss-120b']}"]
    )
    config = load_config(published["gpt-oss-120b"])
    check_job(cfg, config, Devices(gpus=2, gpu_memory=98 * GB, cpu_memory=512 * GB))
    with pytest.raises(NexusError) as err:
        check_job(cfg, config, Devices(gpus=2, gpu_memory=80 * GB, cpu_memory=512 * GB))
    train = make_plan("120b", config, cfg, Devices(gpus=2, gpu_memory=80 * GB)).stages["train"]
    assert str(err.value) == (
        f"stage train will not fit: predicted peak {train.peak / GB:.1f} GB per worker, 80.0 GB available "
        f"(GPU); {train.advice[0]} (nexus plan shows the parts; plan.check: false skips this check)"
    )
    # first the change that keeps the training as it is: the base sharded over the two GPUs
    assert train.advice[0].startswith("set train.strategy: fsdp -> ")
    assert train.advice[1].startswith("set convert.intermediate_size: ")
    # a GPU of unknown memory is not judged
    check_job(cfg, config, Devices(gpus=2, gpu_memory=None, cpu_memory=512 * GB))


# -- predictions against measured peaks -----------------------------------------------------------


@pytest.fixture(scope="module")
def measured_models(tmp_path_factory) -> dict[str, Path]:
    from memory_probe import CASES, write_shape

    root = tmp_path_factory.mktemp("planner_models")
    return {name: write_shape(name, root) for name in {case[0] for case in CASES}}


#: every shape in the default run (training: g20, g20p, qwen; collection: deep); the other
#: cases of the same shapes in the extended run (NEXUS_EXTENDED=1)
EXTENDED_CASES = {("g20", "collect"), ("deep", "train"), ("qwen", "collect")}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.extended) if c[:2] in EXTENDED_CASES else c for c in CASES],
    ids=lambda c: "-".join(map(str, c)),
)
def test_prediction_within_20_percent_of_the_measured_peak(measured_models, case):
    from memory_probe import compare

    row = compare(case, measured_models[case[0]])
    # 20%: the bar; the formulas count tensors, the allocator and untracked buffers differ
    assert abs(row["ratio"] - 1) <= 0.20, row


# -- bases larger than one GPU: ddp vs fsdp ---------------------------------------------------------


@pytest.fixture(scope="module")
def larger_than_a_gpu(tmp_path_factory) -> dict[str, Path]:
    """Qwen3-235B-A22B's and DeepSeek-V3's published config.json, nothing else."""
    from published_configs import write_config_dirs

    return write_config_dirs(tmp_path_factory.mktemp("published"))


@pytest.mark.parametrize(("name", "fsdp_gpus"), [("qwen3-235b-a22b", 4), ("deepseek-v3", 16)])
def test_plan_reports_ddp_and_fsdp_per_gpu_and_says_which_is_needed(larger_than_a_gpu, name, fsdp_gpus):
    settings = dict(
        gpu_memory="141GB", dtype="bfloat16", batch_size=1, seq_len=4096, gradient_checkpointing=True
    )
    train = {
        (strategy, gpus): nexus.plan(
            larger_than_a_gpu[name], gpus=gpus, workers=gpus, strategy=strategy, stages=("train",), **settings
        ).stages["train"]
        for strategy in ("ddp", "fsdp")
        for gpus in (8, 16)
    }
    full = train["ddp", 8].parts["frozen weights"]
    assert train["ddp", 16].parts["frozen weights"] == full  # a replica per worker
    for gpus in (8, 16):
        assert train["fsdp", gpus].parts["frozen weights"] == pytest.approx(full / gpus)
        assert train["fsdp", gpus].peak < train["ddp", gpus].peak
        assert train["ddp", gpus].fits is False
        assert train["fsdp", gpus].fits is (gpus >= fsdp_gpus)
        if gpus >= fsdp_gpus:  # the advice: the same workers with the base sharded
            assert train["ddp", gpus].advice[0].startswith("set train.strategy: fsdp -> ")
    # the plan names the strategy and the smallest GPU count that fits
    note = " ".join(train["ddp", 8].notes)
    assert f"train.strategy: fsdp and train.workers: {fsdp_gpus} or more" in note
    # forward-only stages have no FSDP path: the plan says to split the model over a node's GPUs
    collect = nexus.plan(larger_than_a_gpu[name], gpus=1, stages=("collect",), **settings).stages["collect"]
    assert collect.fits is False and any("device_map" in n for n in collect.notes)


def test_qwen3_235b_example_config_table_is_the_plan(larger_than_a_gpu):
    from nexus.job.config import load_config

    path = ROOT / "jobs" / "configs" / "qwen3-235b-a22b.yaml"
    result = nexus.plan(
        larger_than_a_gpu["qwen3-235b-a22b"], config=path, gpus=8, gpu_memory="141GB", cpu_memory="1536GB"
    )
    assert result.fits and result.stages["train"].workload.strategy == "fsdp"
    text = path.read_text()
    assert all(f"# {line}".rstrip() in text for line in result.table().split("\n\n")[1].splitlines())
    assert load_config(path).train.strategy == "fsdp"
    # the comment's other claims: DDP does not fit; 16 GPUs of 80 GB do with FSDP
    ddp = nexus.plan(larger_than_a_gpu["qwen3-235b-a22b"], config=path, gpus=8, gpu_memory="141GB",
                     strategy="ddp", stages=("train",))  # fmt: skip
    assert ddp.stages["train"].fits is False and f"{gb(ddp.stages['train'].peak):.0f}" == "514"
    small = nexus.plan(larger_than_a_gpu["qwen3-235b-a22b"], config=path, gpus=16, gpu_memory="80GB",
                       overrides=["train.workers=16"], stages=("train",))  # fmt: skip
    assert small.fits and f"{gb(small.stages['train'].peak):.1f}" == "49.0"
