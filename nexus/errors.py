"""User-facing errors.

Anything the user can fix (a path, a flag, a file from the wrong model) raises
:class:`NexusError`. The CLI prints it as one line and exits with status 2; programming
errors keep their traceback. Messages name the problem and the fix.
"""

from __future__ import annotations


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
