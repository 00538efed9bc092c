"""The one file layer: every path a program reads or writes, local or in a bucket.

A path is a local path (`~` expanded) or a URL of a file system TensorFlow has registered:
`gs://` as installed, `ram://` (in-process, the tests' bucket), and whatever a plugin adds.
Remote paths go through `tf.io.gfile`, imported only for them, so local work (and `models/`
on another Keras backend) needs no TensorFlow; local paths go through the OS as before
(fsync, permissions, atomic rename).

Writes are crash-safe on both: a file is written under a temporary name beside its target,
then renamed over it, so a reader (a running `app.evaluate`, TF Serving polling an export)
sees the old file or the new one, never half of one. Nothing is rewritten in place: TF's
`ram://` opens an existing file for writing by appending. Temporary names start with `.`;
in a bucket they end with `TEMP_SUFFIX`, so a lifecycle rule (`matchesSuffix`) removes what a
killed writer left behind.

Example:

    from common import files
    files.write_json("gs://my-bucket/runs/r1/metrics.json", {"top1": 0.9})
    with files.atomic_path("gs://my-bucket/runs/r1/best.keras", suffix=".keras") as tmp:
        model.save(tmp)  # a local file, uploaded and renamed into place on success
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from typing import IO, Any

from common.errors import UsageError, first_line

# `scheme://...`: a file system of TensorFlow's (or of a plugin); `file://` is local.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# What temporary files and objects end with (a lifecycle rule removes them from buckets).
TEMP_SUFFIX = ".incomplete"


class StorageError(UsageError):
    """A remote path that cannot be used: unknown scheme, unreachable, no credentials."""


def scheme(path: str) -> str:
    """The URL scheme of `path` ("gs", "ram", ...), or "" for a local path."""
    match = _URL.match(os.fspath(path))
    return match.group(1).lower() if match else ""


def is_remote(path: str) -> bool:
    """Whether `path` goes through TensorFlow's file systems (any scheme but `file`)."""
    return scheme(path) not in ("", "file")


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


@functools.cache
def _registered_schemes() -> tuple[str, ...]:
    return tuple(sorted(s for s in _gfile().get_registered_schemes() if s not in ("", "file")))


def check_scheme(path: str) -> None:
    """Refuses a URL whose scheme no registered file system handles.

    Raises:
        StorageError: naming the path, the schemes there are, and what to do.
    """
    name = scheme(path)
    if name in ("", "file"):
        return
    registered = _registered_schemes()
    if name not in registered:
        stores = {"s3": "S3", "hdfs": "HDFS", "az": "Azure"}
        plugin = (
            f"no {stores[name]} file system works with TensorFlow 2.21 (tensorflow-io 0.37.1, "
            "the last release, fails to load on it)"
            if name in stores
            else "TensorFlow has no file system registered for it"
        )
        raise StorageError(
            f"{path}: {name}:// is not supported here: {plugin}; TensorFlow reads "
            f"{', '.join(f'{s}://' for s in registered)} and local paths: copy the files "
            "there (e.g. gsutil/gcloud storage, or a local disk)"
        )


def resolve(path: str) -> str:
    """The canonical form of a path: local ones absolute with `~` expanded (`file://`
    stripped); remote ones as given, after `check_scheme`."""
    path = os.fspath(path)
    if scheme(path) == "file":
        path = path[len("file://") :]
    if not is_remote(path):
        return os.path.abspath(os.path.expanduser(path))
    check_scheme(path)
    return path


def join(path: str, *parts: str) -> str:
    """`os.path.join` for local paths; `/`-joined for URLs."""
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
    """The folder holding `path` (for a URL, never above its bucket)."""
    if not is_remote(path):
        return os.path.dirname(resolve(path))
    head = posixpath.dirname(path.rstrip("/"))
    return head if "://" in head else path


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


