"""`tf.data` pipelines from `Examples`: endless, seeded, augmented training batches that
resume and shard exactly, and finite, in-order evaluation batches. Streamed examples
(TFRecord files) go through `stream`, with its own epoch order and per-worker files.

TensorFlow at module level: all graph code, and `app.data` loads this module lazily.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from app.data import stream
from app.data.augment import RANDOM_PER_EXAMPLE, augment_one, pad_crop_flip_batch
from app.data.decode import decode_image
from app.data.types import PIPELINE_ERROR, DataError, Examples
from models.preprocessing import Preprocessing, resize


def steps_per_epoch(examples: Examples, global_batch_size: int, input_pipelines: int = 1) -> int:
    """Full global batches per epoch (the last partial batch is dropped in training).

    Examples in memory: n // G, whatever the pipelines. Streamed ones: every one of the
    `input_pipelines` (workers) reads its own files and makes as many batches as the one
    with the fewest records (`stream.steps_per_epoch`).

    Raises:
        DataError: fewer examples than one global batch.
    """
    if examples.streamed:
        steps = stream.steps_per_epoch(examples.records, global_batch_size, input_pipelines)
        if steps < 1 and examples.num_examples >= global_batch_size:
            raise DataError(
                f"{examples.origin}: the worker with the fewest records of the "
                f"{input_pipelines} has fewer than its part of one batch of {global_batch_size}; "
                "write more, evener shards (python -m app.make_shards --shards=N) or lower "
                "--batch_size"
            )
    else:
        steps = examples.num_examples // global_batch_size
    if steps < 1:
        raise DataError(
            f"{examples.origin}: {examples.num_examples} training examples are fewer than one "
            f"batch of {global_batch_size}; lower --batch_size or raise --train_limit"
        )
    return steps


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


def _source_tensor(examples: Examples) -> tf.Tensor:
    """The images, paths or encoded bytes as one tensor to gather from."""
    if examples.images is not None:
        return tf.constant(examples.images)
    values = examples.files if examples.files is not None else examples.encoded
    return tf.constant(list(values), dtype=tf.string)


def _element_image(examples: Examples, source, index):
    """uint8 [h, w, 3] image `index` of `examples` (decoding files/bytes when needed)."""
    item = tf.gather(source, index)
    if examples.images is not None:
        return item
    if examples.files is None:
        return decode_image(item, examples.max_pixels)
    return decode_image(tf.io.read_file(item), examples.max_pixels, [PIPELINE_ERROR, item, ": "])


def train_dataset(
    examples: Examples,
    preprocessing: Preprocessing,
    global_batch_size: int,
    *,
    seed: int,
    augment: bool = True,
    start_epoch: int = 0,
    start_step: int = 0,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """An endless `tf.data.Dataset` of (float32 [b, S, S, 3] normalised images, int32 [b]).

    Global batch k of epoch e holds examples `permutation(seed, e)[k*G:(k+1)*G]`; each
    input pipeline (per `input_context`) yields its contiguous slice of it as per-replica
    batches. Augmentation of the example at position p of epoch e is a pure function of
    (seed, e, p). The dataset starts at batch `start_step` of epoch `start_epoch`.
    Streamed examples: each pipeline reads its own files (`stream`).

    Args:
        examples: the training split.
        preprocessing: normalisation and `image_size` S of the model.
        global_batch_size: G, examples per step over all replicas.
        seed: the run's seed.
        augment: random crop/flip (pad-crop at native size, random-resized-crop otherwise).
        start_epoch, start_step: where a resumed run begins.
        input_context: a `tf.distribute.InputContext`, or None for a single pipeline.

    Raises:
        DataError: fewer examples than one global batch.
    """
    pipelines, pipeline_id, per_replica, _ = _pipeline_layout(global_batch_size, input_context)
    steps = steps_per_epoch(examples, global_batch_size, pipelines)
    if not 0 <= start_step < steps or start_epoch < 0:
        raise ValueError(f"start_step {start_step} not in [0, {steps}) or start_epoch < 0")
    if examples.streamed:
        ds = stream.train_records(
            examples,
            preprocessing,
            seed=seed,
            augment=augment,
            start_epoch=start_epoch,
            start_step=start_step,
            steps=steps,
            pipelines=pipelines,
            pipeline_id=pipeline_id,
            per_replica=per_replica,
            per_pipeline=global_batch_size // pipelines,
        )
        return _finish_dataset(ds, input_context)
    n, size = examples.num_examples, preprocessing.image_size
    k = RANDOM_PER_EXAMPLE
    source = _source_tensor(examples)
    labels = tf.constant(examples.labels, tf.int32)
    in_memory = examples.images is not None
    batched = in_memory and (not augment or examples.image_shape[:2] == (size, size))

    def epoch(e):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), e])
        perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), epoch_seed)
        rand = tf.random.stateless_uniform(
            [steps * global_batch_size, k], seed=tf.stack([epoch_seed[0], e + (1 << 40)])
        )
        # [steps, pipelines, G / pipelines] -> this pipeline's slice of every global batch.
        perm = tf.reshape(perm[: steps * global_batch_size], [steps, pipelines, -1])[:, pipeline_id]
        rand = tf.reshape(rand, [steps, pipelines, -1, k])[:, pipeline_id]
        first = tf.where(e == start_epoch, tf.constant(start_step, tf.int64), 0)
        perm, rand = perm[first:], rand[first:]
        if batched:
            return tf.data.Dataset.from_tensor_slices(
                (tf.reshape(perm, [-1, per_replica]), tf.reshape(rand, [-1, per_replica, k]))
            )
        return tf.data.Dataset.from_tensor_slices(
            (tf.reshape(perm, [-1]), tf.reshape(rand, [-1, k]))
        )

    def batch_fn(idx, rand):
        images = tf.gather(source, idx)
        if augment:
            images = pad_crop_flip_batch(images, rand)
        return preprocessing(resize(images, size)), tf.gather(labels, idx)

    def element_fn(idx, rand):
        image = _element_image(examples, source, idx)
        image = augment_one(image, rand, size) if augment else resize(image, size)
        image = tf.ensure_shape(image, [size, size, 3])
        return preprocessing(image), tf.gather(labels, idx)

    ds = tf.data.Dataset.range(start_epoch, 1 << 62).flat_map(epoch)
    if batched:
        ds = ds.map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(element_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(per_replica, drop_remainder=True)
    return _finish_dataset(ds, input_context)


def _finish_dataset(ds: tf.data.Dataset, input_context) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    if input_context is not None:
        # Each pipeline already takes its own slice: tf.distribute must not shard again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_dataset(
    examples: Examples,
    preprocessing: Preprocessing,
    global_batch_size: int,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """A finite, in-order `tf.data.Dataset` of (normalised images, int32 labels).

    No augmentation; images resized (bilinear) to `preprocessing.image_size`; the last
    partial batch is kept. With `input_context`, each pipeline yields its contiguous
    slice of every global batch.
    """
    pipelines, pipeline_id, per_replica, _ = _pipeline_layout(global_batch_size, input_context)
    if examples.streamed:
        ds = stream.eval_records(
            examples, preprocessing, global_batch_size, pipelines, pipeline_id, per_replica
        )
        return _finish_dataset(ds, input_context)
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
            return preprocessing(resize(tf.gather(source, idx), size)), tf.gather(labels, idx)

        ds = ds.map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:

        def element_fn(idx):
            image = resize(_element_image(examples, source, idx), size)
            return preprocessing(tf.ensure_shape(image, [size, size, 3])), tf.gather(labels, idx)

        ds = tf.data.Dataset.from_tensor_slices(order).map(
            element_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        ds = ds.batch(per_replica)
    return _finish_dataset(ds, input_context)
