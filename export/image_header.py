"""Encoded images: their size read from the header, and the one decoder that checks it first.

`decode_image` is what image folders, TFDS bytes, `app.predict` and the SavedModel's
`serving_bytes` signature decode with: the size comes from the header (`header_size`), so
an image over the pixel limit (a decompression bomb: a small file declaring a huge image)
is refused before anything is allocated. Graph code throughout (it runs inside `tf.data`
and the serving graph); eager calls go through one `tf.function`.

Example:

    from export import image_header
    height, width = image_header.header_size(open("cat.jpg", "rb").read()).numpy()
    pixels = image_header.decode_image(open("cat.jpg", "rb").read(), max_pixels=40_000_000)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from common.pixel_limits import MAX_PIXELS, TOO_LARGE, too_large

# The header bytes that hold the size of a PNG, GIF, BMP or WebP image.
_HEADER = 32
UNKNOWN_FORMAT = "not a JPEG, PNG, GIF, BMP or WebP image (unknown header)"
GIF_TOO_LARGE = (
    "GIF frames of {} pixels in all (-1: too many blocks to count) are over the limit of "
    "{} pixels (--max_pixels)"
)


# Every header field read, as (offset, bytes, big-endian), in the order `_inspect_header`
# unpacks them.
_FIELDS = (
    (16, 4, True), (20, 4, True),  # PNG IHDR width, height
    (6, 2, False), (8, 2, False),  # GIF screen width, height
    (18, 4, False), (22, 4, False),  # BMP width, height (signed: negative is top-down)
    (26, 2, False), (28, 2, False),  # WebP lossy (VP8): 14-bit width, height
    (21, 4, False),  # WebP lossless (VP8L): 14-bit width - 1, height - 1
    (24, 3, False), (27, 3, False),  # WebP extended (VP8X): width - 1, height - 1
)  # fmt: skip
_FIELD_INDEX = np.array([[o + min(k, n - 1) for k in range(4)] for o, n, _ in _FIELDS], np.int32)
_FIELD_WEIGHT = np.array(
    [
        [256 ** ((n - 1 - k) if big else k) if k < n else 0 for k in range(4)]
        for _, n, big in _FIELDS
    ],
    np.int64,
)
# The magic bytes `tf.io.decode_image` tells formats by, over the first 16 header bytes
# (".": any byte), in the order of the candidates in `_inspect_header`.
_MAGIC = (b"\x89PN", b"GIF8", b"BM", b"RIFF....WEBPVP8 ", b"RIFF....WEBPVP8L", b"RIFF....WEBPVP8X")
_MAGIC_BYTES = np.array([list(m.ljust(16, b".")) for m in _MAGIC], np.int64)
_MAGIC_MASK = np.array([[c != ord(".") for c in m.ljust(16, b".")] for m in _MAGIC])


def _signed32(value: tf.Tensor) -> tf.Tensor:
    return tf.where(value >= 2**31, value - 2**32, value)


def _padded_header(encoded: tf.Tensor) -> tf.Tensor:
    """The first `_HEADER` bytes, zero-padded: a short (truncated) file still reads, its
    fields as zeros (`tf.strings.substr` past the end fails with the raw bytes in its error)."""
    return tf.strings.join([tf.strings.substr(encoded, 0, _HEADER), b"\0" * _HEADER])


def header_size(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) int64 [2] of an encoded image, read from its header without decoding.

    JPEG through `tf.io.extract_jpeg_shape` (which walks the markers to the frame header);
    PNG, BMP and WebP (lossy, lossless and extended) from the fixed header fields
    `tf.io.decode_image` itself trusts; GIF from its first frame (what the decoder returns,
    whatever the screen size in the header says). Formats are told apart by the magic bytes
    `tf.io.decode_image` uses; anything else (JPEG XL among them, whose size is bit-packed)
    is (-1, -1), which `decode_image` refuses.
    """
    return _inspect(encoded)[0]


