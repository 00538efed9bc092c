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


def check_paths(argv: list[str]) -> None:
    """Refuses, before any work, every path among the flag values and arguments that
    cannot work: an unregistered scheme (`s3://`, ...), or `gs://` without network or
    credentials (`common.gcs_access`, seconds instead of TensorFlow's minutes of retries).

    Raises:
        common.files.StorageError: naming the path and what to do.
    """
    from absl import flags

    from common import files, gcs_access

    values = [v for v in flags.FLAGS.flag_values_dict().values() if isinstance(v, str)]
    paths = [p for p in (*values, *argv[1:]) if files.is_remote(p)]
    for path in paths:
        files.check_scheme(path)
    for path in paths:  # one probe answers for every gs:// path
        if files.scheme(path) == "gs":
            gcs_access.check(path)
            break


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`main` with its paths checked first (`check_paths`) and user errors printed as
    `error: ...` with exit code 2 (what `run` runs once absl has parsed the flags).

    Bad data met inside a `tf.data` pipeline (a corrupt record, say) reaches here as a
    TensorFlow error whose message the data layer marked: it is a user error too.
    """

    def guarded_main(argv: list[str]) -> None:
        try:
            check_paths(argv)
            main(argv)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:
            from app.data.types import pipeline_error

            line = pipeline_error(e)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)

    return guarded_main


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, guarded (`guarded`)."""
    app.run(guarded(main))
