"""The input pipeline: load a dataset from TFDS, CIFAR python batches or an image folder,
then feed it to training and evaluation through `tf.data`.

Two layers:

* `load(DataConfig) -> Splits` finds and reads the data once. Images that share one size
  and fit comfortably in memory are decoded ONCE, in parallel, into a uint8 array (CIFAR-10:
  150 MB); others stay as file paths or encoded bytes and are decoded in the pipeline.
* `train_dataset` / `eval_dataset` turn `Examples` into batches. The order and the
  augmentation of training epoch `e` are pure functions of `(seed, e)` (stateless random
  ops), so a resumed run and a multi-worker run see exactly the batches of an
  uninterrupted single-process run.

Example (from the repository root):

    from app import data
    from models import preprocessing
    splits = data.load(data.DataConfig(data_dir="../shared/data/cifar10", train_limit=1000))
    ds = data.train_dataset(splits.train, preprocessing.cifar(32), 128, seed=0)
    images, labels = next(iter(ds))  # float32 [128, 32, 32, 3], int32 [128]
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
from collections.abc import Sequence

import numpy as np
from absl import logging

from models.preprocessing import Preprocessing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Decoded images are kept in memory when they take at most this share of available RAM
# and at most MAX_IN_MEMORY_BYTES: CIFAR-10 (150 MB) always does, ImageNet never does. The
# array is captured by the tf.data graph, which tf.distribute may serialize: protobuf's
# 2 GB limit caps it.
MEMORY_FRACTION = 0.25
MAX_IN_MEMORY_BYTES = 1900 << 20
# Parallel file reads: on a cold cache, reading 50,000 small files is latency-bound.
IO_THREADS = 16
# Random-resized-crop ranges (area fraction, aspect ratio) when upsampling. Narrower than
# ImageNet's (0.08, 1): a 32x32 image cropped to 8% keeps ~80 pixels, too little to learn from.
RRC_SCALE = (0.25, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
# Random crop after zero padding by 4 pixels per 32 of image size (the CIFAR recipe).
PAD_FRACTION = 4 / 32

SOURCE_TFDS = "tfds"
SOURCE_CIFAR_BATCHES = "cifar-python-batches"
SOURCE_IMAGE_FOLDER = "image-folder"


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
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    validation_split: float = 0.1
    train_limit: int | None = None
    eval_limit: int | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """One split: labels plus exactly one of decoded images, file paths or encoded bytes.

    Attributes:
        labels: int64 [n] class indices.
        images: uint8 [n, h, w, 3] decoded RGB images, when they share a size and fit in memory.
        files: str [n] image file paths, decoded in the pipeline.
        encoded: object [n] encoded JPEG/PNG bytes (TFDS images of varying size).
        origin: where the split came from, for messages.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    files: np.ndarray | None = None
    encoded: np.ndarray | None = None
    origin: str = ""

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
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """What `load` returns.

    Attributes:
        train, validation: always present (validation is held out of train when the data
            has no validation split of its own).
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

    def summary(self) -> str:
        parts = [f"train {self.train.num_examples}", f"validation {self.validation.num_examples}"]
        if self.validation_held_out:
            parts[-1] += " (held out of train)"
        if self.test is not None:
            parts.append(f"test {self.test.num_examples}")
        return (
            f"{self.source} data from {self.train.origin}: {', '.join(parts)}; "
            f"{len(self.class_names)} classes"
        )


# --------------------------------------------------------------------------------------
# Loading


def load(config: DataConfig) -> Splits:
    """Reads the dataset `config` names; see the module docstring.

    Raises:
        DataError: missing or malformed data, or a bad split/limit value.
    """
    _check_config(config)
    if config.data_dir is None:  # TFDS by name, downloaded on first use
        return _finish(_load_tfds(config.dataset, None), config)
    return _finish(_load_data_dir(config), config)


@dataclasses.dataclass
class _Raw:
    train: Examples
    validation: Examples | None
    test: Examples | None
    class_names: list[str]
    source: str
    fixed_shape: bool = True  # False: TFDS says the images differ in size


def _check_config(config: DataConfig) -> None:
    for name in ("train_limit", "eval_limit"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"--{name}={value} must be a positive integer (or unset for all)")
    if not 0.0 <= config.validation_split < 1.0:
        raise DataError(
            f"--validation_split={config.validation_split} must be a fraction in (0, 1) of "
            "train to hold out as validation, e.g. 0.1"
        )
    if not isinstance(config.seed, int) or config.seed < 0:
        raise DataError(f"--seed={config.seed} must be a non-negative integer")


def _load_data_dir(config: DataConfig) -> _Raw:
    root = os.path.abspath(os.path.expanduser(config.data_dir))
    if not os.path.exists(root):
        raise DataError(f"--data_dir {root} does not exist; pass the folder that holds the data")
    if not os.path.isdir(root):
        raise DataError(f"--data_dir {root} is a file, not a folder; pass the folder holding it")
    if _tfds_names(root):
        return _load_tfds(config.dataset, root)
    if config.dataset != DataConfig.dataset:
        logging.warning("--dataset=%s ignored: %s is not a TFDS data dir", config.dataset, root)
    for candidate in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(candidate, "batches.meta")):
            return _load_cifar_batches(candidate)
    if _looks_like_image_folder(root):
        return _load_image_folder(root)
    entries = sorted(os.listdir(root))
    found = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
    hint = ""
    if any(e.endswith((".tar.gz", ".tgz", ".zip")) for e in entries):
        hint = "; extract the archive first"
    raise DataError(
        f"--data_dir {root} holds no recognised dataset (found: {found}). Looked for: "
        "cifar-10-batches-py (batches.meta + data_batch_*), a TFDS data dir "
        "(<name>/<version>/dataset_info.json), or image folders (<class>/*.jpg|png or "
        f"train/<class>/* + test/<class>/*){hint}"
    )


# --- CIFAR python batches -------------------------------------------------------------

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
        with open(path, "rb") as f:
            d = _RestrictedUnpickler(f, encoding="bytes").load()
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


def _load_cifar_batches(folder: str) -> _Raw:
    meta = _unpickle(os.path.join(folder, "batches.meta"))
    if "label_names" not in meta:
        raise DataError(f"{folder}/batches.meta lacks label_names: not a CIFAR-10 batches.meta")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    train_files = sorted(
        f for f in os.listdir(folder) if f.startswith("data_batch_") and f[11:].isdigit()
    )
    if not train_files:
        raise DataError(f"{folder} has batches.meta but no data_batch_* files; extract all of it")
    train_files.sort(key=lambda f: int(f[11:]))
    parts = [_read_batch(os.path.join(folder, f), len(class_names)) for f in train_files]
    train = Examples(
        np.concatenate([p.labels for p in parts]),
        images=np.concatenate([p.images for p in parts]),
        origin=folder,
    )
    test_path = os.path.join(folder, "test_batch")
    test = _read_batch(test_path, len(class_names)) if os.path.isfile(test_path) else None
    return _Raw(train, None, test, class_names, SOURCE_CIFAR_BATCHES)


# --- image folders --------------------------------------------------------------------


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
    return sorted(
        e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith((".", "_"))
    )


def _looks_like_image_folder(root: str) -> bool:
    if os.path.isdir(os.path.join(root, "train")):
        return True
    return any(
        any(_is_image_file(f) for f in os.listdir(os.path.join(root, d))) for d in _subdirs(root)
    )


def _list_classes(split_dir: str) -> tuple[list[str], list[str], list[int]]:
    classes = _subdirs(split_dir)
    if not classes:
        raise DataError(
            f"{split_dir} has no class folders; put images in {split_dir}/<class name>/*.jpg"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        names = sorted(f for f in os.listdir(folder) if _is_image_file(f))
        if not names:
            raise DataError(
                f"class folder {folder} has no .jpg/.jpeg/.png images; add some or remove it"
            )
        files += [os.path.join(folder, f) for f in names]
        labels += [label] * len(names)
    return classes, files, labels


def _load_image_folder(root: str) -> _Raw:
    split_dirs = {"train": os.path.join(root, "train")}
    if not os.path.isdir(split_dirs["train"]):
        split_dirs = {"train": root}
    else:
        for split, names in (("validation", ("validation", "val")), ("test", ("test",))):
            for name in names:
                if os.path.isdir(os.path.join(root, name)):
                    split_dirs[split] = os.path.join(root, name)
                    break
    class_names, files, labels = _list_classes(split_dirs["train"])
    raw = {"train": (files, labels)}
    for split in ("validation", "test"):
        if split in split_dirs:
            names, f, lab = _list_classes(split_dirs[split])
            if names != class_names:
                raise DataError(
                    f"class folders of {split_dirs[split]} ({', '.join(names)}) differ from "
                    f"those of {split_dirs['train']} ({', '.join(class_names)}); make them match"
                )
            raw[split] = (f, lab)
    out = {
        split: Examples(
            np.asarray(lab, np.int64), files=np.asarray(f, dtype=object), origin=split_dirs[split]
        )
        for split, (f, lab) in raw.items()
    }
    return _Raw(
        out["train"], out.get("validation"), out.get("test"), class_names, SOURCE_IMAGE_FOLDER
    )


# --- TFDS -----------------------------------------------------------------------------


def _tfds_names(root: str) -> list[str]:
    """Datasets prepared in a TFDS data dir: `<name>/<version>/dataset_info.json` or
    `<name>/<config>/<version>/dataset_info.json` (looks no deeper, so big image trees
    are not walked)."""

    def has_version(path: str) -> bool:
        return any(
            re.fullmatch(r"\d+\.\d+\.\d+", v)
            and os.path.isfile(os.path.join(path, v, "dataset_info.json"))
            for v in _subdirs(path)
        )

    names = []
    for name in _subdirs(root):
        path = os.path.join(root, name)
        if has_version(path):
            names.append(name)
            continue
        names += [f"{name}/{c}" for c in _subdirs(path) if has_version(os.path.join(path, c))]
    return names


def _load_tfds(name: str, data_dir: str | None) -> _Raw:
    import tensorflow_datasets as tfds

    where = f"TFDS data dir {data_dir}" if data_dir else "TFDS"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends, whatever their base class
        found = _tfds_names(data_dir) if data_dir else []
        extra = f" (it holds: {', '.join(found)})" if found else ""
        raise DataError(
            f"--dataset={name} not found in {where}{extra}: {str(e).splitlines()[0]}"
        ) from e
    if data_dir is None and not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except ModuleNotFoundError as e:  # tensorflow/datasets#11212 on Python >= 3.9
            raise DataError(
                f"TFDS cannot prepare {name}: {e}; install it (pip install {e.name}) or pass "
                "--data_dir with a local copy"
            ) from e
        except Exception as e:
            raise DataError(
                f"could not download TFDS dataset {name} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); check the network or pass "
                "--data_dir with a local copy"
            ) from e
    elif not builder.is_prepared():
        found = _tfds_names(data_dir)
        raise DataError(
            f"--dataset={name} not found in {where} (it holds: {', '.join(found) or 'nothing'}); "
            f"pass one of those as --dataset, or prepare it there with "
            f"`tfds build {name} --data_dir={data_dir}`"
        )
    info = builder.info
    if info.dataset_size and int(info.dataset_size) > _memory_budget():
        raise DataError(
            f"TFDS {name} is {int(info.dataset_size) >> 20} MiB, more than this pipeline keeps "
            "in memory; export it as an image folder (train/<class>/*.jpg) and pass that as "
            "--data_dir"
        )
    features = info.features
    image_key, label_key = info.supervised_keys or ("image", "label")
    if image_key not in features or label_key not in features:
        raise DataError(f"TFDS {name} is not an image-classification dataset (no image/label)")
    label_feature = features[label_key]
    class_names = list(getattr(label_feature, "names", None) or [])
    if not class_names:
        raise DataError(f"TFDS {name}: label feature {label_key} has no class names")
    splits = {}
    for split in ("train", "validation", "test"):
        if split not in info.splits:
            continue
        ds = builder.as_dataset(
            split=split, decoders={image_key: tfds.decode.SkipDecoding()}, shuffle_files=False
        )
        ds = ds.map(lambda x: (x[image_key], x[label_key])).batch(4096)
        encoded, labels = [], []
        for e, lab in ds.as_numpy_iterator():
            encoded.append(e)
            labels.append(lab)
        examples = Examples(
            np.concatenate(labels).astype(np.int64),
            encoded=np.concatenate(encoded).astype(object),
            origin=f"{where}: {name}[{split}]",
        )
        splits[split] = examples
    if "train" not in splits:
        raise DataError(f"TFDS {name} has no 'train' split (it has {', '.join(info.splits)})")
    return _Raw(
        splits["train"],
        splits.get("validation"),
        splits.get("test"),
        class_names,
        SOURCE_TFDS,
        fixed_shape=None not in features[image_key].shape,
    )


# --- splits, limits, decoding ---------------------------------------------------------


def _stratified_pick(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `k` examples, each class represented in proportion to its size.

    Shuffles each class, keys its members by their quantile within the class, and takes
    the `k` lowest keys overall (random tie-break), so small classes are not left out.
    """
    quantile = np.empty(len(labels))
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        quantile[idx] = (np.arange(len(idx)) + 0.5) / len(idx)
    return np.sort(np.lexsort((rng.random(len(labels)), quantile))[:k])


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of indices into (train, validation); a pure function of seed."""
    n = len(labels)
    val = _stratified_pick(labels, max(1, round(fraction * n)), np.random.default_rng([seed, 0]))
    return np.setdiff1d(np.arange(n), val), val


def _limit(examples: Examples, limit: int | None, seed: int, salt: int) -> Examples:
    """At most `limit` examples: a seeded, stratified subset, kept in stored order."""
    if limit is None or limit >= examples.num_examples:
        return examples
    return examples.subset(
        _stratified_pick(examples.labels, limit, np.random.default_rng([seed, salt]))
    )


def _finish(raw: _Raw, config: DataConfig) -> Splits:
    num_classes = len(raw.class_names)
    for ex in (raw.train, raw.validation, raw.test):
        if ex is None:
            continue
        if ex.num_examples == 0:
            raise DataError(f"{ex.origin} holds no examples")
        bad = np.flatnonzero((ex.labels < 0) | (ex.labels >= num_classes))
        if bad.size:
            raise DataError(
                f"{ex.origin}: label {ex.labels[bad[0]]} is out of range [0, {num_classes})"
            )
    train, validation = raw.train, raw.validation
    held_out = validation is None
    if held_out:
        if not 0.0 < config.validation_split < 1.0:
            raise DataError(
                f"--validation_split={config.validation_split}: {train.origin} has no "
                "validation split, so a fraction in (0, 1) of train is held out; pass e.g. 0.1"
            )
        t, v = _holdout(train.labels, config.validation_split, config.seed)
        if len(v) == 0 or len(t) == 0:
            raise DataError(
                f"--validation_split={config.validation_split} leaves "
                f"{len(t)} train / {len(v)} validation examples of {train.num_examples}; "
                "choose a fraction that leaves both non-empty"
            )
        train, validation = train.subset(t), train.subset(v)
    train = _limit(train, config.train_limit, config.seed, 1)
    validation = _limit(validation, config.eval_limit, config.seed, 2)
    test = _limit(raw.test, config.eval_limit, config.seed, 3) if raw.test is not None else None
    train, validation, test = (
        None if ex is None else _decode_if_fits(ex, raw.fixed_shape)
        for ex in (train, validation, test)
    )
    return Splits(train, validation, test, raw.class_names, raw.source, held_out)


def _memory_budget() -> int:
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is pinned
        available = 4 << 30
    return int(min(MAX_IN_MEMORY_BYTES, MEMORY_FRACTION * available))


def _header_shape(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"{path} is not a readable JPEG/PNG image ({type(e).__name__}); replace or delete it"
        ) from e
    return h, w


def _header_shapes(files: np.ndarray) -> list[tuple[int, int]]:
    """(h, w) of every image file from its header (no decoding); names a bad file.

    Threads, because on a cold file cache this is bound by file-system latency.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(IO_THREADS) as pool:
        return list(pool.map(_header_shape, files, chunksize=256))