def _inspect(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(`header_size`, pixels of all GIF frames together: 0 for other formats, -1 for a GIF
    of more than `MAX_GIF_BLOCKS` blocks). Eagerly through a tf.function: the GIF walk is a
    while loop, which would run op by op in Python."""
    if tf.executing_eagerly():
        return _inspect_graph(tf.convert_to_tensor(encoded, tf.string))
    # No tf.cond for the common case: in tf.data its branch functions cost more than the
    # decode of a small JPEG. extract_jpeg_shape refuses anything but a JPEG, so other
    # formats hand it a 1x1 JPEG header instead, and the JPEG's size wins only for JPEGs.
    is_jpeg = tf.equal(tf.strings.substr(_padded_header(encoded), 0, 3), b"\xff\xd8\xff")
    jpeg = tf.io.extract_jpeg_shape(tf.where(is_jpeg, encoded, _TINY_JPEG_HEADER))
    size, frames = _inspect_header(encoded)
    return tf.where(is_jpeg, tf.cast(jpeg[:2], tf.int64), size), frames


def _inspect_header(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`_inspect` of a PNG, GIF, BMP or WebP (or of anything else: (-1, -1)).

    Vectorised (one gather for every field, one comparison for every magic): in a tf.data
    map, each op costs microseconds, as much as decoding a small image.
    """
    padded = _padded_header(encoded)
    header = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, _HEADER), tf.uint8), tf.int64)
    png_w, png_h, gif_w, gif_h, bmp_w, bmp_h, vp8_w, vp8_h, vp8l, vp8x_w, vp8x_h = tf.unstack(
        tf.reduce_sum(tf.gather(header, _FIELD_INDEX) * _FIELD_WEIGHT, axis=1)
    )
    found = tf.reduce_all((header[:16] == _MAGIC_BYTES) | ~_MAGIC_MASK, axis=1)
    bits14 = 0x3FFF
    candidates = tf.stack(
        [  # (height, width) of each format, in `_MAGIC` order
            tf.stack([png_h, png_w]),
            tf.stack([gif_h, gif_w]),
            tf.abs(_signed32(tf.stack([bmp_h, bmp_w]))),
            tf.bitwise.bitwise_and(tf.stack([vp8_h, vp8_w]), bits14),
            tf.stack([tf.bitwise.right_shift(vp8l, 14), vp8l]) % (bits14 + 1) + 1,
            tf.stack([vp8x_h, vp8x_w]) + 1,
        ]
    )
    size = tf.where(
        tf.reduce_any(found),
        tf.gather(candidates, tf.argmax(tf.cast(found, tf.int32))),
        tf.constant([-1, -1], tf.int64),
    )
    # The GIF walk reads the whole file: only for GIFs.
    first, frames = tf.cond(
        found[1],
        lambda: gif_frames(encoded),
        lambda: (tf.zeros([2], tf.int64), tf.constant(0, tf.int64)),
    )
    return tf.where(frames != 0, first, size), frames


# SOI, a 1x1 baseline frame header and a scan header: all extract_jpeg_shape reads.
_TINY_JPEG_HEADER = (
    b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x01\x00\x01\x01\x01\x11\x00"
    b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00\xff\xd9"
)
_inspect_graph = tf.function(_inspect, input_signature=[tf.TensorSpec([], tf.string)])


