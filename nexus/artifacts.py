"""Atomic artifact directories and small JSON helpers.

Every stage writes its output into a hidden temporary sibling directory and renames it
into place only when everything was written, so an interrupted or failed stage never
leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nexus.errors import NexusError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to clobber an existing output unless asked, and check the parent is writable."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise NexusError(f"output directory {out} already exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NexusError(
            f"cannot create output location {parent}: {exc.strerror}; choose a writable path"
        ) from exc
    if not os.access(parent, os.W_OK):
        raise NexusError(f"output location {parent} is not writable; choose a writable path")
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds."""
    final = check_output_dir(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file the user handed us, with a one-line error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise NexusError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NexusError(f"{what} {path} is not valid JSON ({exc}); regenerate it") from exc


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
