"""Decoding: JPEG/PNG to uint8 RGB, and decode-once into memory when the images share a
size and fit (CIFAR-10: 150 MB), naming any file that does not decode or is over the
pixel limit (read from its header, before decoding).

TensorFlow at module level: only `load` and the pipelines use it; `app.data` loads them lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from app.data.types import DataError, Examples
from common import files
from common.errors import first_line
from common.pixel_limits import MAX_PIXELS, too_large
from export import image_header

# Decoded images are kept in memory when they take at most this share of the machine's RAM
# and at most MAX_IN_MEMORY_BYTES: CIFAR-10 (150 MB) always does, ImageNet never does. The
# array is captured by the tf.data graph, which tf.distribute may serialize: protobuf's
# 2 GB limit caps it. The total, not the available RAM: a resumed run on the same machine
# must choose the same (in memory or streamed, and the streaming window: another order).
MEMORY_FRACTION = 0.25
MAX_IN_MEMORY_BYTES = 1900 << 20
# Parallel file reads: on a cold cache, reading 50,000 small files is latency-bound.
IO_THREADS = 16


# Image headers read first: when these already show mixed sizes or more than the memory
# budget, the others are not read (a folder of a million photos starts at once).
HEADER_SAMPLE = 64


def memory_budget(megabytes: int | None = None) -> int:
    """Bytes of images a split may keep in memory: `megabytes` (--memory_budget_mb) when
    given, else min(MAX_IN_MEMORY_BYTES, MEMORY_FRACTION of the machine's RAM)."""
    if megabytes is not None:
        return int(megabytes) << 20
    try:
        import psutil

        total = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover - psutil is pinned
        total = 16 << 30
    return int(min(MAX_IN_MEMORY_BYTES, MEMORY_FRACTION * total))


def _header_shape(path: str, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    try:
        # Pillow reads only the header here. Its own bomb check (the process-wide
        # Image.MAX_IMAGE_PIXELS: a warning over it, an error over twice it) cannot be set
        # per call, so the size is checked against ours below.
        with files.open_read(path) as f, Image.open(f) as im:
            w, h = im.size
    except Image.DecompressionBombError:  # over twice Pillow's limit: read the header here
        h, w = (int(n) for n in image_header.header_size(files.read_bytes(path)).numpy())
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"{path} is not a readable JPEG/PNG image ({type(e).__name__}); replace or delete it"
        ) from e
    message = too_large(w, h, max_pixels)
    if message:
        raise DataError(f"{path}: {message}; shrink or delete it, or raise --max_pixels")
    return h, w


def _header_shapes(files: np.ndarray, max_pixels: int = MAX_PIXELS) -> list[tuple[int, int]]:
    """(h, w) of every image file from its header (no decoding); names a bad file or one
    over `max_pixels`.

    Threads, because on a cold file cache this is bound by file-system latency.
    """
    with ThreadPoolExecutor(IO_THREADS) as pool:
        return list(pool.map(lambda path: _header_shape(path, max_pixels), files, chunksize=256))


# A typical image side more than this factor away from --image_size earns a note.
FAR_FACTOR = 5.0


def size_note(examples: Examples, image_size: int, samples: int = 16) -> str | None:
    """A note when the images are far from `image_size` (median side, over `samples`).

    Upsampling 32 px images 7x costs 49x the compute for little gain; shrinking 2,000 px
    photos to 32 px throws their detail away. Files are read by header only.

    Returns:
        One line saying the typical size and what to consider, or None when it is close.
    """
    if examples.num_examples == 0:
        return None
    if examples.image_shape is not None:
        sides = [min(examples.image_shape[:2])]
    elif examples.files is not None:
        picks = np.linspace(0, examples.num_examples - 1, min(samples, examples.num_examples))
        sides = [min(_header_shape(examples.files[int(i)])) for i in picks]
    else:
        return None  # encoded or streamed: their size is the dataset's (TFDS documents it)
    side = float(np.median(sides))
    factor = image_size / side
    if 1 / FAR_FACTOR <= factor <= FAR_FACTOR:
        return None
    if factor > 1:
        how = f"upsamples them {factor:.0f}x (compute grows with the square)"
    else:
        how = f"shrinks them {1 / factor:.0f}x (their detail is lost)"
    return (
        f"the training images are about {side:.0f} px on their short side; "
        f"--image_size={image_size} {how}; consider --image_size closer to {side:.0f} "
        "(224 for ImageNet weights), unless this is deliberate"
    )


def decode_if_fits(examples: Examples, fixed_shape: bool | None, budget: int) -> Examples:
    """Decodes files/encoded bytes once into a uint8 array when all images share a size
    and take at most `budget` bytes; otherwise returns `examples` unchanged (decoded in the
    pipeline).

    Files: the headers of `HEADER_SAMPLE` files spread over the split are read first, and
    the rest only when those share a size that fits. Encoded bytes: `fixed_shape` True
    (TFDS says so) decodes the first to learn the size, None reads every header, False
    keeps them encoded.
    """
    if examples.images is not None or examples.streamed or examples.num_examples == 0:
        return examples
    n = examples.num_examples
    if examples.files is not None:
        picks = np.unique(np.linspace(0, n - 1, min(HEADER_SAMPLE, n)).astype(np.int64))
        sample = set(_header_shapes(examples.files[picks], examples.max_pixels))
        h, w = next(iter(sample))
        if len(sample) > 1 or n * h * w * 3 > budget:
            return examples  # without reading every header
        shapes = set(_header_shapes(examples.files, examples.max_pixels))
        uniform = len(shapes) == 1
    elif fixed_shape is None:
        shapes = set(_encoded_shapes(examples))
        uniform, (h, w) = len(shapes) == 1, next(iter(shapes))
    else:
        if not fixed_shape:
            return examples
        first = _decode_array(examples.encoded[:1], max_pixels=examples.max_pixels)
        uniform, (h, w) = True, first.shape[1:3]
    if not uniform or n * h * w * 3 > budget:
        return examples
    images = _decode_array(
        examples.files if examples.files is not None else examples.encoded,
        is_file=examples.files is not None,
        shape=(h, w),
        max_pixels=examples.max_pixels,
    )
    return Examples(
        examples.labels, images=images, origin=examples.origin, max_pixels=examples.max_pixels
    )


def _encoded_shapes(examples: Examples) -> list[tuple[int, int]]:
    """(h, w) of every encoded image from its header; names one that is not an image or is
    over the pixel limit."""
    ds = tf.data.Dataset.from_tensor_slices(list(examples.encoded)).map(
        image_header.header_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    sizes = np.concatenate(list(ds.batch(4096).as_numpy_iterator()))
    unknown = np.flatnonzero(sizes[:, 0] < 0)
    if unknown.size:
        raise DataError(
            f"{examples.origin}: encoded image #{unknown[0]} is {image_header.UNKNOWN_FORMAT}; "
            "convert the data again"
        )
    for i, (h, w) in enumerate(sizes):
        message = too_large(int(w), int(h), examples.max_pixels)
        if message:
            raise DataError(f"{examples.origin}: encoded image #{i}: {message}")
    return [(int(h), int(w)) for h, w in sizes]


def decode_image(data: tf.Tensor, max_pixels: int = MAX_PIXELS, where: Sequence = ()) -> tf.Tensor:
    """Encoded JPEG/PNG (bytes tensor) -> uint8 [h, w, 3]; grayscale and RGBA become RGB.

    Images over `max_pixels` are refused from their header (`export.image_header.decode_image`;
    `where` goes before the refusal).
    """
    return image_header.decode_image(data, max_pixels, where)


def _decode_array(
    sources: np.ndarray,
    is_file: bool = False,
    shape: tuple[int, int] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decodes all `sources` (paths or bytes) in parallel with tf.data into uint8 [n, h, w, 3].

    A file that fails to decode (or has another size) is named in the DataError.
    """
    n, chunk = len(sources), 1024
    ds = tf.data.Dataset.from_tensor_slices(list(sources))
    if is_file:
        ds = ds.map(tf.io.read_file, num_parallel_calls=IO_THREADS, deterministic=True)
    ds = ds.map(
        lambda data: decode_image(data, max_pixels),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
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
            check_decodes(sources[i] if is_file else None, sources[i], out, i, max_pixels)
        raise DataError(f"images of {sources[0]}... could not be decoded: {first_line(e)}") from e
    if shape is not None and out.shape[1:3] != tuple(shape):
        raise DataError(f"decoded images are {out.shape[1:3]}, expected {shape}")
    return out


def check_decodes(
    path: str | None, source, out: np.ndarray | None, i: int, max_pixels: int
) -> None:
    """Raises a DataError naming image `i` if it does not decode to the batch's size."""
    what = path if path is not None else f"encoded image #{i}"
    try:
        data = tf.io.read_file(path) if path is not None else source
        image = decode_image(data, max_pixels).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise DataError(
            f"{what} could not be decoded as a JPEG/PNG image ({first_line(e)}); "
            "replace or delete it"
        ) from e
    if out is not None and image.shape != out.shape[1:]:
        raise DataError(
            f"{what} is {image.shape[0]}x{image.shape[1]}, unlike the others "
            f"({out.shape[1]}x{out.shape[2]})"
        )
