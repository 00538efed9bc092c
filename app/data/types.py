"""The data layer's vocabulary: `DataConfig`, `DataError`, `Examples`, `Splits`, source names.

NumPy only (no TensorFlow), so flag definitions and error handling import it cheaply.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common.pixel_limits import MAX_PIXELS

SOURCE_TFDS = "tfds"
SOURCE_CIFAR_BATCHES = "cifar-python-batches"
SOURCE_IMAGE_FOLDER = "image-folder"
# The splits a dataset may have, in order; train and validation always exist after `load`.
SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """Bad or missing input data: one clear line (what, where, how to fix)."""


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
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    validation_split: float = 0.1
    train_limit: int | None = None
    eval_limit: int | None = None
    seed: int = 0
    max_pixels: int = MAX_PIXELS


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """One split: labels plus exactly one of decoded images, file paths or encoded bytes.

    Attributes:
        labels: int64 [n] class indices.
        images: uint8 [n, h, w, 3] decoded RGB images, when they share a size and fit in memory.
        files: str [n] image file paths, decoded in the pipeline.
        encoded: object [n] encoded JPEG/PNG bytes (TFDS images of varying size).
        origin: where the split came from, for messages.
        max_pixels: files/encoded images over this many pixels are refused before decoding.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    files: np.ndarray | None = None
    encoded: np.ndarray | None = None
    origin: str = ""
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        held = [x for x in (self.images, self.files, self.encoded) if x is not None]
        if len(held) != 1 or len(held[0]) != len(self.labels):
            raise ValueError("Examples needs labels and exactly one of images/files/encoded")

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(h, w, 3) when all images share one stored size and are in memory, else None."""
        return None if self.images is None else tuple(self.images.shape[1:])

    def subset(self, indices: np.ndarray) -> Examples:
        """The examples at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)

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
        source: the format recognised: "tfds", "cifar-python-batches" or "image-folder".
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
        if self.evaluation_only:
            return (
                f"{self.source} data from {self.test.origin}: evaluation only (no train "
                f"split), test {self.test.num_examples}; {len(self.class_names)} classes"
            )
        parts = [f"train {self.train.num_examples}", f"validation {self.validation.num_examples}"]
        if self.validation_held_out:
            parts[-1] += " (held out of train)"
        if self.test is not None:
            parts.append(f"test {self.test.num_examples}")
        return (
            f"{self.source} data from {self.train.origin}: {', '.join(parts)}; "
            f"{len(self.class_names)} classes"
        )


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
