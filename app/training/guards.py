"""Guards around a training run: one training per --model_dir, and write failures (a full
disk, an unwritable directory) reported in one line with how to resume.

Example (what `loop.train` does):

    with write_errors_reported(model_dir), training_lock(model_dir, strategy):
        ...  # LockedError at once if another app.train uses model_dir
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

from app.training.runtime import is_chief
from common import files, lock
from common.errors import UsageError

if TYPE_CHECKING:
    import tensorflow as tf

# Held in --model_dir for the whole run by the chief: one training per model directory.
LOCK_FILE = "train.lock"


@contextlib.contextmanager
def training_lock(model_dir: str, strategy: tf.distribute.Strategy) -> Iterator[None]:
    """Holds `model_dir/train.lock` (pid, host, start time) on the chief for the block: a
    file lock on a local disk, a lock object with a heartbeat in a bucket (`common.lock`).

    A lock left by a run that died (kill -9, power loss) is taken over, so a rerun resumes
    (in a bucket, once its heartbeat is `common.lock.STALE_SECONDS` old).

    Raises:
        common.lock.LockedError: another app.train is using `model_dir` (named).
    """
    if not is_chief(strategy):  # workers write only to their scratch directories
        yield
        return
    if not files.is_remote(model_dir) and lock.is_gcsfuse(model_dir):
        print(
            f"note: {model_dir} is on a gcsfuse mount: its {LOCK_FILE} keeps other runs on "
            "this machine out, not runs on other machines (a gs:// --model_dir has a lock "
            "object that does)"
        )
    with lock.hold(files.join(model_dir, LOCK_FILE), "app.train") as previous:
        if previous:
            print(
                f"note: taking over {LOCK_FILE} left by app.train {lock.describe(previous)}, "
                "which ended without releasing it"
            )
        yield


# Write failures that are the machine's state, not a bug: reported in one line.
_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


@contextlib.contextmanager
def write_errors_reported(model_dir: str) -> Iterator[None]:
    """Turns a full disk or an unwritable --model_dir into one `UsageError` line.

    Every file is written to a temporary name and moved into place, so the last good
    best.keras and backup are intact and the same command resumes once the disk has room.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise UsageError(
            f"cannot write {e.filename or model_dir}: {_WRITE_ERRNOS[e.errno]} ({e.strerror}); "
            f"the last best.keras and backup in {model_dir} are intact: free space or fix "
            "permissions, then rerun the same command to resume"
        ) from e