@contextlib.contextmanager
def _reported(path: str) -> Iterator[None]:
    """TensorFlow's file-system errors as the built-in ones callers handle (`FileNotFoundError`,
    `PermissionError`), or as one `StorageError` line saying what to check."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.NotFoundError as e:
        raise FileNotFoundError(2, "not found", path) from e
    except tf.errors.PermissionDeniedError as e:
        raise PermissionError(13, first_line(e) or "permission denied", path) from e
    except tf.errors.UnimplementedError as e:
        check_scheme(path)
        raise StorageError(f"{path}: {first_line(e)}") from e
    except tf.errors.OpError as e:
        raise StorageError(
            f"cannot use {path} ({type(e).__name__}: {first_line(e)}); check the network, the "
            "bucket name and the credentials (GOOGLE_APPLICATION_CREDENTIALS, or the "
            "workload's service account on GKE)"
        ) from e


def _remote(path: str, call: str, *args: Any) -> Any:
    check_scheme(path)
    with _reported(path):
        return getattr(_gfile(), call)(path, *args)


def exists(path: str) -> bool:
    if is_remote(path):
        return bool(_remote(path, "exists"))
    return os.path.exists(resolve(path))


def isdir(path: str) -> bool:
    if is_remote(path):
        return bool(_remote(path, "isdir"))
    return os.path.isdir(resolve(path))


def isfile(path: str) -> bool:
    if is_remote(path):
        try:
            return not _remote(path, "stat").is_directory
        except FileNotFoundError:
            return False
    return os.path.isfile(resolve(path))


def listdir(path: str) -> list[str]:
    """Sorted names in folder `path` (folders without a trailing `/`)."""
    if not is_remote(path):
        return sorted(os.listdir(resolve(path)))
    names = sorted(name.rstrip("/") for name in _remote(path, "listdir"))
    if scheme(path) == "ram":  # lists keys by prefix: `a` shows `a.extra/x` as `.extra`
        names = [name for name in names if _gfile().exists(join(path, name))]
    return names


def glob(pattern: str) -> list[str]:
    """Sorted paths matching `pattern` (`*`, `?`, `[...]` in the last parts)."""
    if is_remote(pattern):
        return sorted(_remote(pattern, "glob"))
    import glob as glob_lib

    return sorted(glob_lib.glob(resolve(pattern)))


def size(path: str) -> int:
    """Bytes of a file."""
    if is_remote(path):
        return int(_remote(path, "stat").length)
    return os.path.getsize(resolve(path))


def makedirs(path: str) -> None:
    """Creates folder `path` and its parents (nothing when it exists)."""
    if is_remote(path):
        _remote(path, "makedirs")
    else:
        os.makedirs(resolve(path), exist_ok=True)


def remove(path: str) -> None:
    """Deletes a file; a missing one is not an error."""
    if is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            _remote(path, "remove")
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(resolve(path))


def rmtree(path: str) -> None:
    """Deletes a folder and everything in it; a missing one is not an error."""
    if is_remote(path):
        if exists(path):
            with contextlib.suppress(FileNotFoundError):
                _remote(path, "rmtree")
    else:
        shutil.rmtree(resolve(path), ignore_errors=True)


def rename(source: str, target: str) -> None:
    """Moves file `source` over `target` (replacing it): atomic on a local disk; on an object
    store a copy then a delete, which readers see as the old object until the new one is
    complete."""
    if is_remote(source) or is_remote(target):
        check_scheme(target)
        with _reported(source):
            _gfile().rename(source, target, overwrite=True)
    else:
        os.replace(resolve(source), resolve(target))


def copy(source: str, target: str) -> None:
    """Copies file `source` to `target` (either may be remote) without holding it in memory,
    atomically: to a temporary name beside `target`, then renamed over it."""
    if not is_remote(target):
        with atomic_path(target) as tmp:
            if not is_remote(source):
                shutil.copyfile(resolve(source), tmp)
            else:
                _remote(source, "copy", tmp, True)  # overwrite: the empty temporary file
        return
    check_scheme(target)
    makedirs(dirname(target))  # ram:// lists only folders made explicitly
    tmp = _temp_name(target)
    try:
        with _reported(source):
            _gfile().copy(source if is_remote(source) else resolve(source), tmp, overwrite=True)
        rename(tmp, target)
    finally:
        remove(tmp)


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """(folder, sorted subfolders, sorted files) top down, as `os.walk` (on `ram://` a folder
    shows only once made explicitly, as `makedirs` and `write_bytes` do)."""
    if not is_remote(top):
        for folder, subfolders, names in os.walk(resolve(top)):
            yield folder, sorted(subfolders), sorted(names)
        return
    entries = [(name, isdir(join(top, name))) for name in listdir(top)]
    yield top, [name for name, folder in entries if folder], [n for n, f in entries if not f]
    for name, folder in entries:
        if folder:
            yield from walk(join(top, name))


def relpath(path: str, start: str) -> str:
    """`path` relative to folder `start` (`path` as given when it lies elsewhere)."""
    prefix = start.rstrip("/") + "/"
    if is_remote(path):
        return "." if path + "/" == prefix else path.removeprefix(prefix)
    return os.path.relpath(resolve(path), resolve(start))


def open_read(path: str, binary: bool = True) -> IO:
    """A file object to read `path` from, for readers that stream (close it, or use `with`).

    Raises:
        FileNotFoundError: there is no such file.
    """
    mode = "rb" if binary else "r"
    if is_remote(path):
        check_scheme(path)
        with _reported(path):
            handle = _gfile().GFile(path, mode)
            handle.size()  # a missing file fails here, with its path
        return handle
    return open(resolve(path), mode)  # the caller closes it


def read_bytes(path: str) -> bytes:
    """The contents of file `path`.

    Raises:
        FileNotFoundError: there is no such file.
    """
    if is_remote(path):
        check_scheme(path)
        with _reported(path), _gfile().GFile(path, "rb") as f:
            return f.read()
    with open(resolve(path), "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def _temp_name(path: str) -> str:
    """A fresh temporary name beside `path`: `.<name>.<random>.incomplete`."""
    return join(dirname(path), f".{basename(path)}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def write_bytes(path: str, data: bytes, durable: bool = False) -> None:
    """Writes `data` to `path` atomically (a temporary name, then a rename over `path`),
    creating its folder when needed. `durable`: also survive a machine loss (fsync on a local
    disk; an object store's writes are durable once the upload returns)."""
    if is_remote(path):
        makedirs(dirname(path))  # ram:// lists only folders made explicitly
        tmp = _temp_name(path)
        try:
            with _reported(path), _gfile().GFile(tmp, "wb") as f:
                f.write(data)
            rename(tmp, path)
        finally:
            remove(tmp)
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically."""
    write_bytes(path, text.encode())


def write_json(path: str, document: Mapping[str, Any], sort_keys: bool = False) -> None:
    """Writes `document` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(document, indent=2, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a local temporary file path to write `path`'s contents to; on success it
    replaces `path` (uploaded first when `path` is remote). A crash or an exception never
    leaves a half-written `path` behind.

    For writers that need a file name (Keras, matplotlib, h5py); `suffix` is the extension
    they may insist on.
    """
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="upload-") as scratch:
            tmp = os.path.join(scratch, f"{uuid.uuid4().hex}{suffix}")
            yield tmp
            copy(tmp, path)
        return
    directory = dirname(path)
    os.makedirs(directory, exist_ok=True)
    # The suffix last: Keras insists on `.keras`. Local leftovers need no lifecycle rule.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide outputs from e.g. a TF Serving user
    try:
        yield tmp
        os.replace(tmp, resolve(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local file with `path`'s contents, for readers that need a file name (h5py, zip):
    `path` itself when local, else a temporary download removed afterwards."""
    if not is_remote(path):
        yield resolve(path)
        return
    data = read_bytes(path)
    with tempfile.TemporaryDirectory(prefix="download-") as scratch:
        local = os.path.join(scratch, basename(path))
        with open(local, "wb") as f:
            f.write(data)
        yield local
