"""Atomic artifact directories, output claims, and small JSON helpers.

Every stage writes its output into a hidden temporary sibling directory and renames it
into place only when everything was written, so an interrupted or failed stage never
leaves a directory that looks finished. The temporary directory's name carries the host and
process id of its writer (``.NAME.tmp-HOST-PID-XXXXXXXX``), so one left behind by a process
that was killed (SIGKILL, a lost node) is recognised and removed by the next writer of the
same output on that host.

A stage also *claims* its output when it starts (:func:`claim_output`, where it checks the
output location): a claim file ``.NAME.claim`` next to the output names the writer (host,
pid, process start time, since when). A second writer of the same output is refused at once,
before any work, with one line naming the holder, instead of finding out at the end. The
claim is released when :func:`atomic_dir` finishes or fails, or when the stage function
returns or raises (:func:`claims_released`). A claim whose process is dead (same host, pid
gone or reused) is stale and taken over, as temporary directories are removed. Claims are
taken by the driver process only (Ray tasks never write outputs).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
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


# -- output claims ------------------------------------------------------------------------------
#: claim files this process holds: claim file -> id of the thread that took it
_HELD: dict[Path, int] = {}
_HELD_LOCK = threading.Lock()
_SCOPES = threading.local()


def claim_file(output: str | os.PathLike) -> Path:
    """Where the claim on ``output`` lives: ``.NAME.claim`` next to it (absolute)."""
    final = Path(os.path.abspath(output))
    return final.parent / f".{final.name}.claim"


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; Linux), which tells the writer
    that made a claim from a later process that reuses its pid; None where unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _read_claim(file: Path) -> dict | None:
    try:
        holder = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: held by someone we cannot name
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict, file: Path) -> bool:
    """A claim of a process on this host that is gone (or a pid now used by another process)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return file not in _HELD  # this process's own, left by a call that did not release it
    start = holder.get("start")
    return not _pid_alive(pid) or (start is not None and _process_start(pid) not in (None, start))


def _refusal(output: Path, file: Path, holder: dict) -> NexusError:
    host = holder.get("host", "an unknown host")
    who = f"pid {holder.get('pid', '?')} on {host}, since {holder.get('since', '?')}"
    fix = "wait for it to finish or choose another output"
    if host != socket.gethostname():
        fix += f"; if that process is gone, delete {file}"
    return NexusError(f"output {output} is being written by another process ({who}); {fix}")


def _take(output: Path) -> tuple[Path, bool]:
    """Take the claim on ``output`` for this thread: (claim file, whether this call took it,
    False when this thread holds it already). Refuses, at once, a claim held elsewhere."""
    file = claim_file(output)
    me = threading.get_ident()
    with _HELD_LOCK:
        if file in _HELD:
            if _HELD[file] == me:
                return file, False
            raise _refusal(
                output, file, _read_claim(file) or {"pid": os.getpid(), "host": socket.gethostname()}
            )
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        for _ in range(5):
            try:
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_claim(file)
                if holder is None:
                    continue  # released meanwhile
                if not _stale(holder, file):
                    raise _refusal(output, file, holder) from None
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(record) + "\n")
            _HELD[file] = me
            return file, True
        raise _refusal(output, file, _read_claim(file) or {})


def _release(file: Path) -> None:
    """Drop this process's claim ``file`` (if it still names this process)."""
    with _HELD_LOCK:
        if _HELD.pop(file, None) is None:
            return
        holder = _read_claim(file)
        if (
            holder is not None
            and holder.get("pid") == os.getpid()
            and holder.get("host") == socket.gethostname()
        ):
            file.unlink(missing_ok=True)


@contextlib.contextmanager
def claims_released() -> Iterator[None]:
    """Release, when the block ends (returns or raises), every claim :func:`claim` took in it.

    Stage functions are decorated with it (``@claims_released()``), so the claim taken where
    a stage checks its output is held for the whole stage and never outlives it.
    """
    stack = _SCOPES.__dict__.setdefault("stack", [])
    stack.append([])
    try:
        yield
    finally:
        for file in reversed(stack.pop()):
            _release(file)


def claim(path: str | os.PathLike) -> Path:
    """Claim ``path`` for this process until the enclosing :func:`claims_released` block ends
    (or :func:`atomic_dir` on it finishes); a claim held by another live process is refused at
    once, with one line naming it. Returns the claim file."""
    stack = getattr(_SCOPES, "stack", None)
    if not stack:
        raise RuntimeError("claim() needs an enclosing `with claims_released():` (or the decorator)")
    file, taken = _take(Path(path))
    if taken:
        stack[-1].append(file)
    return file


def claim_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """:func:`check_output_dir`, then :func:`claim` the output: what a stage does first."""
    out = check_output_dir(path, overwrite)
    claim(out)
    return check_output_dir(out, overwrite)  # another writer may have finished it meanwhile


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    ``path`` is claimed (:func:`claim`) while the block runs, or kept claimed if this thread
    claimed it already, and released when the block finishes or fails.
    """
    final = check_output_dir(path, overwrite)
    file, _ = _take(final)
    try:
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
    finally:
        _release(file)


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
