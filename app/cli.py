"""What every command-line program shares: one clear error line, exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: reported without a traceback."""
    from common.errors import UsageError
    from models.weights import WeightsError

    errors: list[type[BaseException]] = [UsageError, WeightsError, FileNotFoundError]
    try:
        from app.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, with user errors printed as `error: ...` and exit code 2."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)
