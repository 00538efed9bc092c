"""Reads a folder of TFRecord shards in TF Model Garden's layout, for streaming.

`<split>-NNNNN-of-NNNNN` files (an optional `.tfrecord` suffix) of `tf.train.Example`s with
`image/encoded` (the JPEG/PNG bytes) and `image/class/label` (int64), the keys Model
Garden's classification decoder reads; `labels.txt` beside them (line i names class i) or
the `image/class/text` feature names the classes. Shards written by `app.make_shards` come
with `shards.json`, each file's record count, so nothing is read at start-up to size the
run; other shards are counted once per start-up by walking their record headers.

Nothing here reads an image: a split becomes a `RecordSet` that the pipeline streams.
"""

from __future__ import annotations

import re
import struct
import time

from absl import logging

from app.data.types import (
    SOURCE_TFRECORD,
    DataConfig,
    DataError,
    Examples,
    RawSplits,
    RecordFile,
    RecordSet,
)
from common import files
from common.errors import first_line

# Model Garden's shard names: train-00000-of-01024 (tensorflow/tpu's imagenet_to_gcs.py),
# with the `.tfrecord` suffix of its generic writer (official/vision/data/tfrecord_lib.py).
SHARD_NAME = re.compile(r"^(train|validation|test)-(\d{5,})-of-(\d{5,})(\.tfrecords?)?$")
INDEX_FILE = "shards.json"
LABELS_FILE = "labels.txt"
# What app.make_shards leaves while it writes: its settings, so that a rerun continues.
PROGRESS_FILE = ".make_shards.json"
INDEX_FORMAT = "tfrecord-image-classification"
IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
TEXT_KEY = "image/class/text"


def shard_name(split: str, index: int, count: int) -> str:
    """The file name of shard `index` of `count` of `split`: `train-00003-of-00064`."""
    return f"{split}-{index:05d}-of-{count:05d}"


def shard_files(names: list[str]) -> dict[str, list[str]]:
    """The shard names among `names`, by split (sorted); {} when there are none."""
    found: dict[str, list[str]] = {}
    for name in sorted(names):
        match = SHARD_NAME.match(name)
        if match:
            found.setdefault(match.group(1), []).append(name)
    return found


def check_numbering(root: str, split: str, names: list[str]) -> None:
    """Refuses a split whose shards do not number 0..N-1 of one N."""
    counts = {int(SHARD_NAME.match(n).group(3)) for n in names}
    if len(counts) > 1:
        raise DataError(
            f"{root}: the {split} shards disagree on their total (-of-N: "
            f"{', '.join(map(str, sorted(counts)))}); keep the files of one conversion only"
        )
    count = counts.pop()
    indices = [int(SHARD_NAME.match(n).group(2)) for n in names]
    missing = sorted(set(range(count)) - set(indices))
    if missing or len(indices) != count:
        what = (
            f"{shard_name(split, missing[0], count)} is missing ({len(indices)} of {count} found)"
            if missing
            else f"{len(indices)} files for {count} shards (a shard under two names?)"
        )
        raise DataError(
            f"{root}: {what}; copy every shard (a half-copied set would train on part of "
            "the data), or convert again with python -m app.make_shards"
        )


def count_records(path: str) -> tuple[int, int]:
    """(records, bytes) of a TFRecord file, from its framing alone: each record is a uint64
    length, its CRC, the payload and the payload's CRC; the payloads are seeked over.

    Raises:
        DataError: a truncated file.
    """
    n, size = 0, files.size(path)
    with files.open_read(path) as f:
        position = 0
        while position < size:
            head = f.read(12)
            if len(head) < 12:
                raise DataError(f"{path} is truncated after record {n}; copy it again")
            (length,) = struct.unpack("<Q", head[:8])
            position += 12 + length + 4
            if position > size:
                raise DataError(f"{path} is truncated in record {n}; copy it again")
            f.seek(position)
            n += 1
    return n, size


def first_record(path: str) -> bytes:
    """The payload of the first record of a TFRecord file."""
    with files.open_read(path) as f:
        head = f.read(12)
        if len(head) < 12:
            raise DataError(f"{path} holds no records; remove it or convert again")
        (length,) = struct.unpack("<Q", head[:8])
        return f.read(length)


def check_keys(path: str, image_key: str, label_key: str) -> None:
    """Refuses a shard whose first record lacks the image and label features."""
    import tensorflow as tf

    try:
        example = tf.train.Example.FromString(first_record(path))
    except Exception as e:  # protobuf's DecodeError, whatever module it comes from
        raise DataError(
            f"{path}: the first record is not a tf.train.Example ({first_line(e)})"
        ) from e
    feature = example.features.feature
    kinds = {k: v.WhichOneof("kind") for k, v in feature.items()}
    if kinds.get(image_key) != "bytes_list" or kinds.get(label_key) != "int64_list":
        found = ", ".join(f"{k} ({v})" for k, v in sorted(kinds.items())) or "none"
        raise DataError(
            f"{path}: records have the keys {found}; expected {image_key} (bytes_list, the "
            f"JPEG/PNG bytes) and {label_key} (int64_list, the class), as TF Model Garden's "
            "classification shards have"
        )


def _read_index(root: str) -> dict | None:
    import json

    path = files.join(root, INDEX_FILE)
    if not files.exists(path):
        return None
    try:
        index = json.loads(files.read_text(path))
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
        for split in index["splits"].values():
            if not len(split["files"]) == len(split["num_examples"]) == len(split["num_bytes"]):
                raise ValueError("files, num_examples and num_bytes differ in length")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path} is not an index of these shards ({first_line(e)}); delete it (the "
            "shards are then counted at start-up) or convert again"
        ) from e
    return index


