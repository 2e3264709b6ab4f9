"""Reading and tokenising a corpus with Ray Data.

:func:`read_corpus` turns plain text files, JSON Lines and Parquet files (local paths,
directories, globs, or any URI that ``pyarrow.fs.FileSystem.from_uri`` accepts: ``s3://``,
``gs://``, ``hdfs://``, ``file://`` ...) into a lazy :class:`ray.data.Dataset` with one
``text`` column, one row per document. :func:`tokenize_corpus` adds ``input_ids`` with
``map_batches``.

Problems the user can fix are found up front, on the driver, before any Ray task runs: a
path that does not exist, a directory or glob with no corpus files, a corpus whose files
are all empty, an unreadable file, a file that claims to be Parquet but is not, a JSON
Lines or Parquet file without the text field, text that is not UTF-8. Each is a one-line
:class:`~nexus.errors.NexusError`. Problems that only show up while reading (a malformed
line deep inside a large file) surface when the dataset is consumed; wrap consumption in
:func:`nexus.errors.user_errors` to turn them into the same one-line errors.

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
from collections.abc import Sequence
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


def _check_text(f: CorpusFile) -> None:
    head = _head(f, 8192)
    if b"\x00" in head:
        raise NexusError(
            f"corpus file {f.uri} looks binary (NUL bytes), not UTF-8 text; is it the right file?"
        )
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte character cut at the end is fine
            raise NexusError(
                f"corpus file {f.uri} is not UTF-8 text (bad byte at offset {exc.start}); "
                "convert it to UTF-8 or pass the right --corpus-format"
            ) from exc


def _check_jsonl(f: CorpusFile, text_field: str) -> None:
    head = _head(f)
    if not head.strip():
        return
    lines = head.split(b"\n")
    if len(lines) > 1 and len(head) == 65536:
        lines = lines[:-1]  # the last line may be cut
    checked_field = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if number == 1 and head.lstrip().startswith(b"["):
                raise NexusError(
                    f"corpus file {f.uri} is a JSON array, not JSON Lines; write one JSON object per line"
                ) from exc
            raise NexusError(f"corpus file {f.uri} line {number} is not valid JSON ({exc.msg})") from exc
        if isinstance(obj, list) and number == 1:
            raise NexusError(
                f"corpus file {f.uri} is a JSON array, not JSON Lines; write one JSON object per line"
            )
        if not isinstance(obj, dict):
            raise NexusError(f"corpus file {f.uri} line {number} is not a JSON object")
        if not checked_field and text_field not in obj:
            fields = ", ".join(list(obj)[:10]) or "none"
            raise NexusError(
                f"corpus file {f.uri} has no field '{text_field}' (line {number} has: {fields}); "
                "pass --text-field NAME"
            )
        checked_field = True  # the first record names the field; every line in the head must parse


def _check_parquet(f: CorpusFile, text_field: str) -> None:
    import pyarrow as pa
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
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise NexusError(f"column '{text_field}' of corpus file {f.uri} holds {typ}, not text")


def check_corpus_files(files: Sequence[CorpusFile], text_field: str) -> None:
    """Eager one-line errors for the usual mistakes (all local files; the first few remote ones)."""
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
            _check_jsonl(f, text_field)
        else:
            _check_text(f)


# -- Ray Data pipeline --------------------------------------------------------------------------
def _split_text(text: str, unit: str) -> list[str]:
    if unit == "file":
        parts = [text]
    elif unit == "paragraph":
        parts = re.split(r"\n[ \t\r\f\v]*\n", text)
    else:
        parts = text.splitlines()
    return [p for p in (s.strip("\r\n") for s in parts) if p.strip()]


def _text_files_to_docs(batch, unit: str, include_paths: bool):
    import pyarrow as pa

    texts: list[str] = []
    paths: list[str] = []
    for raw, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NexusError(
                f"corpus file {path} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8"
            ) from None
        docs = _split_text(text, unit)
        texts.extend(docs)
        paths.extend([path] * len(docs))
    cols = {"text": pa.array(texts, type=pa.string())}
    if include_paths:
        cols["path"] = pa.array(paths, type=pa.string())
    return pa.table(cols)


def _select_text(batch, text_field: str, include_paths: bool):
    import pyarrow as pa
    import pyarrow.compute as pc

    if text_field not in batch.column_names:
        where = ""
        if "path" in batch.column_names and batch.num_rows:
            where = f" {batch.column('path')[0].as_py()}"
        fields = ", ".join(c for c in batch.column_names if c != "path") or "none"
        raise NexusError(
            f"corpus file{where} has no field '{text_field}' (fields: {fields}); pass --text-field NAME"
        )
    col = batch.column(text_field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
        if pa.types.is_string_view(col.type):
            col = col.cast(pa.string())
        else:
            raise NexusError(f"field '{text_field}' of the corpus holds {col.type}, not text")
    col = col.cast(pa.string())
    keep = pc.and_(pc.is_valid(col), pc.invert(pc.match_substring_regex(col, r"^\s*$")))
    keep = pc.fill_null(keep, False)
    cols = {"text": pc.filter(col, keep)}
    if include_paths and "path" in batch.column_names:
        cols["path"] = pc.filter(batch.column("path").cast(pa.string()), keep)
    return pa.table(cols)


def read_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    text_field: str = "text",
    *,
    file_format: str = "auto",
    text_unit: str = "line",
    include_paths: bool = False,
    check: bool = True,
    override_num_blocks: int | None = None,
):
    """A lazy Ray Dataset with one ``text`` column (and ``path`` with ``include_paths``).

    Args:
        paths: files, directories, globs or URIs (one or a list); see the module notes.
        text_field: field of JSON Lines records / column of Parquet files holding the text.
        file_format: ``auto`` (by extension), ``text``, ``jsonl`` or ``parquet``.
        text_unit: how text files split into documents: ``line``, ``paragraph`` or ``file``.
        include_paths: add a ``path`` column naming each document's file.
        check: run the eager checks (existence, format, text field) before building the plan.
        override_num_blocks: passed to the Ray readers (default: Ray decides).
    """
    import ray

    from nexus.util.cluster import ensure_ray

    if text_unit not in TEXT_UNITS:
        raise NexusError(f"unknown text unit '{text_unit}'; choose one of {', '.join(TEXT_UNITS)}")
    if not text_field:
        raise NexusError("the text field name is empty; pass --text-field NAME")
    files = resolve_corpus(paths, file_format)
    if check:
        check_corpus_files(files, text_field)
    ensure_ray()

    groups: dict[tuple[str, int], list[CorpusFile]] = {}
    filesystems: dict[int, Any] = {}
    for f in files:
        if f.size == 0:
            continue  # empty files hold no documents (and trip some readers)
        key = (f.format, id(f.filesystem))
        filesystems[id(f.filesystem)] = f.filesystem
        groups.setdefault(key, []).append(f)

    common: dict[str, Any] = {}
    if override_num_blocks is not None:
        common["override_num_blocks"] = override_num_blocks
    parts = []
    for (fmt, fs_id), group in groups.items():
        fs = filesystems[fs_id]
        file_paths = [f.path for f in group]
        if fmt == "parquet":
            ds = ray.data.read_parquet(
                file_paths,
                filesystem=fs,
                columns=[text_field],
                include_paths=include_paths,
                file_extensions=None,
                **common,
            )
            ds = ds.map_batches(
                _select_text,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"text_field": text_field, "include_paths": include_paths},
            )
        elif fmt == "jsonl":
            ds = ray.data.read_json(
                file_paths, filesystem=fs, lines=True, include_paths=True, file_extensions=None, **common
            )
            ds = ds.map_batches(
                _select_text,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"text_field": text_field, "include_paths": include_paths},
            )
        else:
            ds = ray.data.read_binary_files(
                file_paths, filesystem=fs, include_paths=True, file_extensions=None, **common
            )
            ds = ds.map_batches(
                _text_files_to_docs,
                batch_format="pyarrow",
                batch_size=1,
                fn_kwargs={"unit": text_unit, "include_paths": include_paths},
            )
        parts.append(ds)
    if not parts:
        raise NexusError("the corpus is empty: every file has zero bytes")
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    return ds


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
