"""Corpus reading and tokenisation on Ray Data: formats, locations, and one-line errors."""

from __future__ import annotations

import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexus.data.corpus import (
    SkippedDocuments,
    _Damage,
    read_corpus,
    read_documents,
    resolve_corpus,
    tokenize_corpus,
)
from nexus.errors import NexusError, user_errors


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.jsonl").write_text(
        "\n".join(
            json.dumps(r) for r in [{"text": "alpha doc", "id": 1}, {"text": "  "}, {"text": "beta doc"}]
        )
        + "\n"
    )
    (d / "b.txt").write_text("line one\nline two\n\npara two\n")
    with gzip.open(d / "c.txt.gz", "wt") as f:
        f.write("zipped line\n")
    pq.write_table(pa.table({"text": ["pq one", None, "pq two"], "n": [1, 2, 3]}), d / "d.parquet")
    sub = d / "sub"
    sub.mkdir()
    (sub / "e.jsonl").write_text(json.dumps({"body": "other field"}) + "\n")
    (sub / "_SUCCESS").write_text("")
    (d / "texts").mkdir()
    (d / "texts" / "x.md").write_text("markdown doc\n")
    (d / "texts" / ".hidden.txt").write_text("hidden\n")
    return d


def _texts(ds) -> list[str]:
    return sorted(r["text"] for r in ds.take_all())


def test_formats_and_locations(ray_cluster, corpus_dir):
    d = corpus_dir
    assert _texts(read_corpus(d / "a.jsonl")) == ["alpha doc", "beta doc"]
    assert _texts(read_corpus(d / "b.txt")) == ["line one", "line two", "para two"]
    assert _texts(read_corpus(d / "d.parquet")) == ["pq one", "pq two"]
    # several inputs at once: a glob (plain and gzip text), a file:// URI, a directory of text files
    got = _texts(read_corpus([str(d / "*.txt*"), f"file://{d / 'a.jsonl'}", d / "texts"]))
    assert got == sorted(
        ["line one", "line two", "para two", "zipped line", "alpha doc", "beta doc", "markdown doc"]
    )
    # a directory reads its Parquet files when it has any (the layout of `nexus sample` output)
    assert [f.format for f in resolve_corpus(d)] == ["parquet"]
    rows = read_corpus(d / "b.txt", text_unit="paragraph", include_paths=True).take_all()
    assert [r["text"] for r in rows] == ["line one\nline two", "para two"]
    assert rows[0]["path"].endswith("b.txt")
    assert _texts(read_corpus(d / "b.txt", text_unit="file")) == ["line one\nline two\n\npara two"]


def test_text_field_option(ray_cluster, corpus_dir):
    assert _texts(read_corpus(corpus_dir / "sub" / "e.jsonl", text_field="body")) == ["other field"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "nope.jsonl", "corpus path not found"),
        (lambda d: str(d / "*.nothing"), "matches no files"),
        (lambda d: _write(d / "empty.jsonl", b""), "the corpus is empty"),
        (lambda d: _mkdir(d / "emptydir"), "has no corpus files"),
        (lambda d: _write(d / "e.jsonl", b'{"body": "x"}\n'), "has no field 'text'"),
        (lambda d: _pq(d / "other.parquet"), "has no column 'text'"),
        (lambda d: _write(d / "bad.parquet", b"definitely not parquet"), "is not a readable Parquet file"),
        (lambda d: _write(d / "bin.txt", b"\x89PNG\x00\x00\x01"), "looks binary"),
        (lambda d: _write(d / "latin.txt", "caf\xe9 au lait\n".encode("latin-1")), "is not UTF-8"),
        (lambda d: _write(d / "arr.json", b'[{"text": "a"}]'), "JSON array, not JSON Lines"),
        (lambda d: _write(d / "broken.jsonl", b'{"text": "a"\n'), "is not valid JSON"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(NexusError, match=message) as err:
        read_corpus(path)
    assert "\n" not in str(err.value)


def test_errors_found_while_reading_become_one_line(ray_cluster, tmp_path):
    # what the eager checks do not see (they read the head of each file) surfaces while reading
    path = tmp_path / "only_x.jsonl"
    path.write_text(json.dumps({"x": 1}) + "\n")
    with pytest.raises(NexusError, match=r"only_x\.jsonl line 1 has no field 'text'") as err, user_errors():
        read_corpus(path, check=False).take_all()
    assert "\n" not in str(err.value)
    # a record without the field after a good first record is a damaged line too: named, or skipped
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps(r) for r in [{"text": "ok"}, {"x": 2}, {"text": "fine"}]) + "\n")
    with pytest.raises(NexusError, match=r"mixed\.jsonl line 2 has no field 'text' \(it has: x\)"):
        read_corpus(mixed)
    skipped = SkippedDocuments()
    with user_errors():
        assert _texts(read_corpus(mixed, skipped=skipped)) == ["fine", "ok"]
    assert skipped.finish() == {
        "count": 1,
        "first": f"corpus file {mixed} line 2 has no field 'text' (it has: x)",
        "files": {str(mixed): 1},
    }


