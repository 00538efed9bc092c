"""Reads the official CIFAR-10 python batches (`cifar-10-batches-py`) safely.

The batches are pickles; a restricted unpickler refuses anything but dicts, lists, bytes
and NumPy arrays, so a crafted file cannot run code. NumPy only (TensorFlow's file systems
only for a folder in a bucket, through `common.files`).
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from app.data.types import SOURCE_CIFAR_BATCHES, DataError, Examples, RawSplits
from common import files

META_FILE = "batches.meta"

_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }
)


class _Refused(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only what the official CIFAR batches contain (dicts, lists, bytes, numpy
    arrays); anything else (os.system, eval, ...) is refused before it can run.

    Keras 3.15.1 has the same guard, but only as private API (keras.src.datasets).
    """

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(f"refusing to load {module}.{name}")


def _unpickle(path: str) -> dict:
    try:
        d = _RestrictedUnpickler(io.BytesIO(files.read_bytes(path)), encoding="bytes").load()
    except _Refused as e:
        raise DataError(
            f"{path} is not a CIFAR python batch ({e}, which the real files never contain): "
            "it may be crafted to run code; download cifar-10-python.tar.gz again"
        ) from e
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
    ) as e:
        raise DataError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
            "download cifar-10-python.tar.gz again"
        ) from e
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR python batch (holds {type(d).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_batch(path: str, num_classes: int) -> Examples:
    d = _unpickle(path)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path} lacks 'data' or 'labels': not a CIFAR-10 python batch")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 [n, 3072]")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{path}: label {labels[bad[0]]} at index {bad[0]} is out of range "
            f"[0, {num_classes}) set by batches.meta ({bad.size} such labels)"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored channel-planar
    return Examples(labels, images=np.ascontiguousarray(images), origin=path)


def is_cifar_batches(folder: str) -> bool:
    """True when `folder` holds `batches.meta` (then it must be a CIFAR batches folder)."""
    return files.isfile(files.join(folder, META_FILE))


def load_cifar_batches(folder: str) -> RawSplits:
    """`data_batch_*` as train (in numeric order) and `test_batch` as test, if present.

    Raises:
        DataError: a missing, corrupt, crafted or inconsistent batch file.
    """
    meta = _unpickle(files.join(folder, META_FILE))
    if "label_names" not in meta:
        raise DataError(f"{folder}/batches.meta lacks label_names: not a CIFAR-10 batches.meta")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    train_files = sorted(
        f for f in files.listdir(folder) if f.startswith("data_batch_") and f[11:].isdigit()
    )
    if not train_files:
        raise DataError(f"{folder} has batches.meta but no data_batch_* files; extract all of it")
    train_files.sort(key=lambda f: int(f[11:]))
    parts = [_read_batch(files.join(folder, f), len(class_names)) for f in train_files]
    train = Examples(
        np.concatenate([p.labels for p in parts]),
        images=np.concatenate([p.images for p in parts]),
        origin=folder,
    )
    test_path = files.join(folder, "test_batch")
    test = _read_batch(test_path, len(class_names)) if files.isfile(test_path) else None
    return RawSplits(train, None, test, class_names, SOURCE_CIFAR_BATCHES)
