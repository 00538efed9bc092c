"""Prototype: batch normalization through TensorFlow's fused kernel while training.

Why: Keras 3's `BatchNormalization` on the TensorFlow backend is not fused. In training it
casts to float32, computes the moments with `tf.nn.moments` and normalises with
`tf.nn.batch_normalization`, and autodiff turns that into a dozen element-wise ops per layer
(Mul, Sum, Mean, Tile, Sub, SquaredDifference, Cast, ...). On this 2-core CPU those take 40%
(float32) to 70% (bfloat16, CIFAR stem) of a ResNet-50 training step: more than the
convolutions. TensorFlow's `FusedBatchNormV3` (oneDNN on this CPU, bfloat16 included) does
the forward pass in one kernel and the backward pass in another, as tf.keras 2 did with
`fused=True`.

`FusedBatchNormalization` is a `keras.layers.BatchNormalization` (same config and weights)
whose training-mode call uses that kernel on the TensorFlow backend, for 4-D channels-last
input without mask, renorm or synchronisation; anything else, and inference, is the parent's
code. Same arithmetic: normalise with the biased batch variance, update the moving variance
with it too (the kernel returns the unbiased one; it is scaled back).

TensorFlow-only, hence a bench prototype: `models/` builds with `keras.layers` alone.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="resnet")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`BatchNormalization` whose training step is one fused TensorFlow kernel."""

    def _can_fuse(self, inputs, training, mask) -> bool:
        return (
            bool(training)
            and self.trainable
            and mask is None
            and keras.backend.backend() == "tensorflow"
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.center
            and self.scale
            and not self.renorm
            and not self.synchronized
        )

    def call(self, inputs, training=None, mask=None):
        if not self._can_fuse(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        empty = tf.constant([], tf.float32)
        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=tf.convert_to_tensor(self.gamma),
            offset=tf.convert_to_tensor(self.beta),
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
        # The kernel returns the unbiased variance; Keras averages the biased one.
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
        return tf.cast(outputs, self.compute_dtype)


def convert(model: keras.Model, batch_norm: bool = True, matmul_convs: bool = False):
    """A copy of `model` with fused batch norm and/or `MatmulConv2D` (new weights).

    Build it under the dtype policy the copy should have; copy weights with `set_weights`.
    """
    from bench.matmul_conv import MatmulConv2D

    def clone(layer):
        config = layer.get_config()
        if batch_norm and type(layer) is keras.layers.BatchNormalization:
            return FusedBatchNormalization.from_config(config)
        if matmul_convs and type(layer) is keras.layers.Conv2D:
            return MatmulConv2D.from_config(config)
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone)
