"""The pipeline's stages, in order: one module per stage, named for it.

Each stage module ``nexus/stages/<name>.py`` (``train`` is a package) holds:

- ``<Name>Config``: its :class:`~nexus.config.StageConfig`, the one declaration of its
  settings, from which its CLI flags, YAML section, keywords and fingerprint come;
- ``run(cfg)`` (or ``run(**kwargs)`` with the config's field names): the stage itself;
- ``summary_lines(result, cfg)``: what ``nexus <name>`` prints when it is done;
- ``job_inputs(job)``: where its inputs come from inside the job (the model, the corpus, the
  artifacts of the stages listed in ``after`` below).

This table is all the CLI needs to list the commands (``nexus --help`` imports no stage), and
all the job needs to order them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name (= module = CLI command = job section), what it is, what it reads."""

    name: str
    #: one line for ``nexus --help``
    help: str
    #: stages whose artifacts it reads in the job
    after: tuple[str, ...] = ()
    #: whether the job runs it unless ``<name>.enabled`` says otherwise
    enabled: bool = True
    #: a setting that switches the stage on in the job when it is set (not None), in place of
    #: ``enabled`` (export: ``format``, the one thing the stage needs to be told)
    switch: str | None = None
    #: ``(stage, setting, value)``: the job runs this stage exactly when another stage's setting
    #: has that value, in place of ``enabled`` (distill: when ``train.kd`` is ``offline``)
    enabled_by: tuple[str, str, str] | None = None

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"nexus.stages.{self.name}")

    @property
    def config(self):
        """The stage's config class, ``<Name>Config``."""
        return getattr(self.module, f"{self.name.capitalize()}Config")


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "sample", "choose a calibration subset covering the vocabulary (lazy greedy / GreeDi on Ray Data)"
    ),
    StageSpec(
        "collect", "collect per-layer router statistics of a model on a corpus (Ray Data actors)", ("sample",)
    ),
    StageSpec(
        "analyze",
        "select important experts per layer from router statistics (PCA, ESFT scores)",
        ("collect",),
    ),
    StageSpec(
        "convert",
        "average the selected experts into initial shared-expert weights (an adapter)",
        ("analyze",),
    ),
    StageSpec(
        "distill",
        "the frozen base's top-k log-probabilities over training's blocks, for offline KD (Ray Data actors)",
        enabled_by=("train", "kd", "offline"),
    ),
    StageSpec("train", "train the shared experts (Ray Train, DDP)", ("convert", "distill")),
    StageSpec("evaluate", "perplexity of the base and the specialised model on held-out text", ("train",)),
    StageSpec(
        "export",
        "write a vLLM model directory (GPT-OSS, Qwen3-MoE, Mixtral, OLMoE) or a stock checkpoint with the "
        "adapter merged into the native shared expert (DeepSeek-V2/V3, GLM4-MoE, ERNIE-4.5-MoE)",
        ("train",),
        switch="format",
    ),
)

BY_NAME = {s.name: s for s in STAGES}