class _Collect(_Damage):
    """The read tasks' damage handler outside Ray: raise (no ledger), or keep what is skipped
    (``skipped``: position, what, documents) instead of sending it to a ledger actor."""

    def __init__(self, skip: bool = False) -> None:
        super().__init__("F", ledger=object() if skip else None)
        self.skipped: list[tuple[int, str, int]] = []

    def flush(self) -> None:
        self.skipped += [(pos, msg.removeprefix("corpus file F "), n) for _, pos, msg, n in self.pending]
        self.pending = []


def _read(data: bytes, fmt: str, unit: str = "line", skip: bool = False) -> tuple[list[str], list]:
    damage = _Collect(skip)
    tables = list(read_documents(pa.BufferReader(data), fmt, damage, text_unit=unit))
    return [t for table in tables for t in table.column("text").to_pylist()], damage.skipped


def test_line_pieces_are_whole_lines_numbered_from_one():
    from nexus.data.corpus import _line_pieces

    data = b"a" * 10 + b"\nbb\n\nccc\n" + b"d" * 7  # a line longer than a chunk, no final newline
    pieces = list(_line_pieces(pa.BufferReader(data), _Collect(), chunk_size=3))
    assert b"".join(piece for _, piece in pieces) == data
    assert all(piece.endswith(b"\n") for _, piece in pieces[:-1])
    at = 0
    for number, piece in pieces:
        assert number == data.count(b"\n", 0, at) + 1
        at += len(piece)


@pytest.mark.parametrize("unit", ["line", "paragraph", "file"])
def test_text_documents_are_those_of_the_whole_file_split(unit):
    """The line reader reads pieces of lines, yet yields exactly the documents of splitting the
    whole decoded file (line breaks of every kind, blank and whitespace lines, no final newline)."""
    from nexus.data.corpus import _split_text

    text = "a\r\nb\rc\n\n \n  d  \n\x0be\u2028f\n\t\n\ng\nh"
    assert _read(text.encode(), "text", unit)[0] == _split_text(text, unit)


def test_damaged_text_lines_and_paragraphs_are_named_or_skipped():
    data = b"good one\nbad \xff here\n\nnext para\nalso \xfe bad\nend\n"
    with pytest.raises(NexusError, match=r"line 2 is not UTF-8 text \(byte 0xff at column 5\)"):
        _read(data, "text")
    assert _read(data, "text", skip=True) == (
        ["good one", "next para", "end"],
        [
            (2, "line 2 is not UTF-8 text (byte 0xff at column 5)", 1),
            (5, "line 5 is not UTF-8 text (byte 0xfe at column 6)", 1),
        ],
    )
    with pytest.raises(NexusError, match=r"line 2 is not UTF-8 text \(byte 0xff at column 5\)"):
        _read(data, "text", "paragraph")
    docs, skipped = _read(data, "text", "paragraph", skip=True)  # a paragraph with a bad byte is skipped
    assert docs == [] and [s[0] for s in skipped] == [2, 5]


