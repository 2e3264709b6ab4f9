"""The job's YAML config, validated up front (pydantic, unknown keys rejected by name).

One file describes a whole run: the base model, the corpora, and one section per stage. The
stage sections are not written here: each IS its stage's config (:mod:`nexus.stages`), minus
the inputs the job wires in itself, plus ``enabled``. So ``collect: {batch_size: 8}`` is
``nexus collect --batch-size 8`` is ``collect.run(batch_size=8)``, with the same default and
bounds. The settings several stages share are set once: ``dtype`` and ``trust_remote_code``
under ``model:``, ``text_field``, ``corpus_format`` and ``text_unit`` under ``data:``, and
``seed`` at the top level.

Each stage's manifest hashes only what that stage runs with, so changing ``train.max_steps``
reruns training and evaluation but not collection.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal

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

from nexus.config import SETTING, SHARED_SETTINGS, StageConfig, meta, validation_message
from nexus.errors import NexusError
from nexus.stages import STAGES, StageSpec

DEMO = "demo"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _shared(home: str) -> dict:
    """The shared settings whose home is ``home``, as fields (declared once, in nexus.config)."""
    return {
        name: (field.annotation, copy.copy(field))
        for name, field in SHARED_SETTINGS.items()
        if meta(field)["home"] == home
    }


class _ModelSection(_Section):
    #: a model directory or Hub name, or ``demo`` for the built-in demo base
    path: str = DEMO
    demo_size: Literal["tiny", "small", "medium"] = "small"
    #: how the demo base stores its experts: ``float32`` as trained, or ``mxfp4`` exactly as
    #: the published GPT-OSS checkpoints do (the same base, quantised)
    demo_format: Literal["float32", "mxfp4"] = "float32"


class _DataSection(_Section):
    #: training (and sampling/collection) corpus; ``demo:<split>`` names a built-in demo split
    train: list[str] = Field(default_factory=lambda: ["demo:domain"])
    #: held-out corpora by name for evaluation
    eval: dict[str, list[str]] = Field(
        default_factory=lambda: {"domain": ["demo:domain_heldout"], "general": ["demo:general_heldout"]}
    )

    @field_validator("train")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("at least one corpus path is needed")
        return v


class PlanSection(_Section):
    """The memory check the job runs before its first stage (``nexus plan``'s prediction)."""

    #: refuse a stage whose predicted peak memory per worker exceeds its device's
    check: bool = True
    #: memory of one GPU in GB; None: asked from a GPU of the Ray cluster
    gpu_memory_gb: float | None = Field(None, gt=0)
    #: memory of one CPU node in GB; None: the Ray nodes' own
    cpu_memory_gb: float | None = Field(None, gt=0)


ModelSection = create_model("ModelSection", __base__=_ModelSection, **_shared("model"))
DataSection = create_model("DataSection", __base__=_DataSection, **_shared("data"))


def section_model(spec: StageSpec) -> type[_Section]:
    """The YAML section of a stage: its config's settings (not its inputs or shared settings),
    with the same types, defaults and bounds, the same multi-setting rules, and ``enabled``
    (unless the stage has a ``switch`` setting: ``export.format``)."""
    config: type[StageConfig] = spec.config
    fields = {name: (f.annotation, copy.copy(f)) for name, f in config.fields(SETTING).items()}
    if spec.switch is None and spec.enabled_by is None:  # else `switch` / `enabled_by` runs the stage
        fields["enabled"] = (bool, Field(spec.enabled, description=f"run the {spec.name} stage"))

    def rules(section):
        config.check(section)  # the config's rules read settings only, so they apply to the section
        return section

    return create_model(
        f"{spec.name.capitalize()}Section",
        __base__=_Section,
        __validators__={"_rules": model_validator(mode="after")(rules)},
        **fields,
    )


class _Job(_Section):
    #: where every stage writes its artifact (``<output>/<stage>/``): a local path, a shared
    #: filesystem mounted on every node, or a URI (``s3://``, ``gs://``...) mirrored through a
    #: local staging directory
    output: str = "runs/demo"
    #: Ray Train storage (local path or URI); default ``<output>/.ray``; must be shared storage
    #: for multi-node training
    storage_path: str | None = None
    model: ModelSection = Field(default_factory=ModelSection)  # type: ignore[valid-type]
    data: DataSection = Field(default_factory=DataSection)  # type: ignore[valid-type]
    plan: PlanSection = Field(default_factory=PlanSection)

    @field_validator("output")
    @classmethod
    def _output_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("an output directory is needed")
        return v

    @model_validator(mode="after")
    def _eval_during_training(self):
        if self.train.eval_every and not self.data.eval.get("domain"):
            raise ValueError("train.eval_every needs a held-out domain corpus under data.eval.domain")
        return self


SECTIONS = {s.name: section_model(s) for s in STAGES}

JobConfig = create_model(
    "JobConfig",
    __base__=_Job,
    **_shared(""),
    **{name: (section, Field(default_factory=section)) for name, section in SECTIONS.items()},
)


def shared_values(cfg: BaseModel, config: type[StageConfig]) -> dict:
    """The job's values of the shared settings ``config`` has (``model.dtype``, ``seed``, ...)."""
    out = {}
    for name, field in config.fields().items():
        home = meta(field).get("home")
        if home is not None:
            out[name] = getattr(getattr(cfg, home) if home else cfg, name)
    return out


def parse_config(data: dict | None, source: str = "config") -> BaseModel:
    try:
        return JobConfig.model_validate(data or {})
    except ValidationError as exc:
        raise NexusError(f"{source}: " + validation_message(exc, lambda key: f"config key '{key}'")) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> BaseModel:
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