def _decode_if_fits(examples: Examples, fixed_shape: bool) -> Examples:
    """Decodes files/encoded bytes once into a uint8 array when all images share a size
    and fit in memory; otherwise returns `examples` unchanged (decoded in the pipeline)."""
    if examples.images is not None:
        return examples
    if examples.files is not None:
        shapes = _header_shapes(examples.files)
        uniform = len(set(shapes)) == 1
        h, w = shapes[0]
    else:
        if not fixed_shape:
            return examples
        first = _decode_array(examples.encoded[:1])
        uniform, (h, w) = True, first.shape[1:3]
    if not uniform or examples.num_examples * h * w * 3 > _memory_budget():
        return examples
    images = _decode_array(
        examples.files if examples.files is not None else examples.encoded,
        is_file=examples.files is not None,
        shape=(h, w),
    )
    return Examples(examples.labels, images=images, origin=examples.origin)


def _decode_image(data, channels: int = 3):
    """Encoded JPEG/PNG (bytes tensor) -> uint8 [h, w, 3]; grayscale and RGBA become RGB."""
    import tensorflow as tf

    return tf.io.decode_image(data, channels=channels, expand_animations=False)


def _decode_array(
    sources: np.ndarray, is_file: bool = False, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Decodes all `sources` (paths or bytes) in parallel with tf.data into uint8 [n, h, w, 3].

    A file that fails to decode (or has another size) is named in the DataError.
    """
    import tensorflow as tf

    n, chunk = len(sources), 1024
    ds = tf.data.Dataset.from_tensor_slices(list(sources))
    if is_file:
        ds = ds.map(tf.io.read_file, num_parallel_calls=IO_THREADS, deterministic=True)
    ds = ds.map(_decode_image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(chunk).prefetch(2)
    out, done = None, 0
    try:
        for images in ds.as_numpy_iterator():
            if out is None:
                out = np.empty((n, *images.shape[1:]), np.uint8)
            out[done : done + len(images)] = images
            done += len(images)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        # In order (deterministic): the bad one is in the chunk that failed. Find it.
        for i in range(done, min(done + chunk, n)):
            _check_decodes(sources[i] if is_file else None, sources[i], out, i)
        raise DataError(f"images of {sources[0]}... could not be decoded: {e}") from e
    if shape is not None and out.shape[1:3] != tuple(shape):
        raise DataError(f"decoded images are {out.shape[1:3]}, expected {shape}")
    return out


def _check_decodes(path: str | None, source, out: np.ndarray | None, i: int) -> None:
    """Raises a DataError naming image `i` if it does not decode to the batch's size."""
    import tensorflow as tf

    what = path if path is not None else f"encoded image #{i}"
    try:
        data = tf.io.read_file(path) if path is not None else source
        image = _decode_image(data).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise DataError(
            f"{what} could not be decoded as a JPEG/PNG image; replace or delete it"
        ) from e
    if out is not None and image.shape != out.shape[1:]:
        raise DataError(
            f"{what} is {image.shape[0]}x{image.shape[1]}, unlike the others "
            f"({out.shape[1]}x{out.shape[2]})"
        )


# --------------------------------------------------------------------------------------
# Pipelines


def steps_per_epoch(examples: Examples, global_batch_size: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped in training)."""
    return examples.num_examples // global_batch_size


def _pipeline_layout(global_batch_size: int, input_context) -> tuple[int, int, int, int]:
    """(num_pipelines, pipeline_id, per-replica batch, replicas per pipeline)."""
    if input_context is None:
        return 1, 0, global_batch_size, 1
    pipelines = input_context.num_input_pipelines
    replicas = input_context.num_replicas_in_sync
    if replicas % pipelines:
        raise ValueError(f"{replicas} replicas do not divide over {pipelines} input pipelines")
    per_replica = input_context.get_per_replica_batch_size(global_batch_size)
    return pipelines, input_context.input_pipeline_id, per_replica, replicas // pipelines


def _source_tensor(examples: Examples):
    """The images, paths or encoded bytes as one tensor to gather from."""
    import tensorflow as tf

    if examples.images is not None:
        return tf.constant(examples.images)
    values = examples.files if examples.files is not None else examples.encoded
    return tf.constant(list(values), dtype=tf.string)


def _element_image(examples: Examples, source, index):
    """uint8 [h, w, 3] image `index` of `examples` (decoding files/bytes when needed)."""
    import tensorflow as tf

    item = tf.gather(source, index)
    if examples.images is not None:
        return item
    data = tf.io.read_file(item) if examples.files is not None else item
    return _decode_image(data)


def _pad_crop_flip_batch(images, rand):
    """Batched random crop after zero padding + horizontal flip, exact pixel copies.

    images: uint8 [b, h, w, 3]; rand: float [b, >=3] uniform in [0, 1).
    """
    import tensorflow as tf

    h, w = images.shape[1], images.shape[2]
    pad_y, pad_x = max(1, round(PAD_FRACTION * h)), max(1, round(PAD_FRACTION * w))
    padded = tf.pad(images, [[0, 0], [pad_y, pad_y], [pad_x, pad_x], [0, 0]])
    oy = tf.cast(tf.floor(rand[:, 0] * (2 * pad_y + 1)), tf.int32)
    ox = tf.cast(tf.floor(rand[:, 1] * (2 * pad_x + 1)), tf.int32)
    flip = rand[:, 2] < 0.5
    rows = oy[:, None] + tf.range(h)[None, :]
    cols = ox[:, None] + tf.range(w)[None, :]
    # A flipped example reads its columns right to left: the flip is free.
    cols = tf.where(flip[:, None], tf.reverse(cols, axis=[1]), cols)
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def _pad_crop_flip_one(image, rand, size: int):
    """`_pad_crop_flip_batch` for one image already known to be size x size."""
    import tensorflow as tf

    image = tf.ensure_shape(image, [size, size, 3])
    return _pad_crop_flip_batch(image[None], rand[None])[0]


def _random_resized_crop_one(image, rand, size: int):
    """Random-resized-crop + horizontal flip of one uint8 image to float [size, size, 3]."""
    import tensorflow as tf

    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    area = h * w * (RRC_SCALE[0] + rand[3] * (RRC_SCALE[1] - RRC_SCALE[0]))
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    ratio = tf.exp(log_lo + rand[4] * (log_hi - log_lo))
    ch = tf.clip_by_value(tf.round(tf.sqrt(area / ratio)), 1.0, h)
    cw = tf.clip_by_value(tf.round(tf.sqrt(area * ratio)), 1.0, w)
    y0 = tf.cast(tf.floor(rand[0] * (h - ch + 1)), tf.int32)
    x0 = tf.cast(tf.floor(rand[1] * (w - cw + 1)), tf.int32)
    crop = tf.slice(image, [y0, x0, 0], [tf.cast(ch, tf.int32), tf.cast(cw, tf.int32), 3])
    crop = tf.cond(rand[2] < 0.5, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
    return tf.image.resize(tf.cast(crop, tf.float32), [size, size], method="bilinear")


def _resize(images, size: int):
    """float32 pixels resized (bilinear) to size x size; a no-op at that size already."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    if images.shape[-3] == size and images.shape[-2] == size:
        return images
    return tf.image.resize(images, [size, size], method="bilinear")


def _augment_one(image, rand, size: int):
    """Augments one uint8 image of any size: pad-crop-flip at native size, else RRC."""
    import tensorflow as tf

    if image.shape[0] is not None and image.shape[1] is not None:  # decided when tracing
        if tuple(image.shape[:2]) == (size, size):
            return tf.cast(_pad_crop_flip_one(image, rand, size), tf.float32)
        return _random_resized_crop_one(image, rand, size)
    shape = tf.shape(image)
    native = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    return tf.cond(
        native,
        lambda: tf.cast(_pad_crop_flip_one(image, rand, size), tf.float32),
        lambda: _random_resized_crop_one(image, rand, size),
    )


def train_dataset(
    examples: Examples,
    preprocessing: Preprocessing,
    global_batch_size: int,
    *,
    seed: int,
    augment: bool = True,
    start_epoch: int = 0,
    start_step: int = 0,
    input_context=None,
):
    """An endless `tf.data.Dataset` of (float32 [b, S, S, 3] normalised images, int32 [b]).

    Global batch k of epoch e holds examples `permutation(seed, e)[k*G:(k+1)*G]`; each
    input pipeline (per `input_context`) yields its contiguous slice of it as per-replica
    batches. Augmentation of the example at position p of epoch e is a pure function of
    (seed, e, p). The dataset starts at batch `start_step` of epoch `start_epoch`.

    Args:
        examples: the training split.
        preprocessing: normalisation and `image_size` S of the model.
        global_batch_size: G, examples per step over all replicas.
        seed: the run's seed.
        augment: random crop/flip (pad-crop at native size, random-resized-crop otherwise).
        start_epoch, start_step: where a resumed run begins.
        input_context: a `tf.distribute.InputContext`, or None for a single pipeline.
    """
    import tensorflow as tf

    steps = steps_per_epoch(examples, global_batch_size)
    if steps < 1:
        raise DataError(
            f"{examples.origin}: {examples.num_examples} training examples are fewer than one "
            f"batch of {global_batch_size}; lower --batch_size or raise --train_limit"
        )
    if not 0 <= start_step < steps or start_epoch < 0:
        raise ValueError(f"start_step {start_step} not in [0, {steps}) or start_epoch < 0")
    pipelines, pipeline_id, per_replica, _ = _pipeline_layout(global_batch_size, input_context)
    n, size = examples.num_examples, preprocessing.image_size
    source = _source_tensor(examples)
    labels = tf.constant(examples.labels, tf.int32)
    in_memory = examples.images is not None
    batched = in_memory and (not augment or examples.image_shape[:2] == (size, size))

    def epoch(e):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), e])
        perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), epoch_seed)
        rand = tf.random.stateless_uniform(
            [steps * global_batch_size, 5], seed=tf.stack([epoch_seed[0], e + (1 << 40)])
        )
        # [steps, pipelines, G / pipelines] -> this pipeline's slice of every global batch.
        perm = tf.reshape(perm[: steps * global_batch_size], [steps, pipelines, -1])[:, pipeline_id]
        rand = tf.reshape(rand, [steps, pipelines, -1, 5])[:, pipeline_id]
        first = tf.where(e == start_epoch, tf.constant(start_step, tf.int64), 0)
        perm, rand = perm[first:], rand[first:]
        if batched:
            return tf.data.Dataset.from_tensor_slices(
                (tf.reshape(perm, [-1, per_replica]), tf.reshape(rand, [-1, per_replica, 5]))
            )
        return tf.data.Dataset.from_tensor_slices(
            (tf.reshape(perm, [-1]), tf.reshape(rand, [-1, 5]))
        )

    def batch_fn(idx, rand):
        images = tf.gather(source, idx)
        if augment:
            images = _pad_crop_flip_batch(images, rand)
        return preprocessing(_resize(images, size)), tf.gather(labels, idx)

    def element_fn(idx, rand):
        image = _element_image(examples, source, idx)
        image = _augment_one(image, rand, size) if augment else _resize(image, size)
        image = tf.ensure_shape(image, [size, size, 3])
        return preprocessing(image), tf.gather(labels, idx)

    ds = tf.data.Dataset.range(start_epoch, 1 << 62).flat_map(epoch)
    if batched:
        ds = ds.map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(element_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(per_replica, drop_remainder=True)
    return _finish_dataset(ds, input_context)


def _finish_dataset(ds, input_context):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    if input_context is not None:
        # Each pipeline already takes its own slice: tf.distribute must not shard again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_dataset(
    examples: Examples, preprocessing: Preprocessing, global_batch_size: int, input_context=None
):
    """A finite, in-order `tf.data.Dataset` of (normalised images, int32 labels).

    No augmentation; images resized (bilinear) to `preprocessing.image_size`; the last
    partial batch is kept. With `input_context`, each pipeline yields its contiguous
    slice of every global batch.
    """
    import tensorflow as tf

    pipelines, pipeline_id, per_replica, _ = _pipeline_layout(global_batch_size, input_context)
    n, size = examples.num_examples, preprocessing.image_size
    order = np.arange(n)
    if pipelines > 1:
        chunks = []
        for start in range(0, n, global_batch_size):
            batch = order[start : start + global_batch_size]
            chunks.append(np.array_split(batch, pipelines)[pipeline_id])
        order = np.concatenate(chunks) if chunks else order[:0]
    source = _source_tensor(examples)
    labels = tf.constant(examples.labels, tf.int32)
    if examples.images is not None:
        ds = tf.data.Dataset.from_tensor_slices(order).batch(per_replica)

        def batch_fn(idx):
            return preprocessing(_resize(tf.gather(source, idx), size)), tf.gather(labels, idx)

        ds = ds.map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:

        def element_fn(idx):
            image = _resize(_element_image(examples, source, idx), size)
            return preprocessing(tf.ensure_shape(image, [size, size, 3])), tf.gather(labels, idx)

        ds = tf.data.Dataset.from_tensor_slices(order).map(
            element_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        ds = ds.batch(per_replica)
    return _finish_dataset(ds, input_context)


def sample_images(
    examples: Examples, n: int, seed: int
) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """`n` seeded random examples as stored: (uint8 RGB images, int64 labels).

    Images come back as one array when they share a size, else as a list of arrays.
    """
    rng = np.random.default_rng([seed, 7])
    idx = rng.choice(examples.num_examples, size=min(n, examples.num_examples), replace=False)
    picked = examples.subset(idx)
    if picked.images is not None:
        return picked.images, picked.labels
    import tensorflow as tf

    images = []
    for i in range(picked.num_examples):
        data = tf.io.read_file(picked.files[i]) if picked.files is not None else picked.encoded[i]
        images.append(_decode_image(data).numpy())
    if len({im.shape for im in images}) == 1:
        return np.stack(images), picked.labels
    return images, picked.labels


__all__: Sequence[str] = (
    "DataConfig",
    "DataError",
    "Examples",
    "Splits",
    "eval_dataset",
    "load",
    "sample_images",
    "steps_per_epoch",
    "train_dataset",
)
