"""The input pipeline: load a dataset from TFDS, CIFAR python batches, an image folder or
TFRecord shards (local or in a bucket), then feed it to training and evaluation through
`tf.data`.

Two layers:

* `load(DataConfig) -> Splits` finds and reads the data once. Images that share one size
  and fit the memory budget are decoded ONCE, in parallel, into a uint8 array (CIFAR-10:
  150 MB); others stay as file paths or encoded bytes and are decoded in the pipeline.
  TFRecord shards and TFDS datasets over the budget are streamed: only where their records
  are is held (`RecordSet`).
* `train_dataset` / `eval_dataset` turn `Examples` into batches. The order and the
  augmentation of training epoch `e` are pure functions of `(seed, e)` (stateless random
  ops), so a resumed run sees exactly the batches of an uninterrupted one; in memory, a
  multi-worker run sees those of a single process too. Streamed, each worker reads its
  own files (`stream`).

Modules: `types` (DataConfig, DataError, Examples, RecordSet, Splits), `loading` (`load`:
which source), the sources `cifar_batches`, `image_folder`, `tfds_source` and `shards`,
`splits` (hold-out and limits), `decode` (decode once into memory), `augment`, `pipeline`
(`train_dataset`, `eval_dataset`), `stream` (the same from TFRecord files) and `samples`
(`sample_images`, `stored_batches`).

Example (from the repository root):

    from app import data
    from models import preprocessing
    splits = data.load(data.DataConfig(data_dir="~/data/cifar10", train_limit=1000))
    ds = data.train_dataset(splits.train, preprocessing.cifar(32), 128, seed=0)
    images, labels = next(iter(ds))  # float32 [128, 32, 32, 3], int32 [128]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from app.data.types import (
    SOURCE_CIFAR_BATCHES,
    SOURCE_IMAGE_FOLDER,
    SOURCE_TFDS,
    SOURCE_TFRECORD,
    SPLITS,
    DataConfig,
    DataError,
    Examples,
    RecordFile,
    RecordSet,
    Splits,
)

if TYPE_CHECKING:
    from app.data.decode import size_note
    from app.data.image_folder import IMAGE_EXTENSIONS
    from app.data.loading import load
    from app.data.pipeline import eval_dataset, steps_per_epoch, train_dataset
    from app.data.samples import sample_images, stored_batches

# Imported on first use: these modules import TensorFlow, which users of DataConfig and
# DataError alone (flag definitions, error reporting) should not pay for.
_LAZY = {
    "IMAGE_EXTENSIONS": "image_folder",
    "load": "loading",
    "eval_dataset": "pipeline",
    "steps_per_epoch": "pipeline",
    "train_dataset": "pipeline",
    "sample_images": "samples",
    "stored_batches": "samples",
    "size_note": "decode",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = (
    "IMAGE_EXTENSIONS",
    "SOURCE_CIFAR_BATCHES",
    "SOURCE_IMAGE_FOLDER",
    "SOURCE_TFDS",
    "SOURCE_TFRECORD",
    "SPLITS",
    "DataConfig",
    "DataError",
    "Examples",
    "RecordFile",
    "RecordSet",
    "Splits",
    "eval_dataset",
    "load",
    "sample_images",
    "size_note",
    "steps_per_epoch",
    "stored_batches",
    "train_dataset",
)
