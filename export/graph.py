"""The serving computation every exported format shares: pixels in, probabilities out,
and the one image decoder (`decode_image`: the size read from the header and checked first).

Resizing to the model's input is `models.preprocessing.resize`, the one resize that training,
prediction and the exported graphs share.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from common.images import MAX_PIXELS, TOO_LARGE, too_large
from models.preprocessing import Preprocessing


def float32_model(model: keras.Model) -> keras.Model:
    """The model with every layer computing in float32 (itself when it already does).

    A model trained under `mixed_bfloat16`/`mixed_float16` keeps that policy when loaded;
    serving CPUs and the TFLite converter want float32 (TFLite makes its own float16 and
    int8 variants from it), so the layers are rebuilt in float32 with the same weights.
    """
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in model.layers):
        return model

    def clone(layer: keras.Layer) -> keras.Layer:
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    rebuilt = keras.models.clone_model(model, clone_function=clone)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def probabilities(model: keras.Model, preprocessing: Preprocessing, pixels: tf.Tensor) -> tf.Tensor:
    """Softmax of the model's logits on float32 0..255 RGB pixels already `image_size` square."""
    logits = model(preprocessing(pixels), training=False)
    return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)


# The header bytes that hold the size of a PNG, GIF, BMP or WebP image.
_HEADER = 32
UNKNOWN_FORMAT = "not a JPEG, PNG, GIF, BMP or WebP image (unknown header)"
GIF_TOO_LARGE = (
    "GIF frames of {} pixels in all (-1: too many blocks to count) are over the limit of "
    "{} pixels (--max_pixels)"
)


def _number(header: tf.Tensor, offset: int, size: int, little_endian: bool = True) -> tf.Tensor:
    """Unsigned `size`-byte integer at `offset` of the uint8 header, as int64."""
    value = tf.constant(0, tf.int64)
    for k in range(size):
        shift = 8 * k if little_endian else 8 * (size - 1 - k)
        value += tf.bitwise.left_shift(header[offset + k], shift)
    return value


def _signed32(value: tf.Tensor) -> tf.Tensor:
    return tf.where(value >= 2**31, value - 2**32, value)


def _padded_header(encoded: tf.Tensor) -> tf.Tensor:
    """The first `_HEADER` bytes, zero-padded: a short (truncated) file still reads, its
    fields as zeros (`tf.strings.substr` past the end fails with the raw bytes in its error)."""
    return tf.strings.join([tf.strings.substr(encoded, 0, _HEADER), b"\0" * _HEADER])


def image_size(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) int64 [2] of an encoded image, read from its header without decoding.

    JPEG through `tf.io.extract_jpeg_shape` (which walks the markers to the frame header);
    PNG, BMP and WebP (lossy, lossless and extended) from the fixed header fields
    `tf.io.decode_image` itself trusts; GIF from its first frame (what the decoder returns,
    whatever the screen size in the header says). Formats are told apart by the magic bytes
    `tf.io.decode_image` uses; anything else (JPEG XL among them, whose size is bit-packed)
    is (-1, -1), which `decode_image` refuses.
    """
    return _inspect(encoded)[0]


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])
def _inspect(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(`image_size`, pixels of all GIF frames together: 0 for other formats, -1 for a GIF
    of more than `MAX_GIF_BLOCKS` blocks). A tf.function: the GIF walk is a while loop."""
    padded = _padded_header(encoded)
    header = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, _HEADER), tf.uint8), tf.int64)

    def magic(offset: int, value: bytes) -> tf.Tensor:
        return tf.equal(tf.strings.substr(padded, offset, len(value)), value)

    vp8l = _number(header, 21, 4)
    webp_kind = tf.strings.substr(padded, 12, 4)
    candidates = [  # (is this format, height, width)
        (magic(0, b"\x89PN"), _number(header, 20, 4, False), _number(header, 16, 4, False)),
        (magic(0, b"GIF8"), _number(header, 8, 2), _number(header, 6, 2)),
        (
            magic(0, b"BM"),
            tf.abs(_signed32(_number(header, 22, 4))),
            tf.abs(_signed32(_number(header, 18, 4))),
        ),
        (
            magic(0, b"RIFF") & magic(8, b"WEBP") & tf.equal(webp_kind, b"VP8 "),
            tf.bitwise.bitwise_and(_number(header, 28, 2), 0x3FFF),
            tf.bitwise.bitwise_and(_number(header, 26, 2), 0x3FFF),
        ),
        (
            magic(0, b"RIFF") & magic(8, b"WEBP") & tf.equal(webp_kind, b"VP8L"),
            tf.bitwise.bitwise_and(tf.bitwise.right_shift(vp8l, 14), 0x3FFF) + 1,
            tf.bitwise.bitwise_and(vp8l, 0x3FFF) + 1,
        ),
        (
            magic(0, b"RIFF") & magic(8, b"WEBP") & tf.equal(webp_kind, b"VP8X"),
            _number(header, 27, 3) + 1,
            _number(header, 24, 3) + 1,
        ),
    ]
    size = tf.constant([-1, -1], tf.int64)
    for found, height, width in reversed(candidates):
        size = tf.where(found, tf.stack([height, width]), size)
    # JPEG and GIF only for themselves: extract_jpeg_shape refuses anything else, and the
    # GIF walk reads the whole file.
    size = tf.cond(
        magic(0, b"\xff\xd8\xff"),
        lambda: tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64),
        lambda: size,
    )
    first, frames = tf.cond(
        magic(0, b"GIF8"),
        lambda: gif_frames(encoded),
        lambda: (tf.zeros([2], tf.int64), tf.constant(0, tf.int64)),
    )
    return tf.where(frames != 0, first, size), frames


def decode_image(encoded: tf.Tensor, max_pixels: int = MAX_PIXELS) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP -> uint8 [h, w, 3], refusing images over `max_pixels`.

    The size is read from the header first, so an image over the limit (a decompression
    bomb: a small file declaring a huge image) is refused before anything is allocated, with
    an InvalidArgumentError (TF Serving: INVALID_ARGUMENT) that says how large it is.
    Grayscale and RGBA become RGB; an animated GIF gives its first frame.
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
    known = tf.debugging.Assert(size[0] >= 0, [UNKNOWN_FORMAT])
    message = tf.strings.format(TOO_LARGE, (size[1], size[0], max_pixels))
    small = tf.debugging.Assert(size[0] * size[1] <= max_pixels, [message])
    gif_message = tf.strings.format(GIF_TOO_LARGE, (frames, max_pixels))
    few_frames = tf.debugging.Assert((frames >= 0) & (frames <= max_pixels), [gif_message])
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
