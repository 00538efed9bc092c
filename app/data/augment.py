"""Training augmentation driven by given uniform random numbers (so it is a pure function
of them): pad-crop-flip at the model's size, random-resized-crop + flip otherwise.

TensorFlow at module level: all graph code, reached through the pipelines `app.data` loads lazily.
"""

from __future__ import annotations

import math

import tensorflow as tf

from models.preprocessing import resize

# Random-resized-crop ranges (area fraction, aspect ratio) when upsampling. Narrower than
# ImageNet's (0.08, 1): a 32x32 image cropped to 8% keeps ~80 pixels, too little to learn from.
RRC_SCALE = (0.25, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
# Random crop after zero padding by 4 pixels per 32 of image size (the CIFAR recipe).
PAD_FRACTION = 4 / 32
# Uniform numbers used per example: crop y, crop x, flip, then RRC area and aspect ratio.
RANDOM_PER_EXAMPLE = 5


def pad_crop_flip_batch(images: tf.Tensor, rand: tf.Tensor) -> tf.Tensor:
    """Batched random crop after zero padding + horizontal flip, exact pixel copies.

    images: uint8 [b, h, w, 3]; rand: float [b, >=3] uniform in [0, 1).
    """
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
    """`pad_crop_flip_batch` for one image already known to be size x size."""
    image = tf.ensure_shape(image, [size, size, 3])
    return pad_crop_flip_batch(image[None], rand[None])[0]


def _random_resized_crop_one(image, rand, size: int):
    """Random-resized-crop + horizontal flip of one uint8 image to float [size, size, 3]."""
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
    return resize(crop, size)


def augment_one(image: tf.Tensor, rand: tf.Tensor, size: int) -> tf.Tensor:
    """Augments one uint8 image of any size to float32 [size, size, 3]: pad-crop-flip at
    native size, else random-resized-crop. `rand`: float [RANDOM_PER_EXAMPLE] in [0, 1)."""
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
