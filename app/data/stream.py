"""Streaming from TFRecord files (`RecordSet`): training epochs that are a function of
(seed, epoch) and resume without decoding what was trained, per-worker file sharding, and
in-order evaluation. A pipeline holds one or two shuffle windows of serialized records (a
quarter of the memory budget each, 4 to 512 MB), never the dataset.

Training, for input pipeline (worker) w of P:
* its files: a fixed assignment, the same every epoch: largest file first onto the
  pipeline with the fewest records (ties: the lower index); with fewer files than
  pipelines, each file's records are cut into P contiguous ranges first (with a warning);
* every pipeline runs `min over pipelines of (its records // (G / P))` steps of global
  batch G: a pipeline's records past that many batches are not seen that epoch;
* epoch e: its files in a seeded order, read as one stream rotated by a seeded offset and
  cut into LANES equal lanes read in parallel, one record per lane in turn; windows of W
  consecutive records are permuted (stateless, seeded by window), and the first
  steps * G / P records are trained on. Every seed is (seed, e, w): nothing depends on
  TensorFlow's global seed or on how often the dataset was iterated;
* resuming at step s (s * G / P records into the epoch) starts every lane at the first
  record of the window holding that position, which reads that window again (about
  `window_bytes` of serialized records, parsed and decoded never) and walks the record
  headers before each lane's start (`TFRecordDataset.skip`: no payload is parsed).

Records are checked as they come: a record that fails its CRC or cannot be read, a label
out of range and the pixel limits stop the pipeline with an error naming the file.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
from absl import logging

from app.data.augment import RANDOM_PER_EXAMPLE, augment_one
from app.data.decode import decode_image
from app.data.types import (
    PIPELINE_ERROR,
    DataError,
    Examples,
    RecordFile,
    RecordSet,
    pipeline_error,
)
from models.preprocessing import Preprocessing, resize

# Lanes read in parallel per pipeline: where a window's records come from.
LANES = 32
# A shuffle window: at most this many serialized records, and about
# `RecordSet.window_bytes`: a quarter of the memory budget, within these bounds.
MAX_WINDOW = 16384
WINDOW_BYTES = (4 << 20, 512 << 20)


def window_bytes(budget: int) -> int:
    """The shuffle window's bytes for a memory budget of `budget` bytes."""
    return min(WINDOW_BYTES[1], max(WINDOW_BYTES[0], budget // 4))


# Records are checked a chunk at a time, a function call per record costing as much as
# reading it: up to this many records, and about this many bytes (a chunk per lane).
_CHUNK = 256
_CHUNK_BYTES = 1 << 20


def _chunk(ranges: list[RecordFile]) -> int:
    """Records per chunk for records of these ranges' mean size."""
    n = sum(f.take for f in ranges)
    record_bytes = max(1, sum(f.num_bytes for f in ranges) // max(1, n))
    return max(1, min(_CHUNK, _CHUNK_BYTES // record_bytes))


def _corrupt(path, number) -> list:
    """The parts of the message for a record that could not be read."""
    return [
        PIPELINE_ERROR,
        path,
        ": record ",
        number,
        " is corrupt or unreadable; copy the file again",
    ]


def _bad_label(path, number, stored, records: RecordSet) -> list:
    """The parts of the message for a label out of range."""
    return [
        PIPELINE_ERROR, path, ": record ", number, " has label ", stored,
        f" (after --label_offset={records.label_offset}: outside [0, {records.num_classes})); "
        "check --label_offset",
    ]  # fmt: skip


def assign_files(records: RecordSet, pipelines: int) -> list[list[RecordFile]]:
    """Each input pipeline's record ranges (see the module docstring), in stored order."""
    ranges = list(records.files)
    if pipelines > 1 and len(ranges) < pipelines:
        logging.warning(
            "%d TFRecord files for %d input pipelines: each pipeline reads its own range of "
            "records of every file; write at least as many shards as workers",
            len(ranges), pipelines,
        )  # fmt: skip
        ranges = [part for f in ranges for part in _cut(f, pipelines)]
    load, owned = [0] * pipelines, [[] for _ in range(pipelines)]
    for i in sorted(range(len(ranges)), key=lambda i: (-ranges[i].take, i)):
        w = min(range(pipelines), key=lambda w: (load[w], w))
        owned[w].append(i)
        load[w] += ranges[i].take
    return [[ranges[i] for i in sorted(idx)] for idx in owned]


def _cut(f: RecordFile, parts: int) -> list[RecordFile]:
    edges = [f.skip + f.take * i // parts for i in range(parts + 1)]
    return [
        RecordFile(f.path, a, b - a, f.num_bytes * (b - a) // max(1, f.take))
        for a, b in itertools.pairwise(edges)
    ]


def steps_per_epoch(records: RecordSet, global_batch_size: int, pipelines: int = 1) -> int:
    """Global batches every pipeline can make in an epoch (the rule above); 0 when one
    pipeline has fewer records than its share of one batch."""
    per_pipeline = global_batch_size // pipelines
    return min(sum(f.take for f in fs) for fs in assign_files(records, pipelines)) // per_pipeline


def _window(ranges: list[RecordFile], budget: int) -> tuple[int, int]:
    """(lanes, records per lane and window) for these ranges and `budget` window bytes."""
    n = sum(f.take for f in ranges)
    record_bytes = max(1, sum(f.num_bytes for f in ranges) // max(1, n))
    window = min(MAX_WINDOW, max(1, budget // record_bytes))
    lanes = max(1, min(LANES, n))
    return lanes, max(1, window // lanes)


def _read_range(path, skip, take, chunk: int) -> tf.data.Dataset:
    """(record, path, record number) of records [skip, skip + take) of a file, read
    `chunk` at a time; a record that cannot be read (CRC, I/O) stops the pipeline naming
    the file and the record."""
    # The error is ignored only to be raised below with the file's name: the file's records
    # then end early, and a chunk comes short (or the end marker comes too soon).
    read = tf.data.TFRecordDataset(path).skip(skip).take(take).ignore_errors().batch(chunk)
    end = tf.data.Dataset.from_tensors((tf.zeros([0], tf.string), True))
    marked = read.map(lambda records: (records, False)).concatenate(end).enumerate()

    def check(j, item):
        records, last = item
        n = tf.shape(records, out_type=tf.int64)[0]
        expected = tf.where(last, tf.constant(0, tf.int64), tf.minimum(take - j * chunk, chunk))
        ok = tf.logical_and(tf.equal(n, expected), tf.equal(last, j * chunk >= take))
        first = skip + j * chunk
        with tf.control_dependencies([tf.debugging.Assert(ok, _corrupt(path, first + n))]):
            return records, tf.fill([n], path), first + tf.range(n, dtype=tf.int64)

    return marked.map(check).unbatch()


def _ranges_dataset(ranges: list[RecordFile]) -> tf.data.Dataset:
    """Every record of `ranges`, in order."""
    ranges = ranges or [RecordFile("", 0, 0, 0)]  # an empty split: nothing is opened
    return tf.data.Dataset.from_tensor_slices(
        (
            tf.constant([f.path for f in ranges]),
            tf.constant([f.skip for f in ranges], tf.int64),
            tf.constant([f.take for f in ranges], tf.int64),
        )
    ).flat_map(lambda path, skip, take: _read_range(path, skip, take, _chunk(ranges)))


def parse_record(records: RecordSet, record, path, number, max_pixels: int):
    """(uint8 [h, w, 3] image, int32 label) of one serialized example, checked."""
    parsed = tf.io.parse_single_example(
        record,
        {
            records.image_key: tf.io.FixedLenFeature([], tf.string, b""),
            records.label_key: tf.io.FixedLenFeature([], tf.int64, -1),
        },
    )
    stored = parsed[records.label_key]
    label = stored - records.label_offset
    ok = tf.logical_and(label >= 0, label < records.num_classes)
    with tf.control_dependencies(
        [tf.debugging.Assert(ok, _bad_label(path, number, stored, records))]
    ):
        label = tf.cast(label, tf.int32)
    where = [PIPELINE_ERROR, path, ": record ", number, ": "]
    return decode_image(parsed[records.image_key], max_pixels, where), label


def train_records(
    examples: Examples,
    preprocessing: Preprocessing,
    *,
    seed: int,
    augment: bool,
    start_epoch: int,
    start_step: int,
    steps: int,
    pipelines: int,
    pipeline_id: int,
    per_replica: int,
    per_pipeline: int,
) -> tf.data.Dataset:
    """The endless per-replica batches of pipeline `pipeline_id` (the module docstring)."""
    records, size, k = examples.records, preprocessing.image_size, RANDOM_PER_EXAMPLE
    mine = assign_files(records, pipelines)[pipeline_id]
    total = sum(f.take for f in mine)
    used = steps * per_pipeline
    lanes, block = _window(mine, records.window_bytes)
    chunk = _chunk(mine)
    window = lanes * block
    paths = tf.constant([f.path for f in mine])
    skips = tf.constant([f.skip for f in mine], tf.int64)
    takes = tf.constant([f.take for f in mine], tf.int64)
    q, r = divmod(total, lanes)
    lane_length = tf.constant([q + (i < r) for i in range(lanes)], tf.int64)
    lane_start = tf.constant([i * q + min(i, r) for i in range(lanes)], tf.int64)

    def epoch(e):
        key = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(seed, tf.int64), e]), pipeline_id
        )
        keys = [tf.random.experimental.stateless_fold_in(key, salt) for salt in range(4)]
        order = tf.random.experimental.stateless_shuffle(tf.range(len(mine)), keys[0])
        ends = tf.cumsum(tf.gather(takes, order))
        starts = ends - tf.gather(takes, order)
        # The files twice over, so that a lane crossing the end of the rotated stream wraps.
        starts2, ends2 = tf.concat([starts, starts + total], 0), tf.concat([ends, ends + total], 0)
        order2 = tf.concat([order, order], 0)
        rotation = tf.random.stateless_uniform([], keys[1], 0, total, tf.int64)
        first = tf.where(e == start_epoch, tf.constant(start_step * per_pipeline, tf.int64), 0)
        done = first // window  # windows already trained: each lane skips their records

        def lane(begin, length):
            low, high = tf.maximum(begin, starts2), tf.minimum(begin + length, ends2)
            keep = high > low
            picked = tf.boolean_mask(order2, keep)
            pieces = tf.data.Dataset.from_tensor_slices(
                (
                    tf.gather(paths, picked),
                    tf.gather(skips, picked) + tf.boolean_mask(low - starts2, keep),
                    tf.boolean_mask(high - low, keep),
                )
            )
            return pieces.flat_map(lambda p, s, t: _read_range(p, s, t, chunk))

        def permute(j, batch):
            """Window j in its seeded order, with each example's augmentation numbers
            (a function of (seed, e, pipeline, j, place in the window))."""
            n = tf.shape(batch[0])[0]
            seed_j = tf.random.experimental.stateless_fold_in(keys[2], j)
            perm = tf.random.experimental.stateless_shuffle(tf.range(n), seed_j)
            rand = tf.random.stateless_uniform(
                [n, k], tf.random.experimental.stateless_fold_in(keys[3], j)
            )
            return (rand, *(tf.gather(x, perm) for x in batch))

        begins = (lane_start + done * block + rotation) % total
        lengths = tf.maximum(lane_length - done * block, 0)
        ds = tf.data.Dataset.from_tensor_slices((begins, lengths)).interleave(
            lane, lanes, 1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        ds = ds.batch(window).enumerate(start=done).map(permute).unbatch()
        return ds.take(used - done * window).skip(first - done * window)

    def element(rand, record, path, number):
        image, label = parse_record(records, record, path, number, examples.max_pixels)
        image = augment_one(image, rand, size) if augment else resize(image, size)
        return preprocessing(tf.ensure_shape(image, [size, size, 3])), label

    ds = tf.data.Dataset.range(start_epoch, 1 << 62).flat_map(epoch)
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(per_replica, drop_remainder=True)


def eval_records(
    examples: Examples,
    preprocessing: Preprocessing,
    global_batch_size: int,
    pipelines: int,
    pipeline_id: int,
    per_replica: int,
) -> tf.data.Dataset:
    """The split in stored order; with several pipelines, each takes its contiguous part
    of every global batch (every pipeline reads every record, and parses only its own)."""
    records, size = examples.records, preprocessing.image_size
    ds = _ranges_dataset(list(records.files))
    if pipelines > 1:

        def part(*batch):
            n = tf.shape(batch[0])[0]
            base, extra = n // pipelines, n % pipelines
            start = pipeline_id * base + tf.minimum(pipeline_id, extra)
            length = base + tf.cast(pipeline_id < extra, tf.int32)
            return tuple(x[start : start + length] for x in batch)

        ds = ds.batch(global_batch_size).map(part).unbatch()

    def element(record, path, number):
        image, label = parse_record(records, record, path, number, examples.max_pixels)
        return preprocessing(tf.ensure_shape(resize(image, size), [size, size, 3])), label

    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Known, so that Keras need not find the end of validation by running out of data.
    n = records.num_examples
    mine = sum(
        np.array_split(np.arange(min(global_batch_size, n - start)), pipelines)[pipeline_id].size
        for start in range(0, n, global_batch_size)
    )
    batches = -(-mine // per_replica)
    return ds.batch(per_replica).apply(tf.data.experimental.assert_cardinality(batches))


def _checked_labels(records: RecordSet, labels: np.ndarray, paths, numbers) -> np.ndarray:
    labels = labels - records.label_offset
    bad = np.flatnonzero((labels < 0) | (labels >= records.num_classes))
    if bad.size:
        i = bad[0]
        parts = _bad_label(paths[i].decode(), numbers[i], labels[i] + records.label_offset, records)
        raise DataError("".join(map(str, parts[1:])))
    return labels


def encoded_batches(
    records: RecordSet, batch_size: int, ranges: list[RecordFile] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(encoded image bytes, int64 labels) of `ranges` (default: all), in order.

    Raises:
        DataError: a record that cannot be read, or a label out of range (naming the file).
    """
    spec = {
        records.image_key: tf.io.FixedLenFeature([], tf.string, b""),
        records.label_key: tf.io.FixedLenFeature([], tf.int64, -1),
    }

    def parse(record, path, number):
        parsed = tf.io.parse_example(record, spec)
        return parsed[records.image_key], parsed[records.label_key], path, number

    ds = _ranges_dataset(list(records.files) if ranges is None else ranges)
    ds = ds.batch(batch_size).map(parse).prefetch(1)
    try:
        for encoded, labels, paths, numbers in ds.as_numpy_iterator():
            yield encoded.astype(object), _checked_labels(records, labels, paths, numbers)
    except tf.errors.OpError as e:
        raise DataError(pipeline_error(e) or f"{records.files[0].path}...: {e}") from e


def slice_ranges(records: RecordSet, start: int, stop: int) -> list[RecordFile]:
    """Records [start, stop) of the split, in stored order, as ranges of its files."""
    out, offset = [], 0
    for f in records.files:
        low, high = max(start, offset), min(stop, offset + f.take)
        if high > low:
            share = f.num_bytes * (high - low) // max(1, f.take)
            out.append(RecordFile(f.path, f.skip + low - offset, high - low, share))
        offset += f.take
    return out


def sample_ranges(records: RecordSet, n: int, seed: int) -> list[RecordFile]:
    """One record from each of `n` seeded files (cycling when there are fewer files)."""
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(records.files))
    picked = []
    for i in range(min(n, records.num_examples)):
        f = records.files[order[i % len(order)]]
        offset = i // len(order)
        if offset < f.take:
            picked.append(RecordFile(f.path, f.skip + offset, 1, f.num_bytes // max(1, f.take)))
    return picked
