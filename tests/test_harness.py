"""Downstream tasks through lm-evaluation-harness, offline, on a tiny model and a local task.

The harness's accuracy for the base model must equal a direct computation of the same
multiple-choice log-likelihoods (sum of the continuation tokens' log-probabilities per choice,
argmax; acc_norm divides by the choice's length in characters); the specialised row must
equal the base row for a zero adapter and differ from it for a non-zero one. The demo tasks
are checked for determinism and for what a question is: the true end of a line of a held-out
document among line endings of other documents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from model_dirs import sample_texts

import nexus
from nexus.stages.evaluate_tasks import compare_on_tasks, format_task_table

TASK = "nexus_test_next_line"


@pytest.fixture(autouse=True)
def offline():
    """conftest.py sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE before anything imports
    ``datasets`` (which reads them once, at import): every task here runs without a network."""
    import datasets.config

    assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE


@pytest.fixture(scope="module")
def task_dir(tiny_model_dir, tmp_path_factory):
    """A local multiple-choice task written here: a line of stdlib text, and four one-token
    pieces of text to continue it with. One token each, so that the choice depends on the model's
    next-token distribution (with longer choices of different lengths, a random tiny model
    always prefers the one with the fewest tokens, whatever its adapter)."""
    from nexus.models.loading import load_tokenizer

    d = tmp_path_factory.mktemp("tasks")
    tok = load_tokenizer(tiny_model_dir)
    pieces = [tok.decode([i]) for i in range(3, tok.vocab_size)]
    pieces = [p for p in pieces if p.isprintable() and p.strip() == p and p]
    lines = [
        ln.strip()[:60].rstrip() for t in sample_texts(60) for ln in t.splitlines() if len(ln.strip()) > 12
    ]
    docs = []
    for q in range(8):
        context = lines[3 * q]
        ctx = tok(context).input_ids
        # pieces that stay one token after this context (no merge across the boundary)
        ok = [
            p
            for p in pieces
            if tok(context + p).input_ids[: len(ctx)] == ctx
            and len(tok(context + p).input_ids) == len(ctx) + 1
        ]
        choices = [ok[(7 * q + 13 * k) % len(ok)] for k in range(4)]
        docs.append({"context": context, "choices": choices, "label": q % 4})
    (d / "data.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (d / "task.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return d


def _direct_scores(model, tokenizer, docs) -> dict[str, list[float]]:
    """Per-question acc and acc_norm from the model's own log-probabilities, without the harness."""
    acc, acc_norm = [], []
    for doc in docs:
        ctx = tokenizer(doc["context"]).input_ids
        lls = []
        for choice in doc["choices"]:
            ids = tokenizer(doc["context"] + choice).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            lls.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
        lengths = [len(c) for c in doc["choices"]]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
        normed = [ll / n for ll, n in zip(lls, lengths)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == doc["label"]))
    return {"acc": acc, "acc_norm": acc_norm}


@pytest.fixture(scope="module")
def direct(tiny_model_dir, task_dir) -> dict[str, list[float]]:
    from nexus.models.loading import load_tokenizer

    docs = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    return _direct_scores(nexus.load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), docs)


def _run(model, tokenizer, task_dir, **kw):
    return compare_on_tasks(model, tokenizer, [TASK], task_dir=task_dir, batch_size=4, seed=0, **kw)


def test_base_accuracy_equals_direct_loglikelihoods_and_zero_adapter_row_equals_base(
    tiny_model_dir, task_dir, direct
):
    from nexus.models.loading import load_tokenizer

    model = nexus.load_model(tiny_model_dir)
    nexus.attach_shared_experts(model, init="zero")  # specialised == base, bitwise

    block = _run(model, load_tokenizer(tiny_model_dir), task_dir, specialised=True)

    entry = block["results"][TASK]
    assert entry["questions"] == len(direct["acc"])
    for metric, per_question in direct.items():
        row = entry["metrics"][metric]
        n = len(per_question)
        mean = sum(per_question) / n
        # accuracies are counts over the questions: exact equality
        assert row["base"] == mean, (metric, row, per_question)
        # the harness's standard error of a mean: sample standard deviation / sqrt(n)
        sd = math.sqrt(sum((x - mean) ** 2 for x in per_question) / (n - 1))
        assert row["base_stderr"] == pytest.approx(sd / math.sqrt(n), rel=1e-12)
        assert row["specialised"] == row["base"] and row["change"] == 0.0
        assert row["specialised_stderr"] == row["base_stderr"]
    assert 0 < direct["acc"].count(1.0) < len(direct["acc"])  # neither all right nor all wrong
    assert block["settings"] == {
        "tasks": [TASK],
        "limit": None,
        "batch_size": 4,
        "num_fewshot": None,
        "seed": 0,
        "lm_eval": block["settings"]["lm_eval"],
    }


