"""The data layer's vocabulary: `DataConfig`, `DataError`, `Examples`, `Splits`, source names.

NumPy only (no TensorFlow), so flag definitions and error handling import it cheaply.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from common.pixel_limits import MAX_PIXELS

SOURCE_TFDS = "tfds"
SOURCE_CIFAR_BATCHES = "cifar-python-batches"
SOURCE_IMAGE_FOLDER = "image-folder"
SOURCE_TFRECORD = "tfrecord-shards"
# The splits a dataset may have, in order; train and validation always exist after `load`.
SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """Bad or missing input data: one clear line (what, where, how to fix)."""


# Starts the messages of the checks inside `tf.data` pipelines (a corrupt record, a label
# out of range), which reach the program as TensorFlow errors: `pipeline_error` finds them.
# The checks hand `tf.debugging.Assert` the message's parts, which it formats only when the
# check fails (formatting them for every record would cost as much as reading it).
PIPELINE_ERROR = "bad data: "


def pipeline_error(error: BaseException) -> str | None:
    """The message of a data check that failed inside a `tf.data` pipeline, else None.

    `tf.debugging.Assert` prints its parts as `[bad data: ] [path] [: record ] [6] [...]`.
    """
    text = str(error)
    start = text.find(f"[{PIPELINE_ERROR}]")
    if start < 0:
        return None
    parts = re.findall(r"\[([^\]]*)\]", text[start:].splitlines()[0])
    return "".join(parts)[len(PIPELINE_ERROR) :].strip()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how much of it to use.

    Attributes:
        dataset: TFDS name, used when `data_dir` is None or is a TFDS data directory.
        data_dir: a CIFAR python-batches folder, an image-folder tree or a TFDS data dir.
        validation_split: fraction of train held out when the data has no validation split.
        train_limit: use at most this many training examples (a seeded, stratified subset).
        eval_limit: use at most this many validation and test examples each.
        seed: makes the hold-out and the limits reproducible.
        max_pixels: images over this many pixels are refused, from their header (no decoding).
        label_offset: subtracted from TFRecord shards' labels (1 for Model Garden's ImageNet
            shards, whose labels run from 1); None: the shards' shards.json says, else 0.
        memory_budget_mb: the most a split may take in memory (decoded images, or encoded
            bytes of images that differ in size); larger splits are streamed from their files.
            None: min(1.9 GB, a quarter of the machine's RAM); 0 streams all that can.
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    validation_split: float = 0.1
    train_limit: int | None = None
    eval_limit: int | None = None
    seed: int = 0
    max_pixels: int = MAX_PIXELS
    label_offset: int | None = None
    memory_budget_mb: int | None = None


@dataclasses.dataclass(frozen=True)
class RecordFile:
    """Records `[skip, skip + take)` of one TFRecord file (a TFDS file instruction).

    Attributes:
        path: the file, local or on any TensorFlow file system.
        skip: records before the first one used.
        take: records used.
        num_bytes: their bytes (estimated in proportion when only part of the file is used).
    """

    path: str
    skip: int
    take: int
    num_bytes: int


@dataclasses.dataclass(frozen=True)
class RecordSet:
    """A split streamed from TFRecord files of `tf.train.Example`s: which records, and how
    to read the (encoded image, label) of each.

    Attributes:
        files: the record ranges, in stored order.
        num_classes: labels (after `label_offset`) must be in [0, num_classes).
        image_key: the feature holding the encoded JPEG/PNG bytes.
        label_key: the int64 class feature.
        label_offset: subtracted from every label.
        window_bytes: about the most serialized records a training pipeline shuffles at
            once (`app.data.stream`); set from the memory budget.
    """

    files: tuple[RecordFile, ...]
    num_classes: int
    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    label_offset: int = 0
    window_bytes: int = 64 << 20

    @property
    def num_examples(self) -> int:
        return sum(f.take for f in self.files)

    @property
    def num_bytes(self) -> int:
        return sum(f.num_bytes for f in self.files)

    def with_files(self, files) -> RecordSet:
        return dataclasses.replace(self, files=tuple(f for f in files if f.take > 0))


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """One split: labels plus exactly one of decoded images, file paths or encoded bytes;
    or, streamed, TFRecord files whose labels are read with the images.

    Attributes:
        labels: int64 [n] class indices (None for `records`).
        images: uint8 [n, h, w, 3] decoded RGB images, when they share a size and fit in memory.
        files: str [n] image file paths, decoded in the pipeline.
        encoded: object [n] encoded JPEG/PNG bytes (TFDS images of varying size).
        records: TFRecord files streamed in the pipeline (never held in memory).
        origin: where the split came from, for messages.
        max_pixels: files/encoded images over this many pixels are refused before decoding.
    """

    labels: np.ndarray | None
    images: np.ndarray | None = None
    files: np.ndarray | None = None
    encoded: np.ndarray | None = None
    origin: str = ""
    max_pixels: int = MAX_PIXELS
    records: RecordSet | None = None

    def __post_init__(self) -> None:
        if self.records is not None:
            if self.labels is not None or any(
                x is not None for x in (self.images, self.files, self.encoded)
            ):
                raise ValueError("streamed Examples hold records only")
            return
        held = [x for x in (self.images, self.files, self.encoded) if x is not None]
        if self.labels is None or len(held) != 1 or len(held[0]) != len(self.labels):
            raise ValueError("Examples needs labels and exactly one of images/files/encoded")

    @property
    def num_examples(self) -> int:
        if self.records is not None:
            return self.records.num_examples
        return len(self.labels)

    @property
    def streamed(self) -> bool:
        """Read from TFRecord files as the pipeline goes (nothing of it held in memory)."""
        return self.records is not None

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(h, w, 3) when all images share one stored size and are in memory, else None."""
        return None if self.images is None else tuple(self.images.shape[1:])

    def subset(self, indices: np.ndarray) -> Examples:
        """The examples at `indices`, in that order (streamed ones: only none of them)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.records is not None:
            if len(indices):
                raise ValueError("streamed examples are read in order, not picked by index")
            return dataclasses.replace(self, records=self.records.with_files(()))

        def pick(x):
            return None if x is None else x[indices]

        return Examples(
            self.labels[indices],
            pick(self.images),
            pick(self.files),
            pick(self.encoded),
            self.origin,
            self.max_pixels,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """What `load` returns.

    Attributes:
        train, validation: always present (validation is held out of train when the data
            has no validation split of its own); both empty for evaluation data (a folder
            with no train split, or --validation_split=0 on one with no other split).
        test: None when the data has no test split.
        class_names: names in label-index order.
        source: the format recognised: "tfds", "cifar-python-batches", "image-folder" or
            "tfrecord-shards".
        validation_held_out: True when validation was split off train.
    """

    train: Examples
    validation: Examples
    test: Examples | None
    class_names: list[str]
    source: str
    validation_held_out: bool = False

    @property
    def evaluation_only(self) -> bool:
        """No training examples: the data is all test (and validation, if it has one)."""
        return self.train.num_examples == 0

    def summary(self) -> str:
        splits = [s for s in (self.train, self.validation, self.test) if s is not None]
        streamed = [s for s in splits if s.streamed and s.num_examples]
        tail = f"; {len(self.class_names)} classes"
        if streamed:
            shards = sum(len(s.records.files) for s in streamed)
            tail += f"; streamed from {shards} TFRecord file ranges (not held in memory)"
        if self.evaluation_only:
            return (
                f"{self.source} data from {self.test.origin}: evaluation only (no train "
                f"split), test {self.test.num_examples}{tail}"
            )
        parts = [f"train {self.train.num_examples}", f"validation {self.validation.num_examples}"]
        if self.validation_held_out:
            how = " by position, the last records of each shard" if self.train.streamed else ""
            parts[-1] += f" (held out of train{how})"
        if self.test is not None:
            parts.append(f"test {self.test.num_examples}")
        return f"{self.source} data from {self.train.origin}: {', '.join(parts)}{tail}"


@dataclasses.dataclass
class RawSplits:
    """What a source reader returns: the splits as stored, before `splits.finish` holds
    out validation, applies the limits and decodes what fits in memory."""

    train: Examples | None  # None: evaluation data (an image folder with only test/, say)
    validation: Examples | None
    test: Examples | None
    class_names: list[str]
    source: str
    fixed_shape: bool = True  # False: TFDS says the images differ in size
