"""Atomic artifact directories and small JSON helpers.

Every stage writes its output into a hidden temporary sibling directory and renames it
into place only when everything was written, so an interrupted or failed stage never
leaves a directory that looks finished. The temporary directory's name carries the host and
process id of its writer (``.NAME.tmp-HOST-PID-XXXXXXXX``), so one left behind by a process
that was killed (SIGKILL, a lost node) is recognised and removed by the next writer of the
same output on that host.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nexus.errors import NexusError


def is_uri(path: str | os.PathLike) -> bool:
    """A URI (``s3://``, ``gs://``, ``file://``...) rather than a local path."""
    return "://" in str(path)


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to clobber an existing output unless asked, and check the parent is writable.

    Writability is tested by creating (and removing) a directory there: permission bits say
    nothing for root, read-only mounts or /proc.
    """
    out = Path(path)
    if out.exists() and not overwrite:
        raise NexusError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise NexusError(f"output {out} is a file, not a directory; choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise NexusError(
                    f"cannot create output location {parent}: {p} is a file, not a directory; choose another path"
                )
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as exc:
        raise NexusError(
            f"cannot write to output location {parent}: {exc.strerror}; choose a writable path"
        ) from exc
    return out


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove ``final``'s temporary and replaced siblings left by dead processes on this host."""
    removed = []
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        for p in final.parent.glob(f".{glob.escape(final.name)}.{kind}-*"):
            owner = p.name[len(f".{final.name}.{kind}-") :]
            if kind == "tmp":  # HOST-PID-RANDOM
                owner = owner.rsplit("-", 1)[0]
            who, _, pid = owner.rpartition("-")
            if who == host and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds."""
    final = check_output_dir(path, overwrite)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_owner()}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".{final.name}.old-{_owner()}"
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
