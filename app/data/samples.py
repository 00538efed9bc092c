"""Examples as stored (uint8 RGB, each at its own size): a few seeded ones for pictures of
the data, or a whole split in order, a batch at a time, for models that take images as
stored (the exported formats)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from app.data import stream
from app.data.decode import decode_image
from app.data.types import Examples


def sample_images(
    examples: Examples, n: int, seed: int
) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """`n` seeded random examples as stored: (uint8 RGB images, int64 labels).

    Images come back as one array when they share a size, else as a list of arrays.
    Streamed examples: the first record of `n` seeded files (reads `n` records).
    """
    if examples.streamed:
        ranges = stream.sample_ranges(examples.records, n, seed)
        encoded, labels = next(stream.encoded_batches(examples.records, max(1, n), ranges))
        images = [decode_image(e, examples.max_pixels).numpy() for e in encoded]
        return (np.stack(images) if len({im.shape for im in images}) == 1 else images), labels
    rng = np.random.default_rng([seed, 7])
    idx = rng.choice(examples.num_examples, size=min(n, examples.num_examples), replace=False)
    picked = examples.subset(idx)
    if picked.images is not None:
        return picked.images, picked.labels
    images = []
    for i in range(picked.num_examples):
        data = tf.io.read_file(picked.files[i]) if picked.files is not None else picked.encoded[i]
        images.append(decode_image(data, picked.max_pixels).numpy())
    if len({im.shape for im in images}) == 1:
        return np.stack(images), picked.labels
    return images, picked.labels


def stored_batches(examples: Examples, batch_size: int) -> Iterator[tuple[list, np.ndarray]]:
    """Yields (uint8 RGB images as stored, int64 labels) in order, `batch_size` at a time;
    files, encoded bytes and streamed records are decoded a batch at a time, and sizes may
    differ."""
    if examples.streamed:
        for encoded, labels in stream.encoded_batches(examples.records, batch_size):
            yield [decode_image(e, examples.max_pixels).numpy() for e in encoded], labels
        return
    for start in range(0, examples.num_examples, batch_size):
        stop = min(start + batch_size, examples.num_examples)
        if examples.images is not None:
            images = list(examples.images[start:stop])
        elif examples.files is not None:
            images = [
                decode_image(tf.io.read_file(f), examples.max_pixels).numpy()
                for f in examples.files[start:stop]
            ]
        else:
            images = [
                decode_image(e, examples.max_pixels).numpy() for e in examples.encoded[start:stop]
            ]
        yield images, np.asarray(examples.labels[start:stop], np.int64)