def test_cli_scores_a_non_zero_adapter_differently_from_the_base(
    ray_cluster, tiny_model_dir, task_dir, direct, tmp_path, capsys
):
    """``nexus evaluate --tasks ... --task-dir ...``: evaluation.json and the printed table get
    the accuracy table; a non-zero adapter changes the specialised row, not the base row."""
    from nexus.cli import main

    model = nexus.load_model(tiny_model_dir)
    nexus.attach_shared_experts(model, init="random")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a shared expert as large as the routed ones: it changes the answers
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    nexus.save_adapter(model, tmp_path / "adapter")
    corpus = tmp_path / "held.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(40)))
    argv = ["evaluate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter")]
    argv += ["--corpus", f"domain={corpus}", "--seq-len", "32", "--max-tokens", "256", "--output"]
    argv += [str(tmp_path / "eval"), "--tasks", TASK, "--task-dir", str(task_dir), "--task-batch-size", "4"]
    capsys.readouterr()

    assert main(argv) == 0

    printed = capsys.readouterr().out
    block = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["tasks"]
    assert format_task_table(block) in printed
    rows = block["results"][TASK]["metrics"]
    for metric, per_question in direct.items():
        assert rows[metric]["base"] == sum(per_question) / len(per_question)
    assert any(r["specialised"] != r["base"] for r in rows.values()), rows
    assert all(r["change"] == r["specialised"] - r["base"] for r in rows.values())


