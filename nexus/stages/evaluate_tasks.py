"""The evaluate stage's downstream tasks: lm-evaluation-harness, base vs specialised on one model.

The harness scores a model object directly (``HFLM(pretrained=<model>, tokenizer=...)``), so
the specialised model is the loaded model with its adapter and the base is the same object
inside :func:`nexus.shared_experts_disabled`, exactly as the perplexity comparison of
:mod:`nexus.stages.evaluate` does: no second load, no merged checkpoint. Both runs get the same harness settings (tasks, ``limit``,
few-shot count, batch size) and the same four seeds, so the two rows of the accuracy table
differ only by the shared experts.

Tasks are the harness's own (``arc_easy``, ``mmlu_anatomy``...; their data come from the
Hugging Face Hub) or local task YAMLs in a directory (``task_dir``, the harness's
``TaskManager(include_path=...)``) whose data are local JSON/JSONL files: those run offline
(``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``). ``lm_eval`` is an optional extra
(``pip install 'nexus-moe[eval]'``) and is imported only inside the functions that run tasks.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

from nexus.errors import NexusError

log = logging.getLogger(__name__)

#: the pip extra that brings lm-evaluation-harness
EXTRA = "eval"


def require_harness():
    """The ``lm_eval`` module, or a one-line error naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise NexusError(
            f"downstream tasks need lm-evaluation-harness, which is not installed: pip install 'nexus-moe[{EXTRA}]'"
        ) from None
    return lm_eval


def _dirs(task_dir: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if task_dir is None:
        return []
    items = [task_dir] if isinstance(task_dir, (str, Path)) else list(task_dir)
    dirs = [Path(d) for d in items]
    for d in dirs:
        if not d.is_dir():
            raise NexusError(f"task directory not found: {d}; pass --task-dir DIR holding task YAML files")
    return dirs


def resolve_tasks(
    specs: Sequence[str], task_dir: str | Path | None = None, *, seed: int = 0
) -> tuple[list[str], list[str]]:
    """``evaluate.tasks`` as harness task names, and the task directories they need:
    ``task_dir`` and, for ``demo:<name>``, the demo's tasks, written once into the demo cache
    beside the demo corpus (:func:`nexus.demo.tasks.ensure_demo_tasks`, generated with ``seed``)."""
    from nexus.demo.tasks import resolve_task

    names, dirs = [], [str(task_dir)] if task_dir else []
    for spec in specs:
        demo = resolve_task(spec)
        names.append(demo or spec)
        if demo:
            from nexus.demo import ensure_corpus
            from nexus.demo.tasks import ensure_demo_tasks

            dirs.append(str(ensure_demo_tasks(ensure_corpus(), seed=seed)))
    return names, list(dict.fromkeys(dirs))


def task_manager(tasks: Sequence[str], task_dir=None):
    """A harness ``TaskManager`` that knows every task in ``tasks``, or a one-line error.

    Indexing the harness's built-in catalogue reads thousands of YAML files (seconds to a
    minute), so when local directories are given they are indexed alone first and the
    catalogue only when some task is not found there.
    """
    if not tasks:
        raise NexusError("no downstream task given; pass --tasks NAME [NAME ...]")
    dirs = _dirs(task_dir)
    require_harness()
    include = tuple(str(d) for d in dirs)
    manager = _indexed(include, task_files_hash(dirs), False) if dirs else None
    if manager is None or set(tasks) - set(manager.all_tasks):
        manager = _indexed(include, task_files_hash(dirs), True)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = f" or in {', '.join(map(str, dirs))}" if dirs else ""
        raise NexusError(
            f"unknown lm-evaluation-harness task(s): {', '.join(missing)} (not in the harness's catalogue{where}); "
            "list them with `lm-eval ls tasks`, or pass --task-dir DIR holding their YAML"
        )
    return manager


@functools.lru_cache(maxsize=4)
def _indexed(include: tuple[str, ...], files_hash: str, defaults: bool):
    """A TaskManager per (directories, their content, catalogue or not), built once per process:
    the job checks its tasks before the first stage and runs them in the last."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def task_files_hash(task_dir) -> str:
    """SHA-256 over the relative names and contents of every file in the task directories, so
    a job reruns its evaluation when a task's YAML or data change (and only then)."""
    import hashlib

    h = hashlib.sha256()
    for d in _dirs(task_dir):
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(d)}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _scores(output: dict) -> dict:
    """``{task: {"questions": n, "metrics": {name: {"value", "stderr"}}}}`` from the harness's
    results (``"acc,none"``/``"acc_stderr,none"`` keys; a filter other than ``none`` is named
    in the metric, e.g. ``exact_match (strict-match)``)."""
    samples = output.get("n-samples", {})
    out: dict = {}
    for task, entry in output["results"].items():
        metrics = {}
        for key, value in entry.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = entry.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric} ({filt})"
            metrics[name] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            }
        out[task] = {"questions": samples.get(task, {}).get("effective"), "metrics": metrics}
    return out


def run_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    manager,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict:
    """Scores of ``model`` as it is now (with or without its shared experts) on ``tasks``."""
    lm_eval = require_harness()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return _scores(output)


def compare_on_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    specialised: bool,
    task_dir=None,
    manager=None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict:
    """Run ``tasks`` on the base (``model`` inside ``shared_experts_disabled``) and, when
    ``specialised``, on ``model`` itself, with the same settings; returns the JSON block that
    ``evaluation.json`` stores under ``tasks``."""
    from nexus.method.attach import shared_experts_disabled

    manager = manager or task_manager(tasks, task_dir)
    settings = dict(limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, seed=seed)
    start = time.perf_counter()
    with shared_experts_disabled(model):
        base = run_tasks(model, tokenizer, tasks, manager, **settings)
    spec = run_tasks(model, tokenizer, tasks, manager, **settings) if specialised else None
    log.info("downstream tasks %s: %.1fs", ", ".join(tasks), time.perf_counter() - start)
    results = {}
    for task, entry in base.items():
        rows = {}
        for metric, b in entry["metrics"].items():
            row = {"base": b["value"], "base_stderr": b["stderr"]}
            if spec is not None:
                s = spec[task]["metrics"][metric]
                row.update(
                    specialised=s["value"], specialised_stderr=s["stderr"], change=s["value"] - b["value"]
                )
            rows[metric] = row
        results[task] = {"questions": entry["questions"], "metrics": rows}
    return {
        "settings": {
            "tasks": list(tasks),
            **settings,
            "lm_eval": getattr(require_harness(), "__version__", None),
        },
        "results": results,
    }


def _pm(value: float, stderr: float | None) -> str:
    if stderr is None or not math.isfinite(stderr):
        return f"{value:.3f}"
    return f"{value:.3f} ± {stderr:.3f}"


def format_task_table(block: dict) -> str:
    """The accuracy table (markdown): value ± the harness's standard error, base vs
    specialised, and the change in absolute points of the metric."""
    lines = [
        "| task | questions | metric | base | specialised | change |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for task, entry in block["results"].items():
        for metric, r in entry["metrics"].items():
            spec = _pm(r["specialised"], r["specialised_stderr"]) if "specialised" in r else "-"
            change = f"{r['change']:+.3f}" if "change" in r else "-"
            base = _pm(r["base"], r["base_stderr"])
            lines.append(f"| {task} | {entry['questions'] or '-'} | {metric} | {base} | {spec} | {change} |")
    return "\n".join(lines)
