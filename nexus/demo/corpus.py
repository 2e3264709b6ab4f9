"""The built-in demo corpus: text that ships with every Python installation.

Two genres of the standard library, split by genre:

* **general** (pretraining): the standard library's Python **code**, with comments, but
  with every docstring taken out;
* **domain** (the specialisation target): the standard library's **documentation
  prose**: those docstrings, plus the language-reference topics of ``pydoc_data``.

Each module (and each reference topic) belongs to exactly one of *train* or *held-out*,
chosen by a hash of its name, so held-out text comes from modules whose code and
docstrings the model never saw. See ``docs/demo.md`` for why this is a fair domain shift.

Gathering is deterministic: files in sorted order, no timestamps, and a SHA-256 of the
gathered rows (``content_sha256``) keys every cache built from it.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from nexus.errors import NexusError

#: bump when gathering or splitting changes, so cached corpora and models are rebuilt
CORPUS_VERSION = 1
FORMAT = "nexus-demo-corpus"

GENERAL, DOMAIN = "general", "domain"
GENERAL_HELDOUT, DOMAIN_HELDOUT = "general_heldout", "domain_heldout"
SPLITS = (GENERAL, DOMAIN, GENERAL_HELDOUT, DOMAIN_HELDOUT)

#: share of modules (and of reference topics) held out for evaluation, per mille
HELDOUT_PERMILLE = 100
#: rows are chunks of at most this many characters, cut at blank lines where possible
MAX_CHARS = 4000

#: directories never read: tests and test data (absent from many installs), installed
#: third-party packages, codec tables (mostly escaped bytes), the documentation module
#: (it is domain text, gathered separately), caches and build configuration
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SKIP_TOP = {"encodings", "pydoc_data", "__phello__", "lib-dynload"}


@dataclass
class DemoCorpus:
    """The gathered corpus in memory: rows ``{"text", "source", "kind"}`` per split."""

    splits: dict[str, list[dict]]
    sha256: str
    python: str
    stdlib: str
    skipped: list[str] = field(default_factory=list)

    def texts(self, split: str) -> list[str]:
        return [row["text"] for row in self.splits[split]]

    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "version": CORPUS_VERSION,
            "content_sha256": self.sha256,
            "python": self.python,
            "heldout_fraction": HELDOUT_PERMILLE / 1000,
            "max_chars": MAX_CHARS,
            "splits": {
                name: {
                    "rows": len(rows),
                    "characters": sum(len(r["text"]) for r in rows),
                    "sources": len({r["source"] for r in rows}),
                    "kinds": sorted({r["kind"] for r in rows}),
                    "sha256": _rows_sha256(rows),
                }
                for name, rows in self.splits.items()
            },
            "description": {
                GENERAL: "standard-library Python code (comments kept, docstrings removed), training modules",
                DOMAIN: "standard-library documentation prose: docstrings of the training modules and "
                "pydoc_data reference topics",
                GENERAL_HELDOUT: "code of the held-out modules",
                DOMAIN_HELDOUT: "docstrings of the held-out modules and held-out reference topics",
            },
            "skipped_unparsable": self.skipped,
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def heldout(key: str, permille: int = HELDOUT_PERMILLE) -> bool:
    """Whether source ``key`` is held out: a hash of its name, so the split is deterministic
    and a source (module, topic, distribution, file) is never on both sides."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 1000 < permille


