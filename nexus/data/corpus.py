"""Reading and tokenising a corpus with Ray Data.

:func:`read_corpus` turns plain text files, JSON Lines and Parquet files (local paths,
directories, globs, or any URI that ``pyarrow.fs.FileSystem.from_uri`` accepts: ``s3://``,
``gs://``, ``hdfs://``, ``file://`` ...) into a lazy :class:`ray.data.Dataset` with one
``text`` column, one row per document. :func:`tokenize_corpus` adds ``input_ids`` with
``map_batches``.

Problems the user can fix are found up front, on the driver, before any Ray task runs: a
path that does not exist, a directory or glob with no corpus files, a corpus whose files
are all empty, an unreadable file, a file that claims to be Parquet but is not, a JSON
Lines or Parquet file without the text field, text that is not UTF-8 (in the first 64 KiB).
Each is a one-line :class:`~nexus.errors.NexusError`.

Damage deeper in a file is found by the readers themselves: a Ray read task per file reads
JSON Lines and text line by line (``json.loads`` on the text field only) and Parquet row
group by row group (checking the text column's type and UTF-8, which pyarrow does not), so
every damaged document is a one-line error naming the file and the line (or row group and
row): an invalid JSON line, a text field that is missing, null or not a string, bytes that
are not UTF-8, a Parquet row group that cannot be read, a compressed file cut short. It
surfaces when the dataset is consumed; stages consume inside
:func:`nexus.errors.user_errors`, which turns it back into the same one-line error. With a :class:`SkippedDocuments` record
(``--skip-bad-documents``) damaged documents are skipped and counted instead.

Rules for what is read:

- File format by extension (``.parquet``/``.pq``; ``.jsonl``/``.ndjson``/``.json``, also
  compressed as ``.gz``/``.zst``/``.bz2``/``.lz4``; anything else is text), or forced with
  ``file_format``.
- A directory is read recursively as its data files: its Parquet files if it has any, else
  its JSON Lines files, else its text files (``.txt``, ``.text``, ``.md``, ``.rst``, and
  compressed variants). Hidden files and files starting with ``_`` (``_SUCCESS``) are
  skipped. Pass globs to mix formats explicitly.
- Text files are split into documents by ``text_unit``: ``line`` (default, one document
  per line, the usual plain-text corpus layout), ``paragraph`` (blank-line separated) or
  ``file`` (the whole file). Whitespace-only documents are dropped everywhere.
"""

from __future__ import annotations

import fnmatch
import functools
import glob as globlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexus.errors import NexusError, first_line
from nexus.util.artifacts import is_uri

log = logging.getLogger(__name__)

TEXT_UNITS = ("line", "paragraph", "file")
FILE_FORMATS = ("auto", "text", "jsonl", "parquet")
_COMPRESSED = (".gz", ".zst", ".bz2", ".lz4", ".br")
_PARQUET_EXT = (".parquet", ".pq")
_JSONL_EXT = (".jsonl", ".ndjson", ".json")
_TEXT_EXT = (".txt", ".text", ".md", ".rst")
_GLOB_CHARS = re.compile(r"[*?\[]")
#: how many files are checked eagerly per format (all of them for local files)
_REMOTE_CHECKS = 16


@dataclass(frozen=True)
class CorpusFile:
    """One resolved corpus file: its path within ``filesystem``, size, format and display name."""

    path: str
    size: int
    mtime_ns: int
    format: str
    uri: str
    filesystem: Any = None  # pyarrow FileSystem, or None for the local one

    @property
    def local(self) -> bool:
        return self.filesystem is None


# -- format detection -------------------------------------------------------------------------
def _strip_compression(name: str) -> str:
    low = name.lower()
    for ext in _COMPRESSED:
        if low.endswith(ext):
            return low[: -len(ext)]
    return low


def detect_format(path: str) -> str:
    """``parquet``, ``jsonl`` or ``text`` from a file name."""
    base = _strip_compression(os.path.basename(path))
    if base.endswith(_PARQUET_EXT):
        return "parquet"
    if base.endswith(_JSONL_EXT):
        return "jsonl"
    return "text"


def _is_data_file(name: str) -> bool:
    base = _strip_compression(os.path.basename(name))
    return base.endswith(_PARQUET_EXT + _JSONL_EXT + _TEXT_EXT)


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in Path(rel).parts)


