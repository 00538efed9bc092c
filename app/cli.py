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


def no_arguments(argv: list[str]) -> None:
    """Refuses positional arguments for a program that takes flags only.

    Raises:
        UsageError: naming them.
    """
    from common.errors import UsageError

    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}; every setting is a --flag")


def show_progress_of(*loggers: str) -> None:
    """Shows these loggers' INFO lines and hides TensorFlow's, unless --verbosity is given.

    TensorFlow's own INFO lines (one per saved function and asset, through absl and its
    "tensorflow" logger) would bury a program's progress lines.
    """
    import logging

    from absl import flags
    from absl import logging as absl_logging

    if flags.FLAGS["verbosity"].present:  # an explicit --verbosity keeps absl's levels
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    for name in loggers:
        logging.getLogger(name).setLevel(logging.INFO)


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, with user errors printed as `error: ...` and exit code 2."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)