def decode_image(
    encoded: tf.Tensor, max_pixels: int = MAX_PIXELS, where: Sequence = ()
) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP -> uint8 [h, w, 3], refusing images over `max_pixels`.

    The size is read from the header first, so an image over the limit (a decompression
    bomb: a small file declaring a huge image) is refused before anything is allocated, with
    an InvalidArgumentError (TF Serving: INVALID_ARGUMENT) that says how large it is.
    Grayscale and RGBA become RGB; an animated GIF gives its first frame. `where`: tensors
    and strings put before the refusal in a graph's Assert (which record of which file).
    """
    size, frames = _inspect(encoded)
    if tf.executing_eagerly():  # an eager Assert words its error differently
        height, width = (int(n) for n in size)
        message = UNKNOWN_FORMAT if height < 0 else too_large(width, height, max_pixels)
        if not message and (int(frames) < 0 or int(frames) > max_pixels):
            message = GIF_TOO_LARGE.format(int(frames), max_pixels)
        if message:
            raise tf.errors.InvalidArgumentError(None, None, message)
        return _decode_rgb(encoded)
    where = list(where)
    known = tf.debugging.Assert(size[0] >= 0, [*where, UNKNOWN_FORMAT])
    message = tf.strings.format(TOO_LARGE, (size[1], size[0], max_pixels))
    small = tf.debugging.Assert(size[0] * size[1] <= max_pixels, [*where, message])
    gif_message = tf.strings.format(GIF_TOO_LARGE, (frames, max_pixels))
    few_frames = tf.debugging.Assert((frames >= 0) & (frames <= max_pixels), [*where, gif_message])
    with tf.control_dependencies([known, small, few_frames]):
        return _decode_rgb(encoded)


def _decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    def rgb(channels: int) -> tf.Tensor:
        image = tf.io.decode_image(
            encoded, channels=channels, dtype=tf.uint8, expand_animations=False
        )
        return tf.ensure_shape(image[..., :3], [None, None, 3])

    # The WebP decoder cannot drop an alpha channel itself (channels=3 on RGBA WebP fails).
    is_webp = tf.equal(tf.strings.substr(_padded_header(encoded), 8, 4), b"WEBP")
    return tf.cond(is_webp, lambda: rgb(0), lambda: rgb(3))


# GIF blocks walked at most (about 15 us each): an encoder's 255-byte data sub-blocks make
# ~4,000 per MB, so this is a 25 MB GIF; a file of tiny sub-blocks (a way to make the walk
# slow) is refused past it.
MAX_GIF_BLOCKS = 100_000


def gif_frames(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """((height, width) of the first frame, pixels of all frames together) of a GIF.

    giflib reads every frame into memory (width x height bytes each) even when only the
    first is returned, and a frame may be larger than the GIF's declared screen: both are
    found only by walking the blocks to each image descriptor. The total is -1 when the
    walk stopped at `MAX_GIF_BLOCKS`.
    """
    data = tf.io.decode_raw(tf.strings.join([encoded, b"\0" * 16]), tf.uint8)
    length = tf.strings.length(encoded)
    sizes = tf.cast(data, tf.int32)

    def byte(i: tf.Tensor) -> tf.Tensor:  # past the end: the zero padding
        return sizes[tf.minimum(i, length)]

    def table(flags: tf.Tensor) -> tf.Tensor:  # a color table's bytes, from its flags byte
        has = tf.bitwise.bitwise_and(flags, 0x80) > 0
        return tf.where(has, 3 * tf.bitwise.left_shift(2, tf.bitwise.bitwise_and(flags, 7)), 0)

    def skip_sub_blocks(pos, blocks):  # to the byte after the zero-length terminator
        pos, blocks = tf.while_loop(
            lambda p, n: (byte(p) > 0) & (n < MAX_GIF_BLOCKS),
            lambda p, n: (p + 1 + byte(p), n + 1),
            (pos, blocks),
            maximum_iterations=MAX_GIF_BLOCKS,
        )
        return pos + 1, blocks

    def step(pos, first, total, blocks):
        b = byte(pos)
        is_image, is_extension = tf.equal(b, 0x2C), tf.equal(b, 0x21)
        size = tf.cast(
            tf.stack([byte(pos + 7) + 256 * byte(pos + 8), byte(pos + 5) + 256 * byte(pos + 6)]),
            tf.int64,
        )
        first = tf.where(is_image & tf.equal(total, 0), size, first)
        total += tf.where(is_image, size[0] * size[1], tf.constant(0, tf.int64))
        # An image: descriptor, color table, LZW code size; an extension: 0x21 and its label.
        data_start = tf.where(is_image, pos + 10 + table(byte(pos + 9)) + 1, pos + 2)
        end, blocks = skip_sub_blocks(data_start, blocks + 1)
        done = tf.logical_not(is_image | is_extension)  # the trailer, or junk
        return tf.where(done, length, end), first, total, blocks

    start = 13 + table(byte(tf.constant(10)))
    _, first, total, blocks = tf.while_loop(
        lambda pos, first, total, blocks: (pos < length) & (blocks < MAX_GIF_BLOCKS),
        step,
        (start, tf.zeros([2], tf.int64), tf.constant(0, tf.int64), 0),
        maximum_iterations=MAX_GIF_BLOCKS,
    )
    return first, tf.where(blocks >= MAX_GIF_BLOCKS, tf.constant(-1, tf.int64), total)
