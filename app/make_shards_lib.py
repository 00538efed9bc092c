"""Writes any dataset the project reads as TFRecord shards in TF Model Garden's layout.

`make_shards(ShardsConfig)` is what `python -m app.make_shards` runs: read the source as
stored (image folder, CIFAR python batches, TFDS data dir, other shards; nothing decoded
into memory), hold out validation as training would (`app.data.splits.hold_out`: the same
examples for the same --seed and --validation_split), and write each split as
`<split>-NNNNN-of-NNNNN` files of `tf.train.Example`s (`image/encoded`, `image/class/label`,
`image/class/text`, `image/format`), in a seeded order, about `SHARD_BYTES` each; then
`shards.json` (every file's record count) and `labels.txt`, last.

Images keep their encoding (JPEG stays JPEG); CIFAR's raw pixels become lossless PNG.
Every image is decoded once on the way, so a bad one stops the conversion naming it.

Crash-safe: each shard is written under a temporary name and renamed into place, and
`.make_shards.json` (this conversion's settings) is there from the start until after
`labels.txt`, which comes last: a killed conversion leaves nothing that loads as a dataset.
Rerunning the same command continues it: shards already in place are kept (they are
complete, and the same for the same settings); other settings are refused.

Example:

    from app import make_shards_lib
    from app.data import DataConfig
    make_shards_lib.make_shards(
        make_shards_lib.ShardsConfig(DataConfig(data_dir="~/data/cifar10"), "/data/cifar10_shards")
    )
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import numpy as np

from app.data import DataConfig, DataError, Examples, shards, splits, stream
from app.data.loading import load_raw
from app.data.shards import check_numbering
from app.data.types import SPLITS, RawSplits
from common import files
from common.errors import UsageError, first_line

# TF's data performance guide: files of 100 MB or more read efficiently.
SHARD_BYTES = 128 << 20
# Images checked and written a chunk at a time.
CHUNK = 256


@dataclasses.dataclass(frozen=True)
class ShardsConfig:
    """What to convert, and where to.

    Attributes:
        data: the source (any data `app.data.load` reads) and its hold-out and limits.
        output_dir: the folder for the shards (local or in a bucket); new or empty.
        shards: train files (the other splits in proportion); None: about SHARD_BYTES each.
        verbose: 1 shows a progress bar.
    """

    data: DataConfig
    output_dir: str
    shards: int | None = None
    verbose: int = 1


def _image_format(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"\x89PNG":
        return "png"
    return {b"GIF8": "gif", b"RIFF": "webp"}.get(data[:4], "bmp" if data[:2] == b"BM" else "")


def _example(encoded: bytes, label: int, text: str) -> bytes:
    import tensorflow as tf

    def feature(**kind):
        return tf.train.Feature(**kind)

    return tf.train.Example(
        features=tf.train.Features(
            feature={
                shards.IMAGE_KEY: feature(bytes_list=tf.train.BytesList(value=[encoded])),
                shards.LABEL_KEY: feature(int64_list=tf.train.Int64List(value=[int(label)])),
                shards.TEXT_KEY: feature(bytes_list=tf.train.BytesList(value=[text.encode()])),
                "image/format": feature(
                    bytes_list=tf.train.BytesList(value=[_image_format(encoded).encode()])
                ),
            }
        )
    ).SerializeToString()


def _encoded_chunks(examples: Examples, order: np.ndarray) -> Iterator[tuple[list, np.ndarray]]:
    """(encoded images, labels) of the examples at `order`, CHUNK at a time, each image
    checked to decode (a bad one named). Streamed examples: `order` must be a range (the
    records are read in stored order)."""
    import tensorflow as tf

    if examples.streamed:
        ranges = stream.slice_ranges(examples.records, int(order[0]), int(order[-1]) + 1)
        for encoded, labels in stream.encoded_batches(examples.records, CHUNK, ranges):
            yield _checked(list(encoded), examples, None), labels
        return
    for start in range(0, len(order), CHUNK):
        idx = order[start : start + CHUNK]
        labels = examples.labels[idx]
        if examples.images is not None:  # CIFAR's raw pixels: lossless PNG
            pngs = tf.data.Dataset.from_tensor_slices(examples.images[idx]).map(
                tf.io.encode_png, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )
            yield [p.numpy() for p in pngs], labels
        elif examples.files is not None:
            paths = list(examples.files[idx])
            yield _checked([files.read_bytes(p) for p in paths], examples, paths), labels
        else:
            yield _checked(list(examples.encoded[idx]), examples, None), labels


def _checked(encoded: list, examples: Examples, paths: list | None) -> list:
    """`encoded` after decoding every image once (in parallel); names the first bad one."""
    import tensorflow as tf

    from app.data.decode import check_decodes, decode_image

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(encoded, tf.string)).map(
        lambda data: tf.shape(decode_image(data, examples.max_pixels)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    try:
        for _ in ds.batch(len(encoded)):
            pass
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        for i, data in enumerate(encoded):
            check_decodes(paths[i] if paths else None, data, None, i, examples.max_pixels)
        raise
    return encoded


def _estimated_bytes(examples: Examples) -> int:
    """The split's size as shards, from a sample where it is not known."""
    n = examples.num_examples
    if examples.streamed:
        return examples.records.num_bytes
    if examples.encoded is not None:
        return int(sum(len(e) for e in examples.encoded))
    picks = np.unique(np.linspace(0, n - 1, min(64, n)).astype(np.int64))
    if examples.files is not None:
        sample = [files.size(examples.files[i]) for i in picks]
    else:
        sample = [len(e) for e in next(_encoded_chunks(examples, picks))[0]]
    return int(np.mean(sample) * n)


