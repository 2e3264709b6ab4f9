"""User-facing errors.

Anything the user can fix (a path, a flag, a file from the wrong model) raises
:class:`NexusError`. The CLI prints it as one line and exits with status 2; programming
errors keep their traceback. Messages name the problem and the fix.

A :class:`NexusError` raised inside a Ray task, actor, Ray Data UDF or Ray Train worker
reaches the driver wrapped in Ray's own errors; :func:`user_errors` is the one place that
turns it back into the same one line.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

#: library errors that mean "this input file is damaged", reported as one line too
_READ_ERRORS = ("ArrowInvalid", "ArrowTypeError", "JSONDecodeError", "UnicodeDecodeError", "ArrowIOError")


class NexusError(Exception):
    """A problem with the user's input or environment, printed as one line by the CLI."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line: a multi-line message would be hard to grep in cluster logs.
        super().__init__(" ".join(str(message).split()))
        #: the message as raised (Ray Data appends retry notes to ``args`` of errors from its
        #: tasks; this attribute travels with the exception unchanged)
        self.message = self.args[0]


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of a library's exception, for a one-line error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: ``__cause__``, ``__context__``, Ray's ``cause``
    and Ray Train's ``worker_failures``."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())


def user_error(exc: BaseException) -> NexusError | None:
    """The :class:`NexusError` that a failure from a Ray task, actor or Ray Train worker
    carries, as a fresh one-line error; None if it carries none (a bug: keep its traceback).

    Ray re-raises a remote exception as a ``RayTaskError`` that subclasses the remote type and
    whose message is the remote traceback; the original is its ``cause``. Failing that, the
    ``NexusError: ...`` line of a shipped traceback.
    """
    found = list(causes(exc))
    for e in reversed(found):
        if type(e) is NexusError:
            return NexusError(getattr(e, "message", str(e)))
    lines = re.findall(r"NexusError: (.+)", "\n".join(str(e) for e in found))
    return NexusError(lines[-1]) if lines else None


def _read_error(exc: BaseException, what: str) -> NexusError | None:
    """A pyarrow/JSON parse error from a reader other than ours, as "error while ..."."""
    for e in causes(exc):
        if type(e).__name__ in _READ_ERRORS:
            return NexusError(f"error while {what}: {first_line(e)}")
    text = str(exc)
    for name in _READ_ERRORS:
        if name in text:
            line = next(ln for ln in text.splitlines() if name in ln)
            return NexusError(f"error while {what}: {line.strip()}")
    return None


class _HeldErrors(logging.Filter):
    """The error records one of Ray Data's console handlers is asked to print, held back."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler
        self.records: list[logging.LogRecord] = []
        handler.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.records.append(record)
        return False

    def close(self, show: bool) -> None:
        self.handler.removeFilter(self)
        for record in self.records if show else ():
            self.handler.handle(record)


@contextlib.contextmanager
def user_errors(what: str = "reading the corpus") -> Iterator[None]:
    """Turn failures inside Ray that the user can fix into one-line :class:`NexusError`.

    Wrap every ``ray.get``, dataset iteration or ``trainer.fit()`` whose work can raise a
    :class:`NexusError` (a damaged document named by file and line, a missing text field,
    statistics of another model) or a pyarrow parse error from a reader other than ours
    (reported as "error while ``what``"). A :class:`NexusError` raised in a Ray task arrives
    wrapped in Ray's task errors and is raised again as itself (:func:`user_error`). Ray Data
    logs a failed task's traceback on the console before the driver sees the exception: those
    records are held back while the block runs, dropped when the failure ends as a one-line
    error, and printed otherwise (a bug keeps its traceback, and Ray Data's records).
    """
    held = [
        _HeldErrors(h) for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)
    ]
    show = True
    try:
        yield
    except Exception as exc:
        found = exc if type(exc) is NexusError else user_error(exc) or _read_error(exc, what)
        if found is None:
            raise
        show = False
        if found is exc:
            raise
        raise found from exc
    finally:
        for h in held:
            h.close(show)
