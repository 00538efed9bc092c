"""One writer per directory: a lock file naming its holder (pid, host, start time).

The lock is an advisory `flock` on the file, so the kernel releases it when its holder dies
(even by `kill -9`): a lock left by a killed run is found unheld and taken over, and the
file's contents only say who held it. Where the file system offers no `flock` (some network
file systems), the contents decide: a holder on this host whose pid is gone is stale.

Example:

    from common.lock import hold
    with hold("runs/cpu_quick/train.lock", "app.train") as previous:
        ...  # raises LockedError at once if another process holds it
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator

from common.errors import UsageError


class LockedError(UsageError):
    """The directory is in use by another process, named in the message."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def describe(holder: dict) -> str:
    """ "pid 123 on host h (started 2026-01-01T00:00:00+00:00)" from a lock's contents."""
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(started {holder.get('started', '?')})"
    )


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _flock(fd: int) -> bool:
    """True: locked; False: held by another process. Unsupported: True (contents decide)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    return True


@contextlib.contextmanager
def hold(path: str, purpose: str) -> Iterator[dict]:
    """Holds the lock file `path` for the `with` block; yields the previous holder's
    contents when it was left behind by a process that died ({} otherwise). The file is
    removed at the end, and its directory too when this made it and it stayed empty.

    Raises:
        LockedError: another live process holds it (named in the message).
    """
    directory = os.path.dirname(os.path.abspath(path))
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "purpose": purpose,
    }
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = _flock(fd)
        previous = _read(fd)
        if locked and os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
            break
        os.close(fd)
        if locked:  # the file was replaced or removed between open and flock: again
            continue
        raise LockedError(
            f"{os.path.dirname(os.path.abspath(path))} is in use by {purpose} "
            f"{describe(previous)}; wait for it to finish or stop it, or choose another "
            f"directory (lock: {path})"
        )
    # Without flock, the contents decide: a live holder, or one on another host, is kept.
    if previous and previous.get("pid") != me["pid"]:
        same_host = previous.get("host") == me["host"]
        if not _flock_supported(fd) and (not same_host or _alive(int(previous.get("pid", 0)))):
            os.close(fd)
            raise LockedError(f"{path} is held by {describe(previous)}")
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        yield previous
    finally:
        with contextlib.suppress(OSError):
            # Remove it while still holding it: a waiting opener sees another inode, retries.
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.remove(path)
        os.close(fd)
        if created:  # a run that failed before writing anything leaves no empty directory
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def _flock_supported(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already ours: succeeds again
    except OSError as e:
        return e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
    return True
