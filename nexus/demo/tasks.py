"""The demo's downstream tasks: complete a line, for held-out docstrings and code.

Two lm-evaluation-harness multiple-choice tasks, generated offline from the demo corpus's
held-out splits (modules the base model and the training never saw):

* ``nexus_demo_docstrings`` (the domain): a few lines of a held-out docstring and the start
  of the next line, cut at a space; four candidate endings of that line: the true one and
  three line endings of about its length from *other* held-out docstrings;
* ``nexus_demo_code`` (general text): the same on held-out source code.

Each is a harness task YAML next to a JSON Lines data file (``context``, ``choices``,
``label``), so it runs with ``TaskManager(include_path=<dir>)`` and no network. Generation is
deterministic for a seed (``random.Random`` seeded with a string, the lines taken in corpus
order), and :func:`ensure_demo_tasks` caches the directory in the demo cache, keyed by the
corpus content, the seed, the question count and :data:`TASKS_VERSION`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from nexus.demo.corpus import DOMAIN_HELDOUT, GENERAL_HELDOUT

#: bump when the questions change, so cached task directories are rebuilt
TASKS_VERSION = 3
#: questions per task: a standard error of about 0.035 on an accuracy near 0.5, in well
#: under a minute of CPU for base and specialised together on the small demo model
QUESTIONS = 200
CHOICES = 4
#: ``demo:<name>`` in ``evaluate.tasks`` -> (harness task name, held-out split it comes from)
DEMO_TASKS = {
    "docstrings": ("nexus_demo_docstrings", DOMAIN_HELDOUT),
    "code": ("nexus_demo_code", GENERAL_HELDOUT),
}
#: a line qualifies for a question or a distractor when its stripped length is in this range
LINE_CHARS = (16, 100)
#: the answer, the rest of the line after a space, has this many characters
ANSWER_CHARS = (12, 40)
CONTEXT_LINES = 6
CONTEXT_CHARS = 400
#: distractors are within this many characters of the answer's length (a log-likelihood
#: favours short text; with free lengths a weak model picks the shortest choice, not the best)
LENGTH_SLACK = 4
#: at most this many questions per document, so a few long modules cannot dominate a task
PER_DOCUMENT = 3


def _good(line: str) -> bool:
    text = line.strip()
    return LINE_CHARS[0] <= len(text) <= LINE_CHARS[1] and any(c.isalpha() for c in text)


def _context(lines: list[str], i: int) -> str:
    """Up to CONTEXT_LINES whole lines before line ``i`` (at most CONTEXT_CHARS), each ending in a newline."""
    picked: list[str] = []
    for line in reversed(lines[max(0, i - CONTEXT_LINES) : i]):
        if sum(len(x) + 1 for x in picked) + len(line) + 1 > CONTEXT_CHARS:
            break
        picked.insert(0, line)
    return "".join(f"{line}\n" for line in picked)


def _cuts(line: str, lo: int, hi: int) -> list[int]:
    """Positions of spaces in ``line`` after its first word whose tail ``line[p:]`` (which
    starts with the space) has ``lo`` to ``hi`` characters and a letter."""
    start = len(line) - len(line.lstrip())
    return [
        p
        for p, c in enumerate(line)
        if c == " " and p > start and lo <= len(line) - p <= hi and any(x.isalpha() for x in line[p:])
    ]


def completion_questions(rows: list[dict], n: int, seed: str, choices: int = CHOICES) -> list[dict]:
    """Up to ``n`` questions ``{"context", "choices", "label", "source"}`` from corpus rows
    (``{"text", "source"}``): the lines before, and the start of a line cut at a space; the
    true rest of that line among ``choices - 1`` line ends of about its length taken from
    other sources (and ending no line of the question's own source)."""
    rng = random.Random(seed)
    docs = [(row["source"], row["text"].splitlines()) for row in rows]
    pool = [(src, line) for src, lines in docs for line in lines if _good(line)]
    lines_of: dict[str, list[str]] = {}
    for src, lines in docs:
        lines_of.setdefault(src, []).extend(lines)
    candidates = [(d, i) for d, (_, lines) in enumerate(docs) for i in range(len(lines)) if _good(lines[i])]
    rng.shuffle(candidates)
    taken: dict[int, int] = {}
    questions = []
    for d, i in candidates:
        if len(questions) == n:
            break
        source, lines = docs[d]
        cuts = _cuts(lines[i], *ANSWER_CHARS)
        if not cuts or taken.get(d, 0) >= PER_DOCUMENT:
            continue
        cut = cuts[rng.randrange(len(cuts))]
        answer = lines[i][cut:]
        others: list[str] = []
        while len(others) < choices - 1:
            src, line = pool[rng.randrange(len(pool))]
            tails = _cuts(line, len(answer) - LENGTH_SLACK, len(answer) + LENGTH_SLACK)
            if src == source or not tails:
                continue
            tail = line[tails[rng.randrange(len(tails))] :]
            # about the answer's length: the choice rests on content, not on length
            if tail != answer and tail not in others and not any(x.endswith(tail) for x in lines_of[source]):
                others.append(tail)
        label = rng.randrange(choices)
        questions.append(
            {
                "context": _context(lines, i) + lines[i][:cut],
                "choices": [*others[:label], answer, *others[label:]],
                "label": label,
                "source": source,
            }
        )
        taken[d] = taken.get(d, 0) + 1
    return questions


def task_yaml(name: str, data_file: Path) -> dict:
    """The harness config of a line-completion task reading ``data_file`` (an absolute path)."""
    metric = {"aggregation": "mean", "higher_is_better": True}
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        # the context ends before a space and each choice starts with it
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", **metric}, {"metric": "acc_norm", **metric}],
        "metadata": {"version": TASKS_VERSION},
    }