def _plan(raw: RawSplits, config: ShardsConfig) -> dict[str, int]:
    """Files per split: `config.shards` for train, the others in proportion to their size."""
    sizes = {s: _estimated_bytes(ex) for s, ex in _splits(raw).items()}
    examples = {s: ex.num_examples for s, ex in _splits(raw).items()}
    if config.shards is None:
        wanted = {s: round(b / SHARD_BYTES) for s, b in sizes.items()}
    else:
        base = sizes.get("train") or max(sizes.values())
        wanted = {s: round(config.shards * b / base) for s, b in sizes.items()}
    return {s: min(examples[s], max(1, w)) for s, w in wanted.items()}


def _splits(raw: RawSplits) -> dict[str, Examples]:
    return {
        s: ex
        for s, ex in zip(SPLITS, (raw.train, raw.validation, raw.test), strict=True)
        if ex is not None and ex.num_examples
    }


def _settings(config: ShardsConfig, counts: dict[str, int], plan: dict[str, int]) -> dict:
    data = dataclasses.asdict(config.data)
    data.pop("memory_budget_mb")  # where the source is read from, not what is written
    return {"data": data, "examples": counts, "shards": plan}


def _start(output_dir: str, settings: dict) -> None:
    """Refuses a finished conversion or another one's leftovers; records this one's
    settings, so that rerunning after a kill continues it."""
    progress = files.join(output_dir, shards.PROGRESS_FILE)
    unfinished = files.exists(progress)
    if files.exists(files.join(output_dir, shards.LABELS_FILE)) and not unfinished:
        raise UsageError(
            f"--output_dir {output_dir} already holds a converted dataset; pass a new folder, "
            "or delete it to convert again"
        )
    if files.isdir(output_dir) and files.listdir(output_dir):
        previous = json.loads(files.read_text(progress)) if unfinished else None
        if previous != json.loads(json.dumps(settings)):
            raise UsageError(
                f"--output_dir {output_dir} is not empty and holds no unfinished conversion "
                "with these settings; pass a new folder"
            )
    files.write_json(progress, settings)