def _pick_directory_files(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep a directory's data files of the preferred format: Parquet > JSON Lines > text."""
    data = [(p, rel) for p, rel in files if _is_data_file(p) and not _hidden(rel)]
    for fmt in ("parquet", "jsonl", "text"):
        chosen = [(p, rel) for p, rel in data if detect_format(p) == fmt]
        if chosen:
            return chosen
    return []


# -- path resolution --------------------------------------------------------------------------
def _local_entry(path: str, fmt: str) -> CorpusFile:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise NexusError(f"cannot read corpus file {path}: {exc.strerror}") from exc
    if not os.access(path, os.R_OK):
        raise NexusError(f"corpus file {path} is not readable (permission denied); fix its permissions")
    return CorpusFile(path, st.st_size, st.st_mtime_ns, fmt, path)


def _resolve_local(spec: str, file_format: str) -> list[CorpusFile]:
    spec = os.path.expanduser(spec)
    if _GLOB_CHARS.search(spec):
        matches = sorted(p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p))
        if not matches:
            raise NexusError(f"corpus glob {spec} matches no files")
        return [_local_entry(p, _fmt(p, file_format)) for p in matches]
    if os.path.isdir(spec):
        if not os.access(spec, os.R_OK | os.X_OK):
            raise NexusError(f"corpus directory {spec} is not readable (permission denied)")
        found = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
            for name in names:
                full = os.path.join(root, name)
                found.append((full, os.path.relpath(full, spec)))
        found.sort()
        if file_format != "auto":
            chosen = [(p, rel) for p, rel in found if not _hidden(rel)]
        else:
            chosen = _pick_directory_files(found)
        if not chosen:
            raise NexusError(
                f"corpus directory {spec} has no corpus files (.txt, .md, .jsonl, .json, .parquet); "
                "point --corpus at the files or a glob"
            )
        return [_local_entry(p, _fmt(p, file_format)) for p, _ in chosen]
    if os.path.isfile(spec):
        return [_local_entry(spec, _fmt(spec, file_format))]
    if os.path.lexists(spec):
        raise NexusError(f"corpus path {spec} is neither a file nor a directory (broken link?)")
    raise NexusError(f"corpus path not found: {spec}")


def _resolve_uri(spec: str, file_format: str) -> list[CorpusFile]:
    import pyarrow.fs as pafs

    glob_part = None
    base = spec
    if _GLOB_CHARS.search(spec):
        # list the deepest glob-free directory, then match the pattern
        head = spec[: _GLOB_CHARS.search(spec).start()]
        base = head.rsplit("/", 1)[0] if "/" in head.split("://", 1)[1] else head
        glob_part = spec
    try:
        fs, path = pafs.FileSystem.from_uri(base)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for unusable URIs
        raise NexusError(f"cannot open corpus location {spec}: {first_line(exc)}") from exc
    scheme_prefix = spec[: len(spec) - len(spec.split("://", 1)[1])]

    def entry(info) -> CorpusFile:
        mtime = info.mtime_ns or 0
        return CorpusFile(
            info.path, int(info.size or 0), int(mtime), _fmt(info.path, file_format), _uri(info.path), fs
        )

    def _uri(p: str) -> str:
        return scheme_prefix + p.lstrip("/") if not p.startswith("/") else scheme_prefix.rstrip("/") + p

    try:
        info = fs.get_file_info(path)
        if glob_part is None and info.type == pafs.FileType.File:
            return [entry(info)]
        if glob_part is None and info.type == pafs.FileType.NotFound:
            raise NexusError(f"corpus path not found: {spec}")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except NexusError:
        raise
    except Exception as exc:
        raise NexusError(f"cannot list corpus location {spec}: {first_line(exc)}") from exc
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    if glob_part is not None:
        pattern = glob_part.split("://", 1)[1] if "://" in glob_part else glob_part
        files = [i for i in files if fnmatch.fnmatchcase(i.path.lstrip("/"), pattern.lstrip("/"))]
        if not files:
            raise NexusError(f"corpus glob {spec} matches no files")
        return [entry(i) for i in files]
    pairs = [(i.path, i.path[len(path) :].lstrip("/")) for i in files]
    chosen = pairs if file_format != "auto" else _pick_directory_files(pairs)
    chosen = [(p, rel) for p, rel in chosen if not _hidden(rel)]
    if not chosen:
        raise NexusError(f"corpus location {spec} has no corpus files (.txt, .md, .jsonl, .json, .parquet)")
    by_path = {i.path: i for i in files}
    return [entry(by_path[p]) for p, _ in chosen]


def _fmt(path: str, file_format: str) -> str:
    return detect_format(path) if file_format == "auto" else file_format