def write_demo_tasks(
    corpus_dir: str | Path, out: str | Path, *, seed: int = 0, questions: int = QUESTIONS
) -> Path:
    """Write both demo tasks (YAML + JSONL) into ``out``; data paths in the YAML point at
    ``final`` (``out`` itself unless the caller renames it, see :func:`ensure_demo_tasks`)."""
    return _write(Path(corpus_dir), Path(out), Path(out), seed=seed, questions=questions)


def _write(corpus_dir: Path, out: Path, final: Path, *, seed: int, questions: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for short, (name, split) in DEMO_TASKS.items():
        rows = [json.loads(line) for line in (corpus_dir / f"{split}.jsonl").read_text().splitlines() if line]
        items = completion_questions(rows, questions, seed=f"{seed}-{short}")
        (out / f"{name}.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in items))
        (out / f"{name}.yaml").write_text(yaml.safe_dump(task_yaml(name, final.resolve() / f"{name}.jsonl")))
    return out


def ensure_demo_tasks(corpus_dir: str | Path, *, seed: int = 0, questions: int = QUESTIONS) -> Path:
    """The demo task directory in the demo cache (beside the corpus), written if missing."""
    from nexus.demo import _lock
    from nexus.demo.corpus import read_manifest
    from nexus.util.artifacts import atomic_dir, sha256_json

    corpus_dir = Path(corpus_dir)
    sha = read_manifest(corpus_dir)["content_sha256"]
    key = sha256_json({"corpus": sha, "seed": seed, "questions": questions, "version": TASKS_VERSION})
    final = corpus_dir.parent / f"tasks-{key[:16]}"
    if not (final / "manifest.json").is_file():
        with _lock(corpus_dir.parent):
            if not (final / "manifest.json").is_file():
                with atomic_dir(final, overwrite=True) as tmp:
                    _write(corpus_dir, tmp, final, seed=seed, questions=questions)
                    manifest = {"corpus": sha, "seed": seed, "questions": questions, "version": TASKS_VERSION}
                    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return final


def resolve_task(spec: str) -> str | None:
    """The harness name of ``demo:<name>`` (None when ``spec`` is not a demo task); a one-line
    error for an unknown demo task."""
    from nexus.errors import NexusError

    if not spec.startswith("demo:"):
        return None
    short = spec.split(":", 1)[1]
    if short not in DEMO_TASKS:
        raise NexusError(
            f"unknown demo task '{spec}'; choose one of {', '.join(f'demo:{k}' for k in DEMO_TASKS)}"
        )
    return DEMO_TASKS[short][0]
