"""User errors and the one line of a long error message worth showing."""

from __future__ import annotations

import re

# Lines of TensorFlow runtime errors that never say what was wrong.
_NOISE = ("Graph execution error", "Detected at node", "<stack traces", "[[")
MAX_LINE = 300


class UsageError(ValueError):
    """A bad setting, input file or model: reported as one line, exit code 2."""


def first_line(error: BaseException | str) -> str:
    """The first line of `error` that says what was wrong, at most `MAX_LINE` characters.

    TensorFlow op errors wrap the cause in "Graph execution error:", node names
    ("{{node ...}}"), op tags ("[Op:DecodeImage]") and stack traces; those are dropped.
    Falls back to the exception's type name when it has no message.
    """
    if isinstance(error, BaseException):
        message = getattr(error, "message", None) or str(error)
    else:
        message = error
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[Op:\w+\]", "", message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_NOISE)]
    line = (useful or lines or [""])[0]
    if not line and isinstance(error, BaseException):
        line = type(error).__name__
    return line[:MAX_LINE]
