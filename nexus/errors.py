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


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of a library's exception, for a one-line error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: chained exceptions, Ray's ``.cause``, and the per-worker
    errors of a failed Ray Train run (``worker_failures``)."""
    seen = set()
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


@contextlib.contextmanager
def user_errors(what: str = "reading the corpus") -> Iterator[None]:
    """Turn failures inside Ray that the user can fix into one-line :class:`NexusError`.

    Wrap every ``ray.get``, dataset iteration or ``trainer.fit()`` whose work can raise a
    :class:`NexusError` (a missing text field, statistics of another model) or a pyarrow parse
    error (a damaged corpus file; reported as "error while ``what``"). Anything else keeps its
    traceback.
    """
    try:
        yield
    except Exception as exc:
        if type(exc) is NexusError:
            raise
        causes = list(_causes(exc))
        for e in reversed(causes):
            if type(e) is NexusError:
                raise NexusError(str(e)) from exc
        for e in causes:  # Ray's error classes that derive from the task's exception type
            if isinstance(e, NexusError):
                raise NexusError(str(e).strip().splitlines()[-1]) from exc
        for e in causes:
            if type(e).__name__ in _READ_ERRORS:
                raise NexusError(f"error while {what}: {first_line(e)}") from exc
        text = str(exc)
        # Ray ships the worker's traceback as text: find the NexusError line in it
        found = re.findall(r"nexus\.errors\.NexusError: (.+)", text)
        if found:
            raise NexusError(found[-1].strip()) from exc
        for name in _READ_ERRORS:
            if name in text:
                line = next((ln for ln in text.splitlines() if name in ln), text.splitlines()[0])
                raise NexusError(f"error while {what}: {line.strip()}") from exc
        raise
