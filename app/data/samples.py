"""A few seeded examples as stored (uint8 RGB), for pictures of the data."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from app.data.decode import decode_image
from app.data.types import Examples


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
    images = []
    for i in range(picked.num_examples):
        data = tf.io.read_file(picked.files[i]) if picked.files is not None else picked.encoded[i]
        images.append(decode_image(data, picked.max_pixels).numpy())
    if len({im.shape for im in images}) == 1:
        return np.stack(images), picked.labels
    return images, picked.labels