def test_a_cut_short_file_keeps_its_whole_lines_unless_it_is_one_document():
    data = gzip.compress(b"".join(b"line %d\n" % i for i in range(30000)), mtime=0)
    stream = pa.CompressedInputStream(pa.BufferReader(data[: len(data) // 2]), "gzip")
    with pytest.raises(NexusError, match=r"is cut short or damaged: it cannot be read past line \d+"):
        list(read_documents(stream, "text", _Collect(), compressed=True))
    for unit in ("line", "file"):
        stream = pa.CompressedInputStream(pa.BufferReader(data[: len(data) // 2]), "gzip")
        damage = _Collect(skip=True)
        docs = [
            t
            for table in read_documents(stream, "text", damage, text_unit=unit, compressed=True)
            for t in table.column("text").to_pylist()
        ]
        (kept_up_to,) = map(int, re.findall(r"past line (\d+)", damage.skipped[0][1]))
        assert len(damage.skipped) == 1
        assert docs == ([f"line {i}" for i in range(kept_up_to)] if unit == "line" else [])
        assert kept_up_to > 1000  # 64 KiB pieces: at most one piece is lost


def test_damaged_json_lines_keep_the_good_ones_in_order():
    lines = [
        b'{"text": "a"}',
        b"",
        b'{"text": 7}',
        b"   ",
        b'{"text": "b", "n": 1}',
        b'{"text": "\\ud800"}',
        b"[1]",
    ]
    with pytest.raises(NexusError, match="line 3 has field 'text' holding a number"):
        _read(b"\n".join(lines), "jsonl")
    docs, skipped = _read(b"\n".join(lines), "jsonl", skip=True)
    assert docs == ["a", "b"]
    assert [s[1] for s in skipped] == [
        "line 3 has field 'text' holding a number, not text",
        "line 6 has field 'text' holding an unpaired surrogate escape, not text",
        "line 7 is not a JSON object",
    ]


def test_tokenize_cap_and_split(ray_cluster, corpus_dir, tiny_model_dir):
    ds = read_corpus(corpus_dir / "b.txt")
    full = tokenize_corpus(ds, tiny_model_dir, max_doc_tokens=None, keep_text=True).take_all()
    lengths = {r["text"]: r["num_tokens"] for r in full}
    assert all(len(r["input_ids"]) == r["num_tokens"] > 0 for r in full)
    capped = tokenize_corpus(ds, tiny_model_dir, max_doc_tokens=2, keep_text=True).take_all()
    assert all(r["num_tokens"] <= 2 for r in capped) and len(capped) == len(full)
    split = tokenize_corpus(ds, tiny_model_dir, max_doc_tokens=2, split_long=True, keep_text=True).take_all()
    assert sum(r["num_tokens"] for r in split) == sum(lengths.values())
    for text, n in lengths.items():
        pieces = [r for r in split if r["text"] == text]
        assert [x for r in pieces for x in r["input_ids"]] == next(
            r["input_ids"] for r in full if r["text"] == text
        )
        assert len(pieces) == -(-n // 2)
    assert "text" not in tokenize_corpus(ds, tiny_model_dir).take(1)[0]


def test_tokenizer_missing_is_one_line_error(ray_cluster, corpus_dir, tmp_path):
    with pytest.raises(NexusError, match="no tokenizer"):
        tokenize_corpus(read_corpus(corpus_dir / "b.txt"), tmp_path)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    (path / "notes.bin").write_bytes(b"\x00")
    return path


def _pq(path):
    pq.write_table(pa.table({"body": ["x"]}), path)
    return path
