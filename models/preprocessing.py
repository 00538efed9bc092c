"""Input normalisation that travels with a model (saved as `preprocessing.json`).

The data pipeline, evaluation, prediction and export all resize (`resize`) and normalise
through the same `Preprocessing`, so training and serving never disagree. Pixel values are
float 0..255 RGB in; the arithmetic works on NumPy arrays and TensorFlow/JAX tensors alike.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

from common import files
from common.errors import UsageError, first_line

# The reference tutorial's CIFAR-10 statistics, in 0..1 units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# Keras Applications ResNet ("caffe"): BGR, ImageNet mean subtracted, no scaling.
IMAGENET_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

FILENAME = "preprocessing.json"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How 0..255 RGB pixels become model input: (pixels[order] - mean) / std.

    Attributes:
        image_size: square input size the model was trained at.
        mean: per-channel mean in 0..255 units, in `channel_order`.
        std: per-channel std in 0..255 units, in `channel_order`.
        channel_order: "rgb", or "bgr" for Keras Applications ImageNet weights.
        name: "cifar" or "imagenet" (for people; the numbers are what count).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: Literal["rgb", "bgr"] = "rgb"
    name: str = "custom"

    def __call__(self, pixels):
        """Normalises float 0..255 RGB pixels (..., 3)."""
        if self.channel_order == "bgr":
            pixels = pixels[..., ::-1]
        return (pixels - list(self.mean)) / list(self.std)

    def invert(self, images):
        """Back to float 0..255 RGB pixels (for pictures of training samples)."""
        pixels = images * list(self.std) + list(self.mean)
        if self.channel_order == "bgr":
            pixels = pixels[..., ::-1]
        return pixels

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def save(self, directory: str) -> str:
        """Writes `directory/preprocessing.json` atomically; returns its path."""
        path = files.join(directory, FILENAME)
        files.write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, directory: str) -> Preprocessing:
        """Reads `directory/preprocessing.json` (next to a model file).

        Raises:
            UsageError: the file is missing, not JSON, or not a preprocessing of ours.
        """
        path = files.join(directory, FILENAME)
        try:
            raw = json.loads(files.read_text(path))
            raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
            return cls(**raw)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UsageError(
                f"{path} cannot be read ({type(e).__name__}: {first_line(e)}); keep the "
                "preprocessing.json that app.train writes next to the model"
            ) from e


def resize(pixels, image_size: int):
    """Pixels `[..., h, w, 3]` (any dtype) to float32 `[..., S, S, 3]`, S = `image_size`.

    The one resize of the project: training, evaluation, prediction and every exported
    graph call it, so they all see the same pixels. Bilinear without antialiasing
    (`tf.image.resize`'s default on the TensorFlow backend), and exact when the size
    already matches: images of the model's size go through unchanged.
    """
    import keras

    pixels = keras.ops.cast(pixels, "float32")
    if tuple(pixels.shape[-3:-1]) == (image_size, image_size):
        return pixels
    return keras.ops.image.resize(
        pixels, (image_size, image_size), interpolation="bilinear", antialias=False
    )


def cifar(image_size: int = 32) -> Preprocessing:
    """The reference tutorial's CIFAR-10 mean/std normalisation."""
    return Preprocessing(
        image_size=image_size,
        mean=tuple(255.0 * m for m in CIFAR10_MEAN),
        std=tuple(255.0 * s for s in CIFAR10_STD),
        name="cifar",
    )


def imagenet(image_size: int = 224) -> Preprocessing:
    """What the Keras Applications ResNet ImageNet weights were trained with."""
    return Preprocessing(
        image_size=image_size,
        mean=IMAGENET_CAFFE_MEAN_BGR,
        std=(1.0, 1.0, 1.0),
        channel_order="bgr",
        name="imagenet",
    )


def by_name(name: str, image_size: int) -> Preprocessing:
    """`cifar` or `imagenet` by name."""
    factories = {"cifar": cifar, "imagenet": imagenet}
    if name not in factories:
        raise ValueError(f"unknown normalization {name!r}; choose one of {', '.join(factories)}")
    return factories[name](image_size)
