"""Image arrays as the exported models take them: uint8 RGB at the model's square size.

Images are resized exactly as an app prepares input for a `.tflite` model
(`models.preprocessing.resize`, bilinear, then rounded back to uint8), so int8 calibration
sees what the phone will feed and every format is compared on the same pixels. Reading the
images (a dataset's train and held-out splits) is the caller's job: see `app.export_lib`.

Example:

    from export import model_input
    pixels = model_input.to_model_input([photo_480x640, photo_32x32], image_size=32)
    calibration = model_input.Sample(pixels, labels=None, source="my photos")
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.preprocessing import resize

# Images resized per call: bounds the float32 copy of large photos.
_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Sample:
    """uint8 images [n, S, S, 3], labels [n] (None when not the model's classes), origin."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str


def _rounded(pixels) -> np.ndarray:
    return np.clip(np.round(np.asarray(pixels)), 0.0, 255.0).astype(np.uint8)


def to_model_input(images: np.ndarray | list[np.ndarray], image_size: int) -> np.ndarray:
    """uint8 RGB images of any size -> uint8 [n, S, S, 3], resized bilinearly like app input.

    Images already S x S are copied unchanged.
    """
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)
    if isinstance(images, np.ndarray) and images.ndim == 4:  # one size: a batch per call
        for start in range(0, len(images), _BATCH):
            batch = images[start : start + _BATCH]
            out[start : start + _BATCH] = _rounded(resize(batch, image_size))
        return out
    for i, image in enumerate(images):
        out[i] = _rounded(resize(image, image_size))
    return out