def _write_split(
    out: str, split: str, examples: Examples, count: int, config: ShardsConfig, names, bar
) -> dict:
    """Writes one split's shards (those not already in place); returns its index entry.

    Examples in memory or in files go in a seeded order; streamed ones in stored order."""
    import tensorflow as tf

    n = examples.num_examples
    order = np.arange(n)
    if not examples.streamed:
        order = np.random.default_rng([config.data.seed, 11, SPLITS.index(split)]).permutation(n)
    entry = {"files": [], "num_examples": [], "num_bytes": []}
    for k in range(count):
        path = files.join(out, shards.shard_name(split, k, count))
        mine = order[k * n // count : (k + 1) * n // count]
        if not files.exists(path):  # a rerun keeps the shards already in place
            with files.atomic_path(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
                for encoded, labels in _encoded_chunks(examples, mine):
                    for data, label in zip(encoded, labels.tolist(), strict=True):
                        writer.write(_example(data, label, names[label]))
                    if bar is not None:
                        bar.add(len(labels))
        elif bar is not None:
            bar.add(len(mine))
        entry["files"].append(files.basename(path))
        entry["num_examples"].append(len(mine))
        entry["num_bytes"].append(files.size(path))
    return entry


def make_shards(config: ShardsConfig) -> dict:
    """Converts `config.data` into shards in `config.output_dir` (module docstring).

    Returns:
        The index written to shards.json (files, record counts and bytes by split).

    Raises:
        DataError: the source cannot be read, or holds a bad image (named).
        UsageError: `output_dir` holds something else, or a finished conversion.
    """
    raw, _ = splits.hold_out(load_raw(config.data), config.data)
    raw = splits.limit(raw, config.data)
    parts = _splits(raw)
    if not parts:
        raise DataError(f"{config.data.data_dir} holds no examples to convert")
    out = files.resolve(config.output_dir)
    plan = _plan(raw, config)
    counts = {s: ex.num_examples for s, ex in parts.items()}
    _start(out, _settings(config, counts, plan))
    bar = None
    if config.verbose:
        import keras

        bar = keras.utils.Progbar(sum(counts.values()), unit_name="image")
    index = {
        "format": shards.INDEX_FORMAT,
        "version": 1,
        "image_key": shards.IMAGE_KEY,
        "label_key": shards.LABEL_KEY,
        "label_offset": 0,
        "source": raw.source,
        "splits": {
            s: _write_split(out, s, ex, plan[s], config, raw.class_names, bar)
            for s, ex in parts.items()
        },
    }
    files.write_json(files.join(out, shards.INDEX_FILE), index)
    files.write_text(files.join(out, shards.LABELS_FILE), "\n".join(raw.class_names) + "\n")
    files.remove(files.join(out, shards.PROGRESS_FILE))
    return index


def write_index(data_dir: str, label_offset: int | None = None) -> dict:
    """Counts the records of the shards in `data_dir` (Model Garden's, say) once and writes
    `shards.json` beside them, so that runs start without counting them.

    Raises:
        DataError: no shards there, or a shard missing from its numbering.
    """
    root = files.resolve(data_dir)
    by_split = shards.shard_files(files.listdir(root))
    if not by_split:
        raise DataError(f"{root} holds no TFRecord shards (train-00000-of-00008, ...)")
    index = {
        "format": shards.INDEX_FORMAT,
        "version": 1,
        "image_key": shards.IMAGE_KEY,
        "label_key": shards.LABEL_KEY,
        "label_offset": label_offset or 0,
        "splits": {},
    }
    for split, names in by_split.items():
        check_numbering(root, split, names)
        counted = [shards.count_records(files.join(root, n)) for n in names]
        index["splits"][split] = {
            "files": names,
            "num_examples": [c for c, _ in counted],
            "num_bytes": [b for _, b in counted],
        }
    try:
        files.write_json(files.join(root, shards.INDEX_FILE), index)
    except (PermissionError, files.StorageError) as e:
        raise DataError(f"cannot write {root}/{shards.INDEX_FILE}: {first_line(e)}") from e
    return index
