"""User-facing errors.

Anything the user can fix (a path, a flag, a file from the wrong model) raises
:class:`NexusError`. The CLI prints it as one line and exits with status 2; programming
errors keep their traceback. Messages name the problem and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator


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