def _split_files(root: str, split: str, names: list[str], index: dict | None) -> list[RecordFile]:
    """The split's files with their record counts: from the index, or counted here."""
    paths = [files.join(root, n) for n in names]
    entry = (index or {}).get("splits", {}).get(split)
    if entry is not None:
        if sorted(entry["files"]) != names:
            raise DataError(
                f"{files.join(root, INDEX_FILE)} lists other {split} shards than the folder "
                "holds; copy the whole folder again, or delete shards.json to count them"
            )
        counts = zip(entry["num_examples"], entry["num_bytes"], strict=True)
        by_name = dict(zip(entry["files"], counts, strict=True))
        return [RecordFile(p, 0, *map(int, by_name[n])) for n, p in zip(names, paths, strict=True)]
    started = time.perf_counter()
    counted = [count_records(p) for p in paths]
    logging.warning(
        "%s: no %s: counted the %d records of %d %s shards in %.1f s from their headers "
        "(python -m app.make_shards --index_only --data_dir=%s writes one)",
        root, INDEX_FILE, sum(c for c, _ in counted), len(paths), split,
        time.perf_counter() - started, root,
    )  # fmt: skip
    return [RecordFile(p, 0, n, size) for p, (n, size) in zip(paths, counted, strict=True)]


def _class_names(root: str, records: dict[str, RecordSet], offset: int) -> list[str]:
    """labels.txt, else the `image/class/text` of every label in the smallest split."""
    path = files.join(root, LABELS_FILE)
    if files.exists(path):
        names = [line.strip() for line in files.read_text(path).splitlines() if line.strip()]
        if not names:
            raise DataError(f"{path} is empty; it names one class a line")
        return names
    smallest = min(records.values(), key=lambda r: r.num_bytes)
    started = time.perf_counter()
    texts = _label_texts(smallest, offset)
    logging.warning(
        "%s: no %s: class names read from %s of %d records in %.1f s; write %s (line i names "
        "class i) to skip this", root, LABELS_FILE, TEXT_KEY, smallest.num_examples,
        time.perf_counter() - started, path,
    )  # fmt: skip
    missing = [i for i in range(max(texts, default=-1) + 1) if not texts.get(i)]
    if not texts or missing:
        hint = ""
        if missing == [0]:
            hint = f" (its labels start at {offset + 1}: pass --label_offset={offset + 1})"
        raise DataError(
            f"{root} has no {LABELS_FILE}, and its records name no class for label "
            f"{missing[0] + offset if missing else offset} in {TEXT_KEY}{hint}; write {path} "
            f"with one class name a line (line i names label i + --label_offset={offset})"
        )
    return [texts[i] for i in range(len(texts))]


def _label_texts(records: RecordSet, offset: int) -> dict[int, str]:
    import tensorflow as tf

    spec = {
        records.label_key: tf.io.FixedLenFeature([], tf.int64, -1),
        TEXT_KEY: tf.io.FixedLenFeature([], tf.string, b""),
    }
    texts: dict[int, str] = {}
    for f in records.files:
        ds = tf.data.TFRecordDataset(f.path).skip(f.skip).take(f.take).batch(4096)
        try:
            for batch in ds.map(lambda r: tf.io.parse_example(r, spec)).as_numpy_iterator():
                for label, text in zip(batch[records.label_key], batch[TEXT_KEY], strict=True):
                    if text:
                        texts.setdefault(int(label) - offset, text.decode())
        except tf.errors.OpError as e:
            raise DataError(f"{f.path} could not be read ({first_line(e)}); copy it again") from e
    return texts


def load_shards(root: str, config: DataConfig) -> RawSplits:
    """The splits of the shard folder `root` as `RecordSet`s (see the module docstring).

    Raises:
        DataError: a shard missing from its numbering, records with other keys, no class
            names, or an index that does not match the files.
    """
    names = files.listdir(root)
    unfinished = PROGRESS_FILE in names or (INDEX_FILE in names and LABELS_FILE not in names)
    if unfinished:  # app.make_shards writes labels.txt last
        raise DataError(
            f"{root} holds an unfinished conversion (app.make_shards writes {LABELS_FILE} "
            "last); rerun the same python -m app.make_shards command to finish it"
        )
    by_split = shard_files(names)
    index = _read_index(root)
    for split, names in by_split.items():
        check_numbering(root, split, names)
    offset = config.label_offset
    if offset is None:
        offset = int((index or {}).get("label_offset", 0))
    image_key = (index or {}).get("image_key", IMAGE_KEY)
    label_key = (index or {}).get("label_key", LABEL_KEY)
    record_files = {}
    for split, names in by_split.items():
        record_files[split] = _split_files(root, split, names, index)
        check_keys(record_files[split][0].path, image_key, label_key)
    sets = {
        split: RecordSet(tuple(fs), 0, image_key, label_key, offset)
        for split, fs in record_files.items()
    }
    class_names = _class_names(root, sets, offset)
    examples = {
        split: Examples(
            None,
            records=RecordSet(tuple(fs), len(class_names), image_key, label_key, offset),
            origin=files.join(root, f"{split}-*"),
        )
        for split, fs in record_files.items()
    }
    return RawSplits(
        examples.get("train"),
        examples.get("validation"),
        examples.get("test"),
        class_names,
        SOURCE_TFRECORD,
        fixed_shape=False,
    )
