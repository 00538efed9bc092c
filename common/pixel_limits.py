"""Image limits shared by every place that decodes images (no TensorFlow here).

A compressed image can declare far more pixels than its file size suggests (a 1 MB PNG of
20000x20000 zeros decodes to 1.2 GB): decoders read the size from the header and refuse an
image over `MAX_PIXELS` before allocating it (`export.image_header.decode_image`).
"""

from __future__ import annotations

# 40 megapixels: above any camera photo in common use (a 45 MP full-frame camera aside),
# about 120 MB decoded as uint8 RGB. `--max_pixels` changes it.
MAX_PIXELS = 40_000_000
# The one wording of the refusal; TensorFlow graphs format it with tf.strings.format.
TOO_LARGE = "image of {}x{} pixels is over the limit of {} pixels (--max_pixels)"


def too_large(width: int, height: int, limit: int) -> str | None:
    """The refusal message when a `width` x `height` image is over `limit` pixels, else None."""
    if width * height > limit:
        return TOO_LARGE.format(width, height, limit)
    return None