def resolve_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike], file_format: str = "auto"
) -> list[CorpusFile]:
    """Expand paths, directories, globs and URIs into the list of corpus files (sorted, unique)."""
    if file_format not in FILE_FORMATS:
        raise NexusError(f"unknown corpus format '{file_format}'; choose one of {', '.join(FILE_FORMATS)}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    specs = [os.fspath(p) for p in paths]
    if not specs:
        raise NexusError("no corpus given; pass one or more files, directories, globs or URIs")
    out: list[CorpusFile] = []
    seen: set[str] = set()
    for spec in specs:
        if not spec.strip():
            raise NexusError("empty corpus path given")
        if spec.startswith("file://"):
            spec = spec[len("file://") :]
        files = _resolve_uri(spec, file_format) if is_uri(spec) else _resolve_local(spec, file_format)
        for f in files:
            if f.uri not in seen:
                seen.add(f.uri)
                out.append(f)
    if all(f.size == 0 for f in out):
        names = ", ".join(f.uri for f in out[:3]) + (" ..." if len(out) > 3 else "")
        raise NexusError(f"the corpus is empty: every file has zero bytes ({names})")
    return out


def corpus_record(paths, files: Sequence[CorpusFile], text_field: str, text_unit: str) -> dict:
    """What an artifact records about the corpus it was made from."""
    return {
        "paths": [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)],
        "files": len(files),
        "fingerprint": corpus_fingerprint(files),
        "text_field": text_field,
        "text_unit": text_unit,
    }


