"""The serving computation every exported format shares: pixels in, probabilities out.

Resizing to the model's input is `models.preprocessing.resize`, the one resize that training,
prediction and the exported graphs share; decoding is `export.image_header.decode_image`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

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