def _rows_sha256(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if _SKIP_PARTS.intersection(rel) or rel[0] in _SKIP_TOP or rel[0].startswith("config-"):
            continue
        if path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_docstrings(source: str) -> tuple[str, list[str]]:
    """(code without docstrings, the docstrings cleaned with ``inspect.cleandoc``).

    A docstring that shares a line with other code stays in the code (and is not
    returned), so the two outputs never overlap. A body left empty gets ``pass``.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    cut: dict[int, str | None] = {}  # 0-based line -> replacement (None: drop)
    docs: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if not (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            continue
        expr = body[0]
        first, last = expr.lineno - 1, expr.end_lineno - 1
        head = lines[first].encode()[: expr.col_offset]
        tail = lines[last].encode()[expr.end_col_offset :]
        if head.strip() or tail.strip():
            continue
        text = inspect.cleandoc(expr.value.value).strip()
        if text:
            docs.append((expr.lineno, text))
        only = len(body) == 1 and not isinstance(node, ast.Module)
        indent = head.decode()
        for i in range(first, last + 1):
            cut[i] = None
        if only:
            cut[first] = f"{indent}pass\n"
    out = []
    for i, line in enumerate(lines):
        if i in cut:
            if cut[i] is not None:
                out.append(cut[i])
        else:
            out.append(line)
    code = "".join(out).strip("\n")
    return (code + "\n" if code else ""), [t for _, t in sorted(docs)]


def chunk(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, at blank lines, else at line ends."""
    pieces: list[str] = []
    current = ""
    for para in text.split("\n\n"):
        units = [para] if len(para) <= max_chars else _hard_split(para, max_chars)
        for unit in units:
            candidate = f"{current}\n\n{unit}" if current else unit
            if len(candidate) <= max_chars:
                current = candidate
            else:
                if current.strip():
                    pieces.append(current)
                current = unit
    if current.strip():
        pieces.append(current)
    return pieces


def _hard_split(text: str, max_chars: int) -> list[str]:
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            out.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            out.append(current.rstrip("\n"))
            current = ""
        current += line
    if current:
        out.append(current.rstrip("\n"))
    return [o for o in out if o]


def _reference_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return {}
    return dict(topics)


_GATHERED: dict[tuple[str, str], DemoCorpus] = {}


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def gather_corpus(root: str | Path | None = None) -> DemoCorpus:
    """Read the standard library and build the four splits (a few seconds).

    The result is remembered for the process (keyed by the files' sizes and modification
    times), so repeated calls are cheap; treat it as read-only.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = _stdlib_files(root)
    if not files:
        raise NexusError(f"found no Python sources under {root}; is this a full Python installation?")
    key = (str(root), _fingerprint(files))
    if key not in _GATHERED:
        _GATHERED.clear()
        _GATHERED[key] = _gather(root, files)
    return _GATHERED[key]


def _gather(root: Path, files: list[Path]) -> DemoCorpus:
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    skipped: list[str] = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            with tokenize.open(path) as fh:
                source = fh.read()
            code, docs = split_docstrings(source)
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
            skipped.append(rel)
            continue
        held = heldout(rel)
        code_split, doc_split = (GENERAL_HELDOUT, DOMAIN_HELDOUT) if held else (GENERAL, DOMAIN)
        for piece in chunk(code):
            splits[code_split].append({"text": piece, "source": rel, "kind": "code"})
        for piece in chunk("\n\n".join(docs)):
            splits[doc_split].append({"text": piece, "source": rel, "kind": "docstring"})
    for name, text in sorted(_reference_topics().items()):
        key = f"pydoc_data/topics/{name}"
        split = DOMAIN_HELDOUT if heldout(key) else DOMAIN
        for piece in chunk(text.strip()):
            splits[split].append({"text": piece, "source": key, "kind": "reference"})
    digest = hashlib.sha256()
    digest.update(f"{FORMAT}/{CORPUS_VERSION}\n".encode())
    for name in SPLITS:
        digest.update(f"{name}:{_rows_sha256(splits[name])}\n".encode())
    return DemoCorpus(
        splits=splits,
        sha256=digest.hexdigest(),
        python=sys.version.split()[0],
        stdlib=str(root),
        skipped=skipped,
    )


def write_corpus(corpus: DemoCorpus, out: str | Path, overwrite: bool = False) -> Path:
    """Write every split as ``<split>.jsonl`` and ``<split>.parquet`` plus ``manifest.json``, atomically."""
    from nexus.util.artifacts import atomic_dir, write_json

    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name in SPLITS:
            write_split(tmp, name, corpus.splits[name])
        write_json(tmp / "manifest.json", corpus.manifest())
    return Path(out)


def write_split(directory: Path, split: str, rows: list[dict]) -> None:
    """``<split>.jsonl`` and ``<split>.parquet`` (columns text, source, kind) in ``directory``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    columns = {key: pa.array([r[key] for r in rows], type=pa.string()) for key in ("text", "source", "kind")}
    pq.write_table(pa.table(columns), directory / f"{split}.parquet")


def read_manifest(corpus_dir: str | Path) -> dict:
    from nexus.util.artifacts import read_json

    manifest = read_json(Path(corpus_dir) / "manifest.json", "demo corpus manifest")
    if manifest.get("format") != FORMAT:
        raise NexusError(
            f"{corpus_dir} is not a NEXUS demo corpus (no {FORMAT} manifest); run nexus demo-corpus"
        )
    return manifest


def read_split(corpus_dir: str | Path, split: str) -> list[str]:
    """The texts of one split of a written demo corpus."""
    if split not in SPLITS:
        raise NexusError(f"unknown demo split '{split}'; choose one of {', '.join(SPLITS)}")
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise NexusError(f"demo corpus split not found: {path}; rebuild it with nexus demo-corpus")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]
