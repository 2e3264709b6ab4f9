"""A whole plan (every stage) as a table, JSON or a chart."""

from __future__ import annotations

import os
from dataclasses import dataclass

from nexus.planner.model import ModelFacts
from nexus.planner.stages import PART_NAMES, StagePlan
from nexus.planner.terms import teacher_bytes_per_token
from nexus.planner.units import GB, count_text, gb_text
from nexus.planner.verdict import Devices


@dataclass
class Plan:
    """Predicted peak memory of each stage's worker, with verdicts (see :func:`plan`)."""

    model: str
    facts: ModelFacts
    devices: Devices
    stages: dict[str, StagePlan]
    trainable_params: int

    @property
    def fits(self) -> bool | None:
        verdicts = [s.fits for s in self.stages.values()]
        return None if None in verdicts else all(verdicts)

    def to_dict(self) -> dict:
        f = self.facts
        return {
            "model": self.model,
            "family": f.family,
            "layers": f.layers,
            "moe_layers": len(f.moe_layers),
            "experts": f.experts,
            "top_k": f.top_k,
            "hidden_size": f.hidden,
            "vocab_size": f.vocab,
            "mxfp4": f.mxfp4,
            "parameters": f.expert_params + f.expert_bias_params + f.other_params,
            "trainable_params": self.trainable_params,
            "devices": self.devices.to_dict(),
            "fits": self.fits,
            "stages": {name: s.to_dict() for name, s in self.stages.items()},
        }

    def table(self) -> str:
        return format_plan(self)

    def failures(self) -> list[StagePlan]:
        return [s for s in self.stages.values() if s.fits is False]


def format_plan(p: Plan) -> str:
    """The plan as a text table: one column per stage, one row per part, per worker (in GB, or
    in MB when every stage stays under 1 GB)."""
    f = p.facts
    stages = list(p.stages.values())
    unit, unit_name = (GB, "GB") if max((s.peak for s in stages), default=GB) >= GB else (10**6, "MB")

    def cell(value: float | None, dash: bool = True) -> str:
        if value is None:
            return "?"
        return "-" if dash and not value else f"{value / unit:.1f}"

    n_params = f.expert_params + f.expert_bias_params + f.other_params
    experts = stages[0].workload.experts if stages else "dequantized"
    lines = [
        f"model: {p.model} ({f.family}: {f.layers} layers, {len(f.moe_layers)} MoE x {f.experts} experts, "
        f"top-{f.top_k}, hidden {f.hidden}, vocab {f.vocab:,}; {count_text(n_params)} parameters, "
        f"{count_text(p.trainable_params)} trainable)",
        f"experts: {experts}" + (f" (MXFP4 on disk: {f.packed_bytes / GB:.1f} GB)" if f.mxfp4 else ""),
        "",
    ]
    rows = [
        ("worker", [f"{s.workload.device.upper()} x{s.workload.workers}" for s in stages]),
        ("batch x seq_len", [f"{s.workload.batch_size} x {s.workload.seq_len}" for s in stages]),
        ("dtype", [s.workload.dtype for s in stages]),
    ]
    rows += [
        (part, [cell(s.parts.get(part, 0.0)) for s in stages])
        for part in PART_NAMES
        if any(s.parts.get(part) for s in stages)
    ]
    rows += [
        (f"peak per worker ({unit_name})", [cell(s.peak, dash=False) for s in stages]),
        (f"available ({unit_name})", [cell(s.available, dash=False) for s in stages]),
        ("fits", [{True: "yes", False: "NO", None: "?"}[s.fits] for s in stages]),
    ]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(s.stage), *(len(cells[i]) for _, cells in rows)) for i, s in enumerate(stages)]
    lines.append(" " * width + "  " + "  ".join(s.stage.rjust(c) for s, c in zip(stages, cols)))
    lines += [
        label.ljust(width) + "  " + "  ".join(x.rjust(c) for x, c in zip(cells, cols))
        for label, cells in rows
    ]
    lines.append("")
    for s in stages:
        lines.extend(_stage_notes(s))
    return "\n".join(lines).rstrip() + "\n"


def _stage_notes(s: StagePlan) -> list[str]:
    w = s.workload
    out = []
    if s.stage == "train":
        on = "on" if w.gradient_checkpointing else "off"
        other = "no checkpointing" if w.gradient_checkpointing else "checkpointing"
        mine = "checkpointing" if w.gradient_checkpointing else "no checkpointing"
        out.append(
            f"train: {w.strategy}, peak during {s.phase}; activations at most {gb_text(s.activations[mine])} "
            f"with gradient checkpointing {on}, {gb_text(s.activations[other])} with it "
            f"{'off' if w.gradient_checkpointing else 'on'}; KD teacher {w.teacher}"
            + (
                f" (top-{w.teacher_k} rows of `nexus distill`: {teacher_bytes_per_token(w.teacher_k)} bytes per "
                "token stored and read)"
                if w.teacher == "offline"
                else ""
            )
        )
    for note in s.notes:
        out.append(f"{s.stage}: {note}")
    if s.fits is False:
        out.append(
            f"{s.stage}: does NOT fit ({gb_text(s.peak)} > {gb_text(s.available)}); " + "; or ".join(s.advice)
        )
    return out


def plot_plan(p: Plan, path: str | os.PathLike) -> None:
    """Stacked bars of each stage's parts (GB per worker) with its device memory as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(p.stages)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4.5))
    bottoms = [0.0] * len(names)
    for part in PART_NAMES:
        values = [p.stages[n].parts.get(part, 0.0) / GB for n in names]
        if any(values):
            ax.bar(names, values, bottom=bottoms, label=part)
            bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, n in enumerate(names):
        available = p.stages[n].available
        if available:
            ax.hlines(available / GB, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
    ax.set_ylabel("GB per worker (dashed: device memory)")
    ax.set_title(f"nexus plan: {os.path.basename(str(p.model).rstrip('/')) or p.model}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