def corpus_fingerprint(files: Sequence[CorpusFile]) -> str:
    """A cheap identity of the input files (paths, sizes, modification times) for manifests."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.uri):
        h.update(f"{f.uri}\t{f.size}\t{f.mtime_ns}\t{f.format}\n".encode())
    return h.hexdigest()


# -- damaged documents --------------------------------------------------------------------------
#: the option that skips damaged documents (and counts them) instead of stopping at the first
SKIP_OPTION = "--skip-bad-documents"
_FIX_LINE = f"fix that line or pass {SKIP_OPTION}"
_FIX_FILE = f"re-create or re-download the file, or pass {SKIP_OPTION}"
_JSON_KINDS = {type(None): "null", bool: "true or false", int: "a number", float: "a number", list: "a list"}
_SURROGATES = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"


class _BadDocument(Exception):
    """One damaged document; ``problem`` completes the sentence "corpus file F line N ..."."""

    def __init__(self, problem: str, fields: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        #: the record's fields when it lacks the text field (the likely wrong --text-field)
        self.fields = fields


def _utf8_problem(byte: int, column: int) -> str:
    """A line whose byte ``byte`` at ``column`` (from 0) is not valid UTF-8."""
    return f"is not UTF-8 text (byte 0x{byte:02x} at column {column + 1})"


def _jsonl_text(raw: bytes, text_field: str) -> str:
    """The text of one JSON Lines record (``raw``: its line), or :class:`_BadDocument`.

    The line is decoded as UTF-8 by us (``json.loads`` would guess UTF-16/32 from bytes), and
    only the text field is looked at: other fields may hold anything.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadDocument(_utf8_problem(raw[exc.start], exc.start)) from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadDocument(f"is not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise _BadDocument("is not a JSON object")
    if text_field not in record:
        fields = ", ".join(list(record)[:10]) or "none"
        raise _BadDocument(f"has no field '{text_field}' (it has: {fields})", fields)
    text = record[text_field]
    if not isinstance(text, str):
        kind = _JSON_KINDS.get(type(text), "an object")
        raise _BadDocument(f"has field '{text_field}' holding {kind}, not text")
    if "\\u" in line and _SURROGATES.search(text):  # "\ud800" is valid JSON but not Unicode text
        raise _BadDocument(f"has field '{text_field}' holding an unpaired surrogate escape, not text")
    return text


# -- eager checks ---------------------------------------------------------------------------------
def _open(f: CorpusFile):
    import pyarrow.fs as pafs

    fs = f.filesystem or pafs.LocalFileSystem()
    return fs.open_input_stream(f.path, compression="detect")


def _head(f: CorpusFile, nbytes: int = 65536) -> bytes:
    try:
        with _open(f) as stream:
            return stream.read(nbytes)
    except Exception as exc:
        raise NexusError(f"cannot read corpus file {f.uri}: {first_line(exc)}") from exc


def _check_text(f: CorpusFile, skip_bad_documents: bool) -> None:
    head = _head(f, 8192)
    if b"\x00" in head:
        raise NexusError(
            f"corpus file {f.uri} looks binary (NUL bytes), not UTF-8 text; is it the right file?"
        )
    if skip_bad_documents:
        return  # lines that are not UTF-8 are damaged documents, skipped while reading
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte character cut at the end is fine
            raise NexusError(
                f"corpus file {f.uri} is not UTF-8 text (bad byte at offset {exc.start}); "
                "convert it to UTF-8 or pass the right --corpus-format"
            ) from exc


def _check_jsonl(f: CorpusFile, text_field: str, skip_bad_documents: bool) -> None:
    """Every record in the first 64 KiB: a JSON array instead of JSON Lines, and a text field
    that the first record lacks (a wrong ``--text-field``) are refused whatever the options;
    damaged lines are refused unless they are to be skipped (then some record must have the
    field)."""
    head = _head(f)
    if not head.strip():
        return
    lines = head.split(b"\n")
    if len(lines) > 1 and len(head) == 65536:
        lines = lines[:-1]  # the last line may be cut
    lines[0] = lines[0].removeprefix(_BOM)
    first, missing = True, None
    for number, raw in enumerate(lines, 1):
        if not raw or raw.isspace():
            continue
        try:
            _jsonl_text(raw, text_field)
        except _BadDocument as bad:
            if first and raw.lstrip().startswith(b"["):
                raise NexusError(
                    f"corpus file {f.uri} is a JSON array, not JSON Lines; write one JSON object per line"
                ) from None
            if bad.fields is not None and (first or skip_bad_documents):
                missing = missing or (number, bad.fields)
                if not skip_bad_documents:
                    break
            elif not skip_bad_documents:
                raise NexusError(f"corpus file {f.uri} line {number} {bad.problem}; {_FIX_LINE}") from None
        else:
            if skip_bad_documents:
                return  # a record with the field: the field name is right
        first = False
    if missing is not None:
        number, fields = missing
        raise NexusError(
            f"corpus file {f.uri} has no field '{text_field}' (line {number} has: {fields}); "
            "pass --text-field NAME"
        )


def _check_parquet(f: CorpusFile, text_field: str) -> None:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(f.path, filesystem=f.filesystem)
    except Exception as exc:
        raise NexusError(f"corpus file {f.uri} is not a readable Parquet file ({first_line(exc)})") from exc
    if text_field not in schema.names:
        fields = ", ".join(schema.names[:10]) or "none"
        raise NexusError(
            f"corpus file {f.uri} has no column '{text_field}' (columns: {fields}); pass --text-field NAME"
        )
    typ = schema.field(text_field).type
    if not _is_text_type(typ):
        raise NexusError(f"column '{text_field}' of corpus file {f.uri} holds {typ}, not text")


def check_corpus_files(
    files: Sequence[CorpusFile], text_field: str, skip_bad_documents: bool = False
) -> None:
    """Eager one-line errors for the usual mistakes (all local files; the first few remote ones).

    With ``skip_bad_documents``, damaged lines in the checked heads are left to the readers,
    which skip them.
    """
    remote_checked: dict[str, int] = {}
    for f in files:
        if f.size == 0:
            continue
        if not f.local:
            if remote_checked.get(f.format, 0) >= _REMOTE_CHECKS:
                continue
            remote_checked[f.format] = remote_checked.get(f.format, 0) + 1
        if f.format == "parquet":
            _check_parquet(f, text_field)
        elif f.format == "jsonl":
            _check_jsonl(f, text_field, skip_bad_documents)
        else:
            _check_text(f, skip_bad_documents)


# -- reading one file (inside a Ray read task) --------------------------------------------------
class _Damage:
    """What a read task does with a damaged document of one file: raise its one-line error, or,
    with ``--skip-bad-documents``, note it for the driver (:class:`SkippedDocuments`)."""

    def __init__(self, name: str, ledger=None) -> None:
        self.name = name
        self.ledger = ledger
        self.pending: list[tuple[str, int, str, int]] = []

    @property
    def skipping(self) -> bool:
        return self.ledger is not None

    def __call__(self, position: int, what: str, fix: str, documents: int = 1) -> None:
        """``what``: where and what ("line 812 is not valid JSON (...)"); ``position``: a number
        that orders the damage within the file (a line or row number)."""
        message = f"corpus file {self.name} {what}"
        if not self.skipping:
            raise NexusError(f"{message}; {fix}")
        self.pending.append((self.name, position, message, documents))

    def flush(self) -> None:
        """Report what was skipped so far (before a block goes downstream: a consumer that stops
        early cancels the task, and must not lose what it was told about)."""
        if self.pending:
            import ray

            ray.get(self.ledger.add.remote(self.pending))
            self.pending = []


def _line_pieces(stream, damage: _Damage, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """``(number of its first line, bytes)`` pieces of whole lines read from ``stream``.

    A read that fails part-way (a compressed file cut short) is damage after the last whole
    line; when it is skipped, the file ends there (the incomplete line is dropped, and so is
    the chunk being decompressed: compressed files are read in small chunks).
    """
    number, rest = 1, []  # rest: the pieces of a line not yet ended
    while True:
        try:
            chunk = stream.read(chunk_size)
        except (OSError, ValueError) as exc:  # pyarrow: "Truncated compressed stream", codec errors
            damage(
                number,
                f"is cut short or damaged: it cannot be read past line {number - 1} ({first_line(exc)})",
                f"re-create or re-download it, or pass {SKIP_OPTION} to keep what is readable",
            )
            return
        if not chunk:
            if rest:
                yield number, b"".join(rest)
            return
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:
            rest.append(chunk)  # a line longer than a chunk: joined once it ends
            continue
        piece = b"".join([*rest, chunk[:cut]]) if rest else chunk[:cut]
        yield number, piece
        number += piece.count(b"\n")
        rest = [chunk[cut:]] if cut < len(chunk) else []


def _jsonl_documents(stream, text_field: str, damage: _Damage, chunk_size: int) -> Iterator[list[str]]:
    for first, piece in _line_pieces(stream, damage, chunk_size):
        texts = []
        for number, raw in enumerate(piece.split(b"\n"), first):
            if not raw or raw.isspace():
                continue
            if number == 1:
                raw = raw.removeprefix(_BOM)
            try:
                texts.append(_jsonl_text(raw, text_field))
            except _BadDocument as bad:
                damage(number, f"line {number} {bad.problem}", _FIX_LINE)
        yield texts


def _split_text(text: str, unit: str) -> list[str]:
    if unit == "file":
        parts = [text]
    elif unit == "paragraph":
        parts = re.split(r"\n[ \t\r\f\v]*\n", text)
    else:
        parts = text.splitlines()
    return [p for p in (s.strip("\r\n") for s in parts) if p.strip()]


def _text_line_documents(stream, damage: _Damage, chunk_size: int) -> Iterator[list[str]]:
    """One document per line, decoded a piece at a time (a line per line only when a piece is
    not UTF-8, to find the damaged lines)."""
    for first, piece in _line_pieces(stream, damage, chunk_size):
        try:
            yield _split_text(piece.decode("utf-8"), "line")
            continue
        except UnicodeDecodeError:
            pass
        texts: list[str] = []
        for number, raw in enumerate(piece.split(b"\n"), first):
            try:
                texts.extend(_split_text(raw.decode("utf-8"), "line"))
            except UnicodeDecodeError as exc:
                damage(number, f"line {number} {_utf8_problem(raw[exc.start], exc.start)}", _FIX_LINE)
        yield texts


def _text_whole_documents(stream, unit: str, damage: _Damage, chunk_size: int) -> Iterator[list[str]]:
    """Paragraphs or the whole file: split after decoding the whole file, as documents may
    span lines. A document with bytes that are not UTF-8 is damaged (named by its first bad
    line)."""
    before = len(damage.pending)
    data = b"".join(piece for _, piece in _line_pieces(stream, damage, chunk_size))
    if unit == "file" and len(damage.pending) > before:
        return  # cut short (and skipped): the one document, the whole file, is incomplete
    try:
        yield _split_text(data.decode("utf-8"), unit)
        return
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", "surrogateescape")  # each bad byte becomes one lone surrogate
    keep, at = [], 0
    for doc in _split_text(text, unit):
        at = text.find(doc, at)
        bad = _SURROGATES.search(doc)
        if bad is None:
            keep.append(doc)
        else:
            index = at + bad.start()
            number = text.count("\n", 0, index) + 1
            line_start = text.rfind("\n", 0, index) + 1
            column = len(text[line_start:index].encode("utf-8", "surrogateescape"))
            byte = ord(bad.group()) - 0xDC00
            damage(number, f"line {number} {_utf8_problem(byte, column)}", _FIX_LINE)
        at += len(doc)
    yield keep


def _is_text_type(typ) -> bool:
    import pyarrow as pa

    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)


def _parquet_documents(source, text_field: str, damage: _Damage) -> Iterator:
    """The text column, one row group at a time (the unit Parquet reads, and the unit skipped
    when one is damaged): each is checked for its type and for UTF-8 (pyarrow does neither)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as exc:
        raise NexusError(
            f"corpus file {damage.name} is not a readable Parquet file ({first_line(exc)})"
        ) from None
    if text_field not in pf.schema_arrow.names:
        fields = ", ".join(pf.schema_arrow.names[:10]) or "none"
        raise NexusError(
            f"corpus file {damage.name} has no column '{text_field}' (columns: {fields}); "
            "pass --text-field NAME"
        )
    start = 0
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        where = f"row group {group} (rows {start} to {start + rows - 1})"
        try:
            col = pf.read_row_group(group, columns=[text_field]).column(0)
        except (OSError, pa.ArrowException) as exc:
            damage(
                start,
                f"{where} cannot be read ({first_line(exc)})",
                f"{_FIX_FILE} to skip that row group",
                rows,
            )
        else:
            if not (_is_text_type(col.type) or pa.types.is_null(col.type)):
                damage(
                    start,
                    f"{where} holds {col.type} in column '{text_field}', not text",
                    f"store the column as strings, or pass {SKIP_OPTION} to skip that row group",
                    rows,
                )
            else:
                yield _valid_utf8(col.cast(pa.string()), start, group, damage)
        start += rows


def _valid_utf8(col, start: int, group: int, damage: _Damage):
    """``col`` without the rows that are not UTF-8 (each one damaged)."""
    import pyarrow as pa

    col = col.combine_chunks()
    try:
        col.validate(full=True)
        return col
    except pa.ArrowInvalid:
        pass
    binary = col.cast(pa.binary())
    keep = [True] * len(binary)
    for i, raw in enumerate(binary.to_pylist()):
        try:
            if raw is not None:
                raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            keep[i] = False
            damage(
                start + i,
                f"row {start + i} (row group {group}) {_utf8_problem(raw[exc.start], exc.start)}",
                f"fix that row or pass {SKIP_OPTION}",
            )
    return binary.filter(pa.array(keep)).cast(pa.string())


def _non_blank(col):
    """Documents with text: not null, not whitespace only."""
    import pyarrow.compute as pc

    keep = pc.and_(pc.is_valid(col), pc.invert(pc.match_substring_regex(col, r"^\s*$")))
    return pc.filter(col, pc.fill_null(keep, False))


def read_documents(
    source,
    file_format: str,
    damage: _Damage,
    *,
    text_field: str = "text",
    text_unit: str = "line",
    block_bytes: int = 128 << 20,
    compressed: bool = False,
):
    """The documents of one corpus file as pyarrow tables with one ``text`` column.

    ``source``: a pyarrow input stream (decompressed), or a random-access file for Parquet.
    A table is cut whenever ``block_bytes`` of text have gathered, so a file smaller than that
    is one table. Damaged documents go to ``damage`` (raise, or skip and count).
    ``compressed``: read in 64 KiB chunks (a file cut short loses at most that), else 4 MiB.
    """
    import pyarrow as pa

    chunk = 64 << 10 if compressed else 4 << 20
    if file_format == "parquet":
        pieces = _parquet_documents(source, text_field, damage)
    elif file_format == "jsonl":
        pieces = _jsonl_documents(source, text_field, damage, chunk)
    elif text_unit == "line":
        pieces = _text_line_documents(source, damage, chunk)
    else:
        pieces = _text_whole_documents(source, text_unit, damage, chunk)
    blank_filter = file_format != "text"  # text files drop blank documents when they split
    gathered, size = [], 0
    for piece in pieces:
        arr = piece if isinstance(piece, (pa.Array, pa.ChunkedArray)) else pa.array(piece, pa.string())
        if blank_filter:
            arr = _non_blank(arr)
        if len(arr):
            gathered.append(arr)
            size += arr.nbytes
        if size >= block_bytes:
            damage.flush()
            yield pa.table({"text": pa.chunked_array(gathered, pa.string()).combine_chunks()})
            gathered, size = [], 0
    damage.flush()
    if gathered:
        yield pa.table({"text": pa.chunked_array(gathered, pa.string()).combine_chunks()})


# -- skipped documents --------------------------------------------------------------------------
class _SkipLedger:
    """The damaged documents read tasks skipped (a Ray actor, made only when skipping), keyed
    by (file, position) so that a file read twice counts once."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], tuple[str, int]] = {}

    def add(self, entries: list[tuple[str, int, str, int]]) -> None:
        for name, position, message, documents in entries:
            self.entries[(name, position)] = (message, documents)

    def get(self) -> dict[tuple[str, int], tuple[str, int]]:
        return self.entries


@functools.lru_cache(maxsize=1)
def _ledger_actor():
    import ray

    return ray.remote(num_cpus=0)(_SkipLedger)


class SkippedDocuments:
    """Damaged documents skipped while reading (a stage's ``skip_bad_documents``).

    Pass one to :func:`read_corpus` (several reads of a stage may share it), consume the
    datasets, then call :meth:`finish`: it logs one warning (how many, and where the first
    was) and returns what the stage records in its output. A document is a JSON Lines or
    text line (a paragraph or file with ``text_unit``), a Parquet row; a damaged Parquet row
    group counts all its rows, and the unreadable end of a file cut short counts as one.
    """

    def __init__(self) -> None:
        self._ledger = None
        self._order: dict[str, int] = {}
        self._summary: dict | None = None

    def _attach(self, files: Sequence[CorpusFile]):

        if self._ledger is None:
            self._ledger = _ledger_actor().remote()
        for f in files:
            self._order.setdefault(_display_name(f), len(self._order))
        return self._ledger

    def finish(self) -> dict:
        """``{"count", "first", "files"}`` (``first``: the first damaged document's message, in
        corpus order), with one warning if any were skipped."""
        if self._summary is not None:
            return self._summary
        entries: dict = {}
        if self._ledger is not None:
            import ray

            entries = ray.get(self._ledger.get.remote())
            ray.kill(self._ledger)
        files: dict[str, int] = {}
        for (name, _), (_, documents) in entries.items():
            files[name] = files.get(name, 0) + documents
        first = min(
            entries, key=lambda k: (self._order.get(k[0], len(self._order)), k[0], k[1]), default=None
        )
        self._summary = {
            "count": sum(files.values()),
            "first": entries[first][0] if first else None,
            "files": {n: files[n] for n in sorted(files, key=lambda n: self._order.get(n, len(self._order)))},
        }
        if self._summary["count"]:
            log.warning(
                "skipped %d damaged document(s) in %d file(s) (%s); the first: %s",
                self._summary["count"],
                len(files),
                SKIP_OPTION,
                self._summary["first"],
            )
        return self._summary


def skipped_documents(skip_bad_documents: bool) -> SkippedDocuments | None:
    """A record of skipped documents for a stage run with ``skip_bad_documents``, else None."""
    return SkippedDocuments() if skip_bad_documents else None


# -- Ray Data pipeline --------------------------------------------------------------------------
def _display_name(f: CorpusFile) -> str:
    """How read tasks name a file: its URI, or its absolute local path (what Ray reads)."""
    return f.uri if not f.local else os.path.abspath(f.path)


@functools.lru_cache(maxsize=1)
def _datasource_class():
    """:class:`ray.data.datasource.FileBasedDatasource` reading corpus files with
    :func:`read_documents` (made on first use, so that importing this module does not import
    Ray Data)."""
    from ray.data.context import DataContext
    from ray.data.datasource import FileBasedDatasource
    from ray.data.datasource.file_meta_provider import DefaultFileMetadataProvider

    class _KnownFiles(DefaultFileMetadataProvider):
        """The files and sizes :func:`resolve_corpus` found (instead of listing them again)."""

        def __init__(self, sizes: dict[str, int]) -> None:
            self.sizes = sizes

        def expand_paths(self, paths, filesystem, partitioning=None, ignore_missing_paths=False):
            for p in paths:
                yield p, self.sizes.get(p)

    class CorpusDatasource(FileBasedDatasource):
        """Corpus files of one format on one filesystem; one read task reads whole files."""

        def __init__(self, files, file_format, *, text_field, text_unit, include_paths, ledger):
            paths = [_display_name(f) if f.local else f.path for f in files]
            super().__init__(
                paths,
                filesystem=files[0].filesystem,
                meta_provider=_KnownFiles({p: f.size for p, f in zip(paths, files)}),
                include_paths=include_paths,
            )
            self._meta_provider = DefaultFileMetadataProvider()  # not shipped to every task
            uri, path = files[0].uri, files[0].path.lstrip("/")
            self._prefix = None if files[0].local else uri[: len(uri) - len(path)]
            self._format = file_format
            self._text_field = text_field
            self._text_unit = text_unit
            self._ledger = ledger
            self._block_bytes = DataContext.get_current().target_max_block_size or (128 << 20)

        def get_name(self) -> str:
            return "ReadCorpus"

        def _open_input_source(self, filesystem, path, **open_args):
            if self._format == "parquet":  # random access to the footer and row groups
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str):
            name = path if self._prefix is None else self._prefix + path.lstrip("/")
            yield from read_documents(
                f,
                self._format,
                _Damage(name, self._ledger),
                text_field=self._text_field,
                text_unit=self._text_unit,
                block_bytes=self._block_bytes,
                compressed=_strip_compression(path) != path.lower(),
            )

    return CorpusDatasource