def test_demo_tasks_are_deterministic_line_completions(demo_tiny, tmp_path):
    from nexus.demo.tasks import DEMO_TASKS, LENGTH_SLACK, write_demo_tasks

    corpus_dir, _ = demo_tiny
    a = write_demo_tasks(corpus_dir, tmp_path / "a", seed=0, questions=40)
    b = write_demo_tasks(corpus_dir, tmp_path / "b", seed=0, questions=40)
    c = write_demo_tasks(corpus_dir, tmp_path / "c", seed=1, questions=40)
    for name, split in DEMO_TASKS.values():
        data = (a / f"{name}.jsonl").read_text()
        assert data == (b / f"{name}.jsonl").read_text()
        assert data != (c / f"{name}.jsonl").read_text()
        lines: dict[str, list[str]] = {}
        for line in (corpus_dir / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            lines.setdefault(row["source"], []).extend(row["text"].splitlines())
        questions = [json.loads(line) for line in data.splitlines()]
        assert len(questions) == 40
        for q in questions:
            answer = q["choices"][q["label"]]
            assert len(set(q["choices"])) == 4 and all(ch.startswith(" ") for ch in q["choices"])
            # the answer completes the context's last line, a line of the question's source ...
            assert q["context"].splitlines()[-1] + answer in lines[q["source"]]
            # ... and every distractor ends a line of another source, and no line of this one
            for k, other in enumerate(q["choices"]):
                if k != q["label"]:
                    assert abs(len(other) - len(answer)) <= LENGTH_SLACK
                    ends = {s for s, ls in lines.items() if any(x.endswith(other) for x in ls)}
                    assert ends and q["source"] not in ends, other


def test_demo_tasks_run_in_the_harness(demo_tiny, tmp_path):
    from nexus.demo.tasks import DEMO_TASKS, write_demo_tasks
    from nexus.models.loading import load_tokenizer

    corpus_dir, model_dir = demo_tiny
    tasks_dir = write_demo_tasks(corpus_dir, tmp_path / "tasks", seed=0, questions=6)
    names = [name for name, _ in DEMO_TASKS.values()]
    model = nexus.load_model(model_dir)
    block = compare_on_tasks(
        model, load_tokenizer(model_dir), names, specialised=False, task_dir=tasks_dir, batch_size=8
    )
    for name in names:
        entry = block["results"][name]
        assert entry["questions"] == 6
        assert set(entry["metrics"]) == {"acc", "acc_norm"}
        assert "specialised" not in entry["metrics"]["acc"]
    assert "| nexus_demo_code | 6 | acc |" in format_task_table(block)


def _demo_cache(demo_tiny, tmp_path, monkeypatch) -> Path:
    """A demo cache holding (a copy of) the tiny demo corpus, found by ``ensure_corpus``: the
    demo tasks are written beside it (the stdlib is not gathered again)."""
    import shutil

    import nexus.demo

    cached = tmp_path / "cache" / "corpus-x"
    cached.mkdir(parents=True)
    for name in ("manifest.json", "domain_heldout.jsonl", "general_heldout.jsonl"):
        shutil.copy2(demo_tiny[0] / name, cached / name)
    monkeypatch.setattr(nexus.demo, "ensure_corpus", lambda: cached)
    return cached


def test_job_passes_tasks_and_trackers_to_the_stages(demo_tiny, task_dir, monkeypatch, tmp_path):
    """The job's ``evaluate.tasks`` / ``task_*`` keys, the top-level ``seed`` and
    ``train.report_to`` / ``report_project`` reach the configs the stages run with; the demo
    tasks resolve to the cache and the local ones to ``task_dir``; ``task_dir``'s files are
    fingerprinted (a changed task reruns evaluate), trackers are not (adding one reruns nothing)."""
    import shutil

    from nexus.demo.tasks import DEMO_TASKS
    from nexus.job.config import parse_config
    from nexus.job.run import JobContext
    from nexus.stages import BY_NAME
    from nexus.stages.evaluate_tasks import resolve_tasks, task_manager

    _demo_cache(demo_tiny, tmp_path, monkeypatch)
    local = Path(shutil.copytree(task_dir, tmp_path / "tasks"))
    corpus = str(demo_tiny[0] / "domain_heldout.jsonl")
    raw = {
        "output": str(tmp_path / "run"),
        "seed": 3,
        "model": {"path": str(demo_tiny[1])},
        "data": {"train": [corpus], "eval": {"domain": [corpus]}},
        "evaluate": {
            "seq_len": 32,
            "tasks": ["demo:code", TASK, "demo:docstrings"],
            "task_dir": str(local),
            "task_limit": 5,
            "task_batch_size": 4,
            "task_fewshot": 0,
        },
        "train": {"seq_len": 32, "report_to": ["tensorboard"], "report_project": "nexus-test"},
        "plan": {"check": False},
    }
    job = JobContext(parse_config(raw))
    evaluate, train = (job.stage_config(BY_NAME[name]) for name in ("evaluate", "train"))

    assert evaluate.tasks == raw["evaluate"]["tasks"] and evaluate.task_dir == str(local)
    assert (evaluate.task_limit, evaluate.task_batch_size, evaluate.task_fewshot, evaluate.seed) == (
        5,
        4,
        0,
        3,
    )
    assert train.report_to == ["tensorboard"] and train.report_project == "nexus-test"
    job.preflight()  # knows every task, finds the tensorboard extra

    names, dirs = resolve_tasks(evaluate.tasks, evaluate.task_dir, seed=evaluate.seed)
    assert names == [DEMO_TASKS["code"][0], TASK, DEMO_TASKS["docstrings"][0]]
    assert dirs[0] == str(local) and len(dirs) == 2  # one demo task directory for both demo tasks
    assert dirs[1].startswith(str(tmp_path / "cache" / "tasks-"))
    assert set(names) <= set(task_manager(names, dirs).all_tasks)

    train_print = train.fingerprint(job.identity)
    assert "report_to" not in train_print["settings"] and "report_project" not in train_print["settings"]
    before = evaluate.fingerprint(job.identity)
    assert before["settings"]["tasks"] == evaluate.tasks and before["settings"]["seed"] == 3
    (local / "data.jsonl").write_text((local / "data.jsonl").read_text() + "\n")
    after = evaluate.fingerprint(job.identity)
    assert after["inputs"]["task_dir"] != before["inputs"]["task_dir"]
    assert after["settings"] == before["settings"]


def test_job_report_shows_the_accuracy_table(demo_tiny, tmp_path):
    from nexus.job.config import parse_config
    from nexus.job.report import write_report
    from nexus.job.run import JobContext

    job = JobContext(parse_config({"output": str(tmp_path / "run"), "model": {"path": str(demo_tiny[1])}}))
    block = {
        "settings": {"tasks": ["t"], "limit": None, "batch_size": 8, "num_fewshot": None, "seed": 0},
        "results": {
            "t": {
                "questions": 200,
                "metrics": {
                    "acc": {
                        "base": 0.5,
                        "base_stderr": 0.035,
                        "specialised": 0.55,
                        "specialised_stderr": 0.0352,
                        "change": 0.05,
                    }
                },
            }
        },
    }
    (job.output / "evaluate").mkdir(parents=True)
    evaluation = {"corpora": {"domain": {"tokens": 10, "bytes": 30, "base_ppl": 2.0, "base_bpb": 0.5}}}
    (job.output / "evaluate" / "evaluation.json").write_text(json.dumps({**evaluation, "tasks": block}))
    report = write_report(job, []).read_text()
    assert "## Downstream tasks (lm-evaluation-harness)" in report
    assert "| t | 200 | acc | 0.500 ± 0.035 | 0.550 ± 0.035 | +0.050 |" in report
    assert "| domain | 10 | 30 | 2.000 | - | - | 0.5000 | - |" in report
