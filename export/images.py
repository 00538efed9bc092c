"""Real images for int8 calibration and for the agreement report, read with `app.data`.

Any dataset `app.data.load` reads will do (image folder, CIFAR python batches, TFDS).
Calibration images come from the train split; agreement images from the test split, or
else the validation split (held out of train with the training run's seed and fraction,
so the model has not seen them). Both are stratified samples.

Images are resized exactly as an app prepares input for a `.tflite` model (bilinear
`tf.image.resize` to the model's size, rounded back to uint8), so calibration sees what the
phone will feed and every format is compared on the same pixels.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf

from app import data

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sample:
    """uint8 images [n, S, S, 3], labels [n] (None when not the model's classes), origin."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str


def to_model_input(images: np.ndarray | list[np.ndarray], image_size: int) -> np.ndarray:
    """uint8 RGB images of any size -> uint8 [n, S, S, 3], resized bilinearly like app input."""
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)
    for i, image in enumerate(images):
        if image.shape[:2] == (image_size, image_size):
            out[i] = image
            continue
        resized = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size))
        out[i] = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8).numpy()
    return out


def calibration_and_evaluation(
    config: data.DataConfig,
    class_names: list[str],
    image_size: int,
    num_calibration: int,
    num_evaluation: int,
) -> tuple[Sample, Sample | None]:
    """(calibration sample from train, evaluation sample from test/validation or None).

    Raises:
        app.data.DataError: the data cannot be read.
    """
    splits = data.load(
        dataclasses.replace(config, train_limit=num_calibration, eval_limit=max(num_evaluation, 1))
    )
    same_classes = list(splits.class_names) == list(class_names)
    if not same_classes:
        log.warning(
            "the data's classes (%s) are not the model's (%s): accuracy is not reported",
            ", ".join(splits.class_names),
            ", ".join(class_names),
        )
    train_images, _ = data.sample_images(splits.train, num_calibration, config.seed)
    calibration = Sample(
        to_model_input(train_images, image_size), None, splits.train.origin or "train"
    )
    if num_evaluation == 0:
        return calibration, None
    held_out = splits.test if splits.test is not None else splits.validation
    images, labels = data.sample_images(held_out, num_evaluation, config.seed)
    if splits.test is not None:
        split = "test split"
    else:
        split = "validation split" + (" held out of train" if splits.validation_held_out else "")
    source = f"{held_out.origin or config.data_dir} ({split})"
    evaluation = Sample(
        to_model_input(images, image_size), labels if same_classes else None, source
    )
    return calibration, evaluation
