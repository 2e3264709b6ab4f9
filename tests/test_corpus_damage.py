"""Damage deep inside a corpus, in every stage that reads one (docs/errors.md, "Damaged documents").

Each damaged corpus below has its damage past the 64 KiB that the eager checks read, so it
is found by the readers inside Ray tasks. For every case and every stage that reads a
corpus (``sample``, ``collect``, ``train``, ``evaluate``, run in-process through
:func:`nexus.cli.main` like ``tests/test_errors.py``), the test checks what a user sees:
exit status 2, exactly one line on stderr naming the file and the line (or row group / row),
no traceback, and an unchanged file tree (no output, no temporary directory, no claim file).
The line, with the damaged corpora's directory replaced by ``CORPUS``, must appear verbatim
in docs/errors.md (``NEXUS_ERRORS_DUMP=FILE`` appends each case's command and message to
FILE, as in ``tests/test_errors.py``).

With ``--skip-bad-documents`` each stage succeeds on all the damaged files at once and
records, in its output, how many documents it skipped in each file.

Ray Data's console handler is set to ERROR for this module: its INFO/WARNING chatter (dataset
plans, "progress bars disabled") is Ray's, not the stage's error output, while the ERROR
records it prints for a failed task (with tracebacks) are exactly what must not leak.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
WINDOW = 65536  # what the eager checks read of each JSON Lines file
STAGES = ("sample", "collect", "train", "evaluate")
CASE_NAMES = (
    "jsonl-unterminated-line",
    "jsonl-text-missing",
    "jsonl-text-null",
    "jsonl-text-number",
    "jsonl-text-list",
    "jsonl-not-utf8",
    "text-not-utf8",
    "parquet-damaged-page",
    "parquet-text-column-another-type",
    "gzip-cut-short-jsonl",
    "gzip-cut-short-txt",
)


@dataclass
class Case:
    name: str
    file: str  # the damaged file (or directory) under CORPUS
    message: str  # regex the error line must match
    skipped: dict[str, int]  # with --skip-bad-documents: documents skipped per file (name under CORPUS)


CASES: dict[str, Case] = {}


def _docs(n: int) -> list[str]:
    return [f"document {i}: " + " ".join(f"word{(7 * i + j) % 53}" for j in range(10)) for i in range(n)]


#: a blank line after every document: it takes the files past the eager checks' window without
#: adding documents (blank lines are none) or tokens, which keeps the stages cheap
PAD = b" " * 1000


def _padded(lines: list[bytes]) -> list[bytes]:
    return [x for line in lines for x in (line, PAD)]


def _first_past_window(lines: list[bytes]) -> int:
    """Index of the first document line (every other line) that starts after the window."""
    offset = 0
    for i, line in enumerate(lines):
        if offset > WINDOW and i % 2 == 0:
            return i
        offset += len(line) + 1
    raise AssertionError("corpus too short")


def _write_damaged(path: Path, lines: list[bytes], damage) -> int:
    """``lines`` (padded) with the first document past the window replaced by ``damage(line)``;
    returns its line number."""
    lines = _padded(lines)
    bad = _first_past_window(lines)
    lines[bad] = damage(lines[bad])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return bad + 1


def _latin1(line: bytes) -> bytes:
    return line.replace(b"document", "d\xe9cument".encode("latin-1"))


def build_corpora(corpus: Path) -> None:
    """Every damaged corpus, and the expected line and skip count of each (``CASES``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def add(name, file, message):
        CASES[name] = Case(name, file, message, {file: 1})

    records = [json.dumps({"text": t, "id": i}).encode() for i, t in enumerate(_docs(80))]
    n = _write_damaged(corpus / "unterminated.jsonl", records, lambda line: line[:-2])
    add("jsonl-unterminated-line", "unterminated.jsonl", rf"unterminated\.jsonl line {n} is not valid JSON")
    n = _write_damaged(corpus / "no-text.jsonl", records, lambda line: json.dumps({"body": "moved"}).encode())
    add("jsonl-text-missing", "no-text.jsonl", rf"no-text\.jsonl line {n} has no field 'text'")
    for kind, value in (("null", None), ("number", 42), ("list", ["a", "b"])):
        n = _write_damaged(
            corpus / f"{kind}.jsonl", records, lambda line, v=value: json.dumps({"text": v}).encode()
        )
        add(f"jsonl-text-{kind}", f"{kind}.jsonl", rf"{kind}\.jsonl line {n} has field 'text' holding")
    n = _write_damaged(corpus / "latin1.jsonl", records, _latin1)
    add("jsonl-not-utf8", "latin1.jsonl", rf"latin1\.jsonl line {n} is not UTF-8 text")
    n = _write_damaged(corpus / "latin1.txt", [t.encode() for t in _docs(80)], _latin1)
    add("text-not-utf8", "latin1.txt", rf"latin1\.txt line {n} is not UTF-8 text")

    # 16 bytes flipped in the middle of row group 1's data page (plain strings, snappy-compressed:
    # no dictionary page, so the damage is in the page that holds the text)
    pq.write_table(
        pa.table({"text": _docs(120)}), corpus / "page.parquet", row_group_size=40, use_dictionary=False
    )
    chunk = pq.ParquetFile(corpus / "page.parquet").metadata.row_group(1).column(0)
    data = bytearray((corpus / "page.parquet").read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    (corpus / "page.parquet").write_bytes(bytes(data))
    add("parquet-damaged-page", "page.parquet", r"page\.parquet row group 1 \(rows 40 to 79\) cannot be read")
    CASES["parquet-damaged-page"].skipped = {"page.parquet": 40}  # the whole row group

    # one schema per Parquet file: a text column of another type can only come with a file the
    # eager checks did not see; they check the first 16 files per format of a remote corpus.
    # Those 16 hold no text (nulls): with no documents read, no tokenizer task is running when
    # the 17th fails, which Ray would cancel, maybe half-way through importing torch, leaving
    # a worker of the shared test cluster unable to import it again
    many = corpus / "many"
    many.mkdir()
    for i in range(16):
        pq.write_table(pa.table({"text": pa.nulls(20, pa.string())}), many / f"part-{i:02d}.parquet")
    pq.write_table(pa.table({"text": list(range(20))}), many / "part-16.parquet")
    add(
        "parquet-text-column-another-type",
        "many",
        r"part-16\.parquet row group 0 \(rows 0 to 19\) holds int64 in column 'text', not text",
    )
    CASES["parquet-text-column-another-type"].skipped = {"many/part-16.parquet": 20}

    # gzip files cut to two thirds (an interrupted download); the unreadable end counts as one
    for suffix in ("jsonl", "txt"):
        lines = [json.dumps({"text": t}) if suffix == "jsonl" else t for t in _docs(240)]
        packed = gzip.compress(b"\n".join(_padded([x.encode() for x in lines])) + b"\n", mtime=0)
        (corpus / f"cut.{suffix}.gz").write_bytes(packed[: len(packed) * 2 // 3])
        add(
            f"gzip-cut-short-{suffix}",
            f"cut.{suffix}.gz",
            rf"cut\.{suffix}\.gz is cut short or damaged: it cannot be read past line [1-9]\d+",
        )


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damaged_corpora")
    build_corpora(root)
    assert tuple(CASES) == CASE_NAMES
    return root


@pytest.fixture(scope="module", autouse=True)
def ray_data_errors_only(ray_cluster):
    import ray.data  # noqa: F401  (configures Ray Data's loggers)

    handlers = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(logging.ERROR)
    yield
    for h, level in zip(handlers, levels):
        h.setLevel(level)


def _spec(corpus: Path, case: Case) -> str:
    path = corpus / case.file
    return f"local://{path}" if path.is_dir() else str(path)  # a directory of many files: a URI


def _argv(stage: str, model: Path, corpora: list[str], out: Path) -> list[str]:
    common = ["--model", str(model), "--output", str(out)]
    if stage == "sample":
        return ["sample", *common, "--corpus", *corpora, "--target-tokens", "500"]
    if stage == "collect":  # the whole corpus: a collection stopped early reads only part of it
        return [
            "collect",
            *common,
            "--corpus",
            *corpora,
            "--seq-len",
            "64",
            "--batch-size",
            "64",
            "--no-progress",
        ]
    if stage == "distill":  # the blocks one training step reads; packing reads the whole corpus
        return [
            "distill",
            *common,
            "--corpus",
            *corpora,
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--steps",
            "1",
        ]
    if stage == "train":
        return [
            "train",
            *common,
            "--corpus",
            *corpora,
            "--seq-len",
            "32",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
        ]
    return [
        "evaluate",
        *common,
        "--corpus",
        *(f"domain={c}" for c in corpora),
        "--seq-len",
        "32",
        "--max-tokens",
        "256",
    ]


def _tree(root: Path) -> dict[str, tuple | None]:
    return {
        str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _main(argv: list[str]) -> int:
    from nexus.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


# -- the matrix ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_damage_is_one_line(name, stage, corpus, tiny_model_dir, tmp_path, capsys):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    argv = _argv(stage, tiny_model_dir, [_spec(corpus, case)], work / stage)
    before, corpus_before = _tree(tmp_path), _tree(corpus)
    capsys.readouterr()

    status = _main(argv)

    err = capsys.readouterr().err
    assert status == 2, (status, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one line on stderr, got: {err!r}"
    line = lines[0]
    assert line.startswith("nexus: error: corpus file "), line
    assert re.search(case.message, line), f"{line!r} does not match {case.message!r}"
    assert line.endswith("--skip-bad-documents") or "--skip-bad-documents to" in line, line
    # nothing left behind: no output, no temporary directory, no claim; the corpus untouched
    assert _tree(tmp_path) == before
    assert _tree(corpus) == corpus_before
    shown = line.replace(str(corpus), "CORPUS")
    if os.environ.get("NEXUS_ERRORS_DUMP"):  # how docs/errors.md was written, as in test_errors.py
        command = " ".join(["nexus", *argv]).replace(str(corpus), "CORPUS").replace(str(work), "WORK")
        with open(os.environ["NEXUS_ERRORS_DUMP"], "a") as f:
            f.write(json.dumps({"case": name, "stage": stage, "command": command, "message": shown}) + "\n")
    doc = DOC.read_text()
    assert f"`{name}`" in doc, f"case {name} is not in {DOC}"
    assert shown in doc, f"the message of case {name} is not in {DOC}:\n{shown}"


@pytest.mark.parametrize("name", ["jsonl-unterminated-line", "parquet-damaged-page"])
def test_damage_is_one_line_in_distill(name, corpus, tiny_model_dir, tmp_path, capsys):
    """``nexus distill`` (added after this matrix) reads the training corpus the same way: two
    cases of the matrix, a JSON Lines line and a Parquet page, are enough to show it."""
    test_damage_is_one_line(name, "distill", corpus, tiny_model_dir, tmp_path, capsys)


@pytest.mark.parametrize("stage", STAGES)
def test_skipping_bad_documents(stage, corpus, tiny_model_dir, tmp_path, caplog):
    """All damaged files at once: the stage succeeds, and its output records what was skipped."""
    from nexus.method.stats import META_FILE

    specs = [_spec(corpus, CASES[n]) for n in CASE_NAMES]
    out = tmp_path / stage
    with caplog.at_level(logging.WARNING, logger="nexus"):
        status = _main([*_argv(stage, tiny_model_dir, specs, out), "--skip-bad-documents"])
    assert status == 0
    record_file = {
        "sample": "sample.json",
        "collect": META_FILE,
        "train": "train_summary.json",
        "evaluate": "evaluation.json",
    }[stage]
    record = json.loads((out / record_file).read_text())["skipped_documents"]
    expected = {}
    for n in CASE_NAMES:
        for file, count in CASES[n].skipped.items():
            path = corpus / file
            expected[f"local:{path}" if path.parent != corpus else str(path)] = count
    assert record["files"] == expected
    assert record["count"] == sum(expected.values())
    # the first in corpus order: the first file given, at its damaged line
    assert record["first"].startswith(f"corpus file {corpus / 'unterminated.jsonl'} line ")
    warnings = [r.getMessage() for r in caplog.records if "damaged document" in r.getMessage()]
    assert warnings == [
        f"skipped {record['count']} damaged document(s) in {len(expected)} file(s) (--skip-bad-documents); "
        f"the first: {record['first']}"
    ]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".claim")]
    shutil.rmtree(out)


def test_the_job_passes_skip_bad_documents_to_every_stage_that_reads_a_corpus(tmp_path, monkeypatch):
    """``data.skip_bad_documents`` reaches sample, collect, distill, train and evaluate, and
    enters their fingerprints only when set (existing runs stay up to date)."""
    from nexus.job.config import parse_config
    from nexus.job.run import JobContext, build_stages
    from nexus.stages import BY_NAME

    readers = {"sample", "collect", "distill", "train", "evaluate"}
    calls: dict[str, bool] = {}
    for name in readers:  # each stage's run gets the config the job built; it records the setting
        monkeypatch.setattr(
            BY_NAME[name].module, "run", lambda cfg, name=name: calls.update({name: cfg.skip_bad_documents})
        )
    for corpus in ("a.jsonl", "b.jsonl"):  # the fingerprints record the corpus files
        (tmp_path / corpus).write_text(json.dumps({"text": "some text"}) + "\n")
    data = {"train": [str(tmp_path / "a.jsonl")], "eval": {"domain": [str(tmp_path / "b.jsonl")]}}
    cfg = parse_config(
        {
            "output": str(tmp_path / "run"),
            "model": {"path": str(tmp_path / "m")},
            "data": data,
            "collect": {"seq_len": 64},
        }
    )
    for skip in (False, True):
        cfg.data.skip_bad_documents = skip
        stages = {s.name: s for s in build_stages(JobContext(cfg))}
        marked = {name for name, s in stages.items() if "skip_bad_documents" in s.settings()}
        assert marked == (readers if skip else set())
        for name in readers:
            stages[name].run(tmp_path, "0" * 64)
        assert calls == dict.fromkeys(readers, skip)