#: read tasks per format (more files share tasks); a fixed count keeps Ray from splitting
#: each file's block, so a Parquet or text file up to 128 MiB is one block, as Ray's own
#: readers made them
_MAX_READ_TASKS = 256


def read_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    text_field: str = "text",
    *,
    file_format: str = "auto",
    text_unit: str = "line",
    include_paths: bool = False,
    check: bool = True,
    override_num_blocks: int | None = None,
    skipped: SkippedDocuments | None = None,
):
    """A lazy Ray Dataset with one ``text`` column (and ``path`` with ``include_paths``).

    Files are read by Ray read tasks, line by line (JSON Lines, text) or row group by row
    group (Parquet), so a damaged document anywhere is a one-line :class:`NexusError` naming
    the file and the line (or row group / row) when the dataset is consumed inside
    :func:`nexus.errors.user_errors`; with ``skipped`` it is skipped and counted there instead.

    Args:
        paths: files, directories, globs or URIs (one or a list); see the module notes.
        text_field: field of JSON Lines records / column of Parquet files holding the text.
        file_format: ``auto`` (by extension), ``text``, ``jsonl`` or ``parquet``.
        text_unit: how text files split into documents: ``line``, ``paragraph`` or ``file``.
        include_paths: add a ``path`` column naming each document's file.
        check: run the eager checks (existence, format, text field) before building the plan.
        override_num_blocks: passed to the Ray readers (default: Ray decides for JSON Lines;
            one read task per file, up to 256, for the other formats).
        skipped: skip damaged documents and record them here (see :class:`SkippedDocuments`).
    """
    import ray

    from nexus.util.cluster import ensure_ray

    if text_unit not in TEXT_UNITS:
        raise NexusError(f"unknown text unit '{text_unit}'; choose one of {', '.join(TEXT_UNITS)}")
    if not text_field:
        raise NexusError("the text field name is empty; pass --text-field NAME")
    files = resolve_corpus(paths, file_format)
    if check:
        check_corpus_files(files, text_field, skip_bad_documents=skipped is not None)
    ensure_ray()
    ledger = skipped._attach(files) if skipped is not None else None

    groups: dict[tuple[str, int], list[CorpusFile]] = {}
    for f in files:
        if f.size == 0:
            continue  # empty files hold no documents
        groups.setdefault((f.format, id(f.filesystem)), []).append(f)
    if not groups:
        raise NexusError("the corpus is empty: every file has zero bytes")
    parts = []
    for (fmt, _), group in groups.items():
        source = _datasource_class()(
            group, fmt, text_field=text_field, text_unit=text_unit, include_paths=include_paths, ledger=ledger
        )
        blocks = override_num_blocks
        if blocks is None and fmt != "jsonl":
            blocks = min(len(group), _MAX_READ_TASKS)
        parts.append(ray.data.read_datasource(source, override_num_blocks=blocks))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


