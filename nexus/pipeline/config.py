"""The job's YAML config, validated up front (pydantic, unknown keys rejected by name).

One file describes a whole run: which base model, which corpora, and one section per
stage. Each stage's manifest hashes only its own section (plus its inputs), so changing
``train.max_steps`` reruns training and evaluation but not collection.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from nexus.errors import NexusError
from nexus.train.config import TrainConfig

DEMO = "demo"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    #: a model directory or Hub name, or ``demo`` for the built-in demo base
    path: str = DEMO
    demo_size: Literal["tiny", "small"] = "small"
    #: how the demo base stores its experts: ``float32`` as trained, or ``mxfp4`` exactly as
    #: the published GPT-OSS checkpoints do (the same base, quantised)
    demo_format: Literal["float32", "mxfp4"] = "float32"
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto"] = "float32"
    #: how collect, train and evaluate hold the frozen routed experts: ``auto`` (packed for
    #: MXFP4 checkpoints, else dequantized), ``packed`` or ``dequantized``
    experts: Literal["auto", "packed", "dequantized"] = "auto"
    trust_remote_code: bool = False
    #: routed experts of MXFP4 checkpoints: kept packed on the device, or dequantised to
    #: ``dtype``; ``auto``: packed for MXFP4 checkpoints
    experts: Literal["auto", "packed", "dequantized"] = "auto"


class DataSection(_Section):
    #: training (and sampling/collection) corpus; ``demo:<split>`` names a built-in demo split
    train: list[str] = Field(default_factory=lambda: ["demo:domain"])
    #: held-out corpora by name for evaluation
    eval: dict[str, list[str]] = Field(
        default_factory=lambda: {"domain": ["demo:domain_heldout"], "general": ["demo:general_heldout"]}
    )
    text_field: str = "text"
    #: skip damaged documents (counted in each stage's output) instead of stopping at the first
    skip_bad_documents: bool = False

    @field_validator("train")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("at least one corpus path is needed")
        return v


class SampleSection(_Section):
    enabled: bool = True
    #: token budget of the calibration sample
    budget_tokens: int = Field(200_000, gt=0)
    idf: bool = False
    max_doc_tokens: int = Field(4096, gt=0)


class CollectSection(_Section):
    target_tokens: int = Field(200_000, gt=0)
    #: collector actors, one model each (spread them over spare machines)
    workers: int = Field(1, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    #: CPU threads per CPU collector; None: the cluster's CPUs split evenly (1 with GPUs)
    cpus_per_worker: float | None = Field(None, gt=0)
    #: memory Ray reserves per collector (GiB), so a node never holds more models than fit;
    #: scheduling only (not part of the stage's fingerprint)
    memory_gb: float | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    #: longest collected sequence; None: the model's maximum, capped at 1024
    seq_len: int | None = Field(None, gt=0)


class AnalyzeSection(_Section):
    importance: Literal["pca", "variance", "frequency", "gate"] = "pca"
    #: experts per layer; None: 24 capped at the layer's expert count
    top_k: int | None = Field(None, gt=0)
    threshold: float | None = Field(None, gt=0, le=1)
    plots: bool = True


class ConvertSection(_Section):
    init: Literal["pca", "zero", "random", "frequency", "gate"] = "pca"
    weighting: Literal["uniform", "importance"] = "uniform"
    intermediate_size: int | None = Field(None, gt=0)
    gate: Literal["scalar", "sigmoid", "none"] = "scalar"
    scale: float = 1.0


#: stage settings of ``train`` come from TrainConfig, minus what the job fills in itself
_JOB_OWNED = {
    "model",
    "corpus",
    "output",
    "adapter",
    "eval_corpus",
    "text_field",
    "skip_bad_documents",
    "init",
    "gate",
    "intermediate_size",
    "storage_path",
    "name",
    "trust_remote_code",
    "dtype",
    "experts",
}


#: per-key bounds of the training settings, so a bad value fails at load time naming its key
#: (TrainConfig.validate checks the same again, plus the rules that span several keys)
_TRAIN_BOUNDS: dict[str, dict] = {
    **{
        k: {"gt": 0}
        for k in (
            "workers",
            "cpus_per_worker",
            "max_steps",
            "max_tokens",
            "batch_size",
            "grad_accum",
            "seq_len",
            "max_doc_tokens",
            "lr",
            "kd_temperature",
            "loss_chunk",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
        )
    },
    **{
        k: {"ge": 0}
        for k in (
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "kd_weight",
            "router_kl_weight",
            "eval_every",
            "max_failures",
        )
    },
    "min_lr_ratio": {"ge": 0, "le": 1},
}


def _check_train(section: BaseModel) -> BaseModel:
    """Cross-key rules of TrainConfig (e.g. router_kl_weight needs train_router), at load time."""
    settings = {k: v for k, v in section.model_dump().items() if k != "seed"}
    probe = TrainConfig(model="-", corpus=["-"], output="-", eval_corpus=["-"], **settings)
    try:
        probe.validate()
    except NexusError as exc:
        raise ValueError(str(exc)) from None
    return section


def _train_section() -> type[BaseModel]:
    hints = typing.get_type_hints(TrainConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in _JOB_OWNED:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        hint = hints[f.name]
        if f.name in _TRAIN_BOUNDS:
            hint = Annotated[hint, Field(**_TRAIN_BOUNDS[f.name])]
        fields[f.name] = (hint, default)
    #: None: the job's top-level seed (like every other stage)
    fields["seed"] = (int | None, None)
    return create_model(
        "TrainSection",
        __base__=_Section,
        __validators__={"_cross_keys": model_validator(mode="after")(_check_train)},
        **fields,
    )


TrainSection = _train_section()


class EvaluateSection(_Section):
    enabled: bool = True
    seq_len: int = Field(256, gt=0)
    max_tokens: int = Field(65_536, gt=0)
    batch_size: int = Field(8, gt=0)
    generate_tokens: int = Field(40, ge=0)
    prompts: list[str] = Field(default_factory=list)
    #: where evaluation runs: with ``gpus`` > 0 or ``memory_gb`` set, in a Ray task with those
    #: resources (on a GPU node: ``cuda``); otherwise in the job's driver process on CPU
    gpus: float = Field(0.0, ge=0)
    cpus: float = Field(1.0, gt=0)
    memory_gb: float | None = Field(None, gt=0)


class ExportSection(_Section):
    #: None (default): no export stage; ``vllm``: a directory ``vllm serve`` runs (GPT-OSS,
    #: Qwen3-MoE, Mixtral, OLMoE); ``merged``: the adapter merged into the family's native
    #: shared expert, a stock checkpoint (DeepSeek-V2/V3, GLM4-MoE, ERNIE-4.5-MoE)
    format: Literal["vllm", "merged"] | None = None


class PlanSection(_Section):
    """The memory check the job runs before its first stage (``nexus plan``'s prediction)."""

    #: refuse a stage whose predicted peak memory per worker exceeds its device's
    check: bool = True
    #: memory of one GPU in GB; None: asked from a GPU of the Ray cluster
    gpu_memory_gb: float | None = Field(None, gt=0)
    #: memory of one CPU node in GB; None: the Ray nodes' own
    cpu_memory_gb: float | None = Field(None, gt=0)


class JobConfig(_Section):
    #: where every stage writes its artifact (``<output>/<stage>/``): a local path, a shared
    #: filesystem mounted on every node, or a URI (``s3://``, ``gs://``...) mirrored through a
    #: local staging directory
    output: str = "runs/demo"
    #: Ray Train storage (local path or URI); default ``<output>/.ray``; must be shared storage
    #: for multi-node training
    storage_path: str | None = None
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    collect: CollectSection = Field(default_factory=CollectSection)
    analyze: AnalyzeSection = Field(default_factory=AnalyzeSection)
    convert: ConvertSection = Field(default_factory=ConvertSection)
    train: TrainSection = Field(default_factory=TrainSection)  # type: ignore[valid-type]
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    export: ExportSection = Field(default_factory=ExportSection)
    plan: PlanSection = Field(default_factory=PlanSection)

    @field_validator("output")
    @classmethod
    def _output_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("an output directory is needed")
        return v

    @model_validator(mode="after")
    def _eval_during_training(self) -> JobConfig:
        if self.train.eval_every and not self.data.eval.get("domain"):
            raise ValueError("train.eval_every needs a held-out domain corpus under data.eval.domain")
        return self

    @property
    def train_seed(self) -> int:
        return self.seed if self.train.seed is None else self.train.seed


def _one_line(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown config key '{key}'")
        elif err["type"] == "value_error" and isinstance(err.get("input"), dict):
            parts.append(msg if not err["loc"] else f"config section '{key}': {msg}")
        else:
            parts.append(f"config key '{key}': {msg} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(parts)


def parse_config(data: dict | None, source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(data or {})
    except ValidationError as exc:
        raise NexusError(_one_line(exc, source)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job config (``None``: all defaults, the built-in demo) with ``key=value`` overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise NexusError(f"job config not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise NexusError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise NexusError(f"{p} must hold a mapping of config sections")
        source = str(p)
    return parse_config(apply_overrides(data, overrides), source)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """``section.key=value`` overrides applied to a config mapping (values parsed as YAML)."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise NexusError(f"bad override '{item}'; use section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise NexusError(f"bad override '{item}': {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return data


def section_dict(section: BaseModel) -> dict:
    return section.model_dump(mode="json")
