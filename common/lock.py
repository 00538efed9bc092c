"""One writer per directory: a lock naming its holder (pid, host, start time).

On a local disk the lock is a file with an advisory `flock`, so the kernel releases it when
its holder dies (even by `kill -9`): a lock left by a killed run is found unheld and taken
over, and the file's contents only say who held it. Where the file system offers no `flock`
(some network file systems), the contents decide: a holder on this host whose pid is gone is
stale. On a gcsfuse mount (`is_gcsfuse`) `flock` works, but for this machine only.

In a bucket (`gs://`, `ram://`; any remote path) there is no `flock` and no create-if-absent
through `tf.io.gfile`, so the lock is a best-effort lock OBJECT: its holder, a random token and
a heartbeat time written inside it (object modification times are unreliable: `ram://` has
none), rewritten every `HEARTBEAT_SECONDS` by a background thread (write a temporary object,
rename it over). It is refused while its heartbeat is fresh, and taken over once it is
`STALE_SECONDS` old (its holder died without removing it), or at once when its holder ran on
this host and is gone (a restarted container keeps its host name). After writing its own, a
holder reads it back `SETTLE_SECONDS` later and gives way if another run's replaced it; two
runs that start within about that second can still both take it.

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
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from common import files
from common.errors import UsageError

# The lock object in a bucket: its heartbeat period, and the age at which it is taken over
# (several missed heartbeats, and clock differences between hosts of a minute or so).
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 150.0
# How long a new holder waits before reading its lock object back.
SETTLE_SECONDS = 1.0
# /proc/self/mountinfo's file-system type of a gcsfuse mount (since 2022; older: `fuse`).
GCSFUSE = "fuse.gcsfuse"

log = logging.getLogger(__name__)
# Tokens of the lock objects this process holds (a restarted container may reuse a pid).
_HELD: set[str] = set()


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


def _holder(purpose: str) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "purpose": purpose,
    }


@contextlib.contextmanager
def hold(
    path: str,
    purpose: str,
    heartbeat: float = HEARTBEAT_SECONDS,
    stale_after: float = STALE_SECONDS,
    settle: float = SETTLE_SECONDS,
) -> Iterator[dict]:
    """Holds the lock `path` for the `with` block; yields the previous holder's contents
    when it was left behind by a process that died ({} otherwise). The lock is removed at
    the end (a local lock's directory too, when this made it and it stayed empty).

    Args:
        path: the lock file, or the lock object when remote (see the module docstring).
        purpose: who holds it, for the message another holder gets.
        heartbeat, stale_after, settle: the lock object's timing (remote paths only).

    Raises:
        LockedError: another live process holds it (named in the message).
    """
    if files.is_remote(path):
        with _hold_object(path, purpose, heartbeat, stale_after, settle) as previous:
            yield previous
        return
    with _hold_file(path, purpose) as previous:
        yield previous


@contextlib.contextmanager
def _hold_file(path: str, purpose: str) -> Iterator[dict]:
    """`hold` for a local path: a lock file with `flock`."""
    directory = os.path.dirname(os.path.abspath(path))
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    me = _holder(purpose)
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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def heartbeat_age(holder: dict) -> float | None:
    """Seconds since the heartbeat written in a lock object; None when it has none."""
    try:
        beat = datetime.datetime.fromisoformat(holder["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return None
    return (datetime.datetime.now(datetime.UTC) - beat).total_seconds()


def _read_object(path: str) -> dict:
    """A lock object's contents; {} when there is none or it is not ours to read."""
    try:
        holder = json.loads(files.read_text(path))
    except (FileNotFoundError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_object(path: str, me: dict) -> None:
    files.write_json(path, {**me, "heartbeat": _now()})  # a temporary object renamed over


class _Heartbeat(threading.Thread):
    """Rewrites the lock object's heartbeat every `every` seconds while its token is ours."""

    def __init__(self, path: str, me: dict, every: float):
        super().__init__(name=f"lock heartbeat {path}", daemon=True)
        self.path, self.me, self.every = path, me, every
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.every):
            try:
                current = _read_object(self.path)
                if current.get("token") != self.me["token"]:
                    log.warning(
                        "%s was taken over by %s %s; this run no longer holds it",
                        self.path,
                        current.get("purpose", "another run"),
                        describe(current),
                    )
                    return
                _write_object(self.path, self.me)
            except (OSError, UsageError) as e:  # a network blip: the next beat tries again
                log.warning("cannot refresh %s (%s); trying again", self.path, e)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _gone(holder: dict) -> bool:
    """Whether a lock object's holder ran on this host and is no longer running."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return holder.get("token") not in _HELD
    return not _alive(pid)


@contextlib.contextmanager
def _hold_object(
    path: str, purpose: str, heartbeat: float, stale_after: float, settle: float
) -> Iterator[dict]:
    """`hold` for a remote path: a lock object with a heartbeat (best effort)."""
    me = {**_holder(purpose), "token": uuid.uuid4().hex}
    where = files.dirname(path)
    previous = _read_object(path)
    age = heartbeat_age(previous)
    if age is not None and age < stale_after and not _gone(previous):
        raise LockedError(
            f"{where} is in use by {previous.get('purpose', 'another run')} "
            f"{describe(previous)}, alive {age:.0f} s ago; wait for it to finish or stop it, "
            f"or choose another directory (lock object: {path}, taken over once its "
            f"heartbeat is {stale_after:g} s old)"
        )
    _write_object(path, me)
    time.sleep(settle)
    current = _read_object(path)
    if current.get("token") != me["token"]:
        raise LockedError(
            f"{where} was just taken by {current.get('purpose', 'another run')} "
            f"{describe(current)}, started at the same time; wait for it to finish or stop "
            f"it, or choose another directory (lock object: {path})"
        )
    beat = _Heartbeat(path, me, heartbeat)
    beat.start()
    _HELD.add(me["token"])
    try:
        yield previous
    finally:
        _HELD.discard(me["token"])
        beat.stop()
        if _read_object(path).get("token") == me["token"]:
            files.remove(path)


def mount_of(path: str, mountinfo: str | None = None) -> tuple[str, str, str]:
    """(mount point, file-system type, source) of the mount holding local `path`.

    Args:
        path: a local path (need not exist yet).
        mountinfo: the text of /proc/self/mountinfo (read when None; on systems without it
            the answer is ("", "", "")).
    """
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:  # a local file of the kernel's
                mountinfo = f.read()
        except OSError:
            return "", "", ""
    real = os.path.realpath(files.resolve(path))
    best = ("", "", "")
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, kinds = left.split(), right.split()
        if len(fields) < 5 or len(kinds) < 2:
            continue
        # Field 5 is the mount point, octal-escaped (a space is \040).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):  # the longest; a later over-mount wins ties
            best = (point, kinds[0], kinds[1])
    return best


def is_gcsfuse(path: str, mountinfo: str | None = None) -> bool:
    """Whether local `path` is inside a gcsfuse mount of a bucket (where `flock` holds
    for this machine only)."""
    return mount_of(path, mountinfo)[1] == GCSFUSE