# -- tokenisation -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def cached_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a model directory or Hub name, loaded once per process."""
    from nexus.models.loading import load_tokenizer

    tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    tok.model_max_length = int(1e12)  # we cap lengths ourselves; silence the length warning
    return tok


def _tokenize_batch(
    batch,
    tokenizer,
    max_doc_tokens: int | None,
    split_long: bool,
    add_special_tokens: bool,
    keep_text: bool,
    trust_remote_code: bool,
):
    import numpy as np
    import pyarrow as pa

    tok = cached_tokenizer(str(tokenizer), trust_remote_code) if isinstance(tokenizer, str) else tokenizer
    texts = batch.column("text").to_pylist()
    extra = [c for c in batch.column_names if c not in ("text", "input_ids", "num_tokens")]
    ids = tok(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []
    out_ids: list[np.ndarray] = []
    rows: list[int] = []
    for i, seq in enumerate(ids):
        arr = np.asarray(seq, dtype=np.int32)
        if max_doc_tokens and len(arr) > max_doc_tokens:
            if split_long:
                for start in range(0, len(arr), max_doc_tokens):
                    out_ids.append(arr[start : start + max_doc_tokens])
                    rows.append(i)
                continue
            arr = arr[:max_doc_tokens]
        if len(arr):
            out_ids.append(arr)
            rows.append(i)
    lengths = np.fromiter((len(a) for a in out_ids), dtype=np.int32, count=len(out_ids))
    offsets = np.zeros(len(out_ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(out_ids) if out_ids else np.zeros(0, dtype=np.int32)
    cols: dict[str, Any] = {
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32())),
        "num_tokens": pa.array(lengths),
    }
    take = pa.array(np.asarray(rows, dtype=np.int64))
    if keep_text:
        cols["text"] = batch.column("text").take(take)
    for name in extra:
        cols[name] = batch.column(name).take(take)
    return pa.table(cols)


def tokenize_corpus(
    ds,
    tokenizer,
    *,
    max_doc_tokens: int | None = 4096,
    split_long: bool = False,
    add_special_tokens: bool = True,
    keep_text: bool = False,
    batch_size: int = 256,
    num_cpus: float = 1,
    trust_remote_code: bool = False,
):
    """Add ``input_ids`` (int32 lists) and ``num_tokens`` to a dataset with a ``text`` column.

    Args:
        tokenizer: a model directory or Hub name (loaded once per Ray worker through
            :func:`nexus.models.loading.load_tokenizer`) or a tokenizer object.
        max_doc_tokens: the document-length cap (``None``: no cap). Longer documents are
            truncated, or cut into consecutive pieces of at most this many tokens when
            ``split_long`` is true.
        keep_text: keep the ``text`` column (dropped by default to save memory); any other
            columns (``path``) are kept.
        Documents with no tokens are dropped.
    """
    if max_doc_tokens is not None and max_doc_tokens <= 0:
        raise NexusError(f"max_doc_tokens must be positive, got {max_doc_tokens}")
    if split_long and not max_doc_tokens:
        raise NexusError("split_long needs max_doc_tokens")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = os.fspath(tokenizer)
        cached_tokenizer(tokenizer, trust_remote_code)  # fail here, on the driver, if it is missing
    return ds.map_batches(
        _tokenize_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=num_cpus,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_doc_tokens": max_doc_tokens,
            "split_long": split_long,
            "add_special_tokens": add_special_tokens,
            "keep_text": keep_text,
            "trust_remote_code": trust_remote_code,
        },
    )
