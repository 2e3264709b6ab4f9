"""``report.md``: what the run did and what it gained, for a person to read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nexus.stages.evaluate import format_table
from nexus.stages.evaluate_tasks import format_task_table
from nexus.util.artifacts import write_json


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _selection_summary(selection: dict) -> list[str]:
    rule = selection.get("rule", {})
    lines = [
        f"Importance `{selection.get('importance')}`, rule {rule}, {selection.get('tokens')} tokens of router statistics.",
        "",
        "| layer | selected experts | importance covered | PC1 variance share |",
        "|---:|---|---:|---:|",
    ]
    for layer in selection.get("layers", []):
        entry = selection["per_layer"][str(layer)]
        ev = entry.get("explained_variance_ratio") or [0.0]
        lines.append(
            f"| {layer} | {', '.join(map(str, entry['experts']))} | {entry['fraction']:.1%} | {ev[0]:.1%} |"
        )
    return lines


def write_report(ctx, results) -> Path:
    """Write ``<output>/report.md`` (and copy its plots into ``<output>/report_assets``)."""
    out = ctx.output
    assets = out / "report_assets"
    assets.mkdir(exist_ok=True)
    lines = ["# NEXUS specialisation report", ""]
    lines += [f"- base model: `{ctx.model_dir}`", f"- output: `{out}`", ""]
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} |" for r in results]
    evaluation = _load(out / "evaluate" / "evaluation.json")
    if evaluation:
        lines += ["", "## Held-out perplexity", "", format_table(evaluation)]
    if evaluation and evaluation.get("tasks"):
        lines += [
            "",
            "## Downstream tasks (lm-evaluation-harness)",
            "",
            format_task_table(evaluation["tasks"]),
        ]
        lines += [
            "",
            "Accuracy ± the harness's standard error; same settings and seed for both models: "
            f"{evaluation['tasks']['settings']}.",
        ]
    summary = _load(out / "train" / "train_summary.json")
    if summary:
        final = summary.get("final", {})
        lines += ["", "## Training", ""]
        lines += [
            f"{summary['steps']} steps, {summary['tokens']} tokens; final loss {final.get('loss', float('nan')):.4f}."
        ]
    selection = _load(out / "analyze" / "selection.json")
    if selection:
        lines += ["", "## Expert selection", "", *_selection_summary(selection)]
    plots = [
        ("train/train_curves.png", "Training curves"),
        ("evaluate/perplexity.png", "Perplexity before and after"),
        ("analyze/plots/importance_heatmap.png", "Expert importance"),
        ("analyze/plots/explained_variance.png", "Explained variance of router probabilities"),
    ]
    shown = []
    for rel, title in plots:
        src = out / rel
        if src.is_file():
            dst = assets / rel.replace("/", "_")
            shutil.copy2(src, dst)
            shown.append(f"### {title}\n\n![{title}]({dst.relative_to(out)})\n")
    if shown:
        lines += ["", "## Plots", "", *shown]
    if evaluation and evaluation.get("generations"):
        lines += ["", "## Sample generations (same prompts, same seed)", ""]
        for g in evaluation["generations"]:
            lines += [f"**Prompt:** `{g['prompt']!r}`", "", f"- base: `{g['base']!r}`"]
            if "specialised" in g:
                lines.append(f"- specialised: `{g['specialised']!r}`")
            lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    write_json(
        out / "stages.json", [{"stage": r.name, "status": r.status, "seconds": r.seconds} for r in results]
    )
    return path
