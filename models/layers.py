"""Layers the ResNet builders use beyond stock Keras: same configs, weights and names.

Both exist for training speed on CPUs (docs/design.md, The network; `make bench`) and
compute exactly what the stock layer computes; checkpoints and ImageNet weights are
interchangeable.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="resnet")
class MatmulConv2D(keras.layers.Conv2D):
    """A `Conv2D` computed as one matrix product wherever that is the same arithmetic.

    Why: oneDNN runs a 1x1 convolution on a small feature map as many small products (one
    per image row), 5-10x below the CPU's matmul rate; at 32x32 input with the ImageNet stem,
    ResNet-50's conv4/conv5 stages work on 2x2 and 1x1 maps, so most of the step is spent
    there (`python -m bench.bench_train --cases=ours-imagenet-f32,ours-imagenet-f32+mm`).
    Same config, kernel shape and weight names as `Conv2D`, so checkpoints and ImageNet
    weights are interchangeable. Exact cases: 1x1 kernels at any stride; a "valid"
    convolution with a 1x1 output (one patch); a stride-1 "same" convolution on a 1x1 input
    (only the centre tap meets data). Anything else is the ordinary convolution.
    """

    def convolution_op(self, inputs, kernel):
        if (
            self.data_format != "channels_last"
            or tuple(self.dilation_rate) != (1, 1)
            or self.groups != 1
        ):
            return super().convolution_op(inputs, kernel)
        kh, kw = self.kernel_size
        sh, sw = self.strides
        _, h, w, channels = inputs.shape
        if (kh, kw) == (1, 1):
            x = inputs if (sh, sw) == (1, 1) else inputs[:, ::sh, ::sw, :]
            shape = ops.shape(x)
            y = ops.matmul(ops.reshape(x, (-1, channels)), ops.reshape(kernel, (channels, -1)))
            return ops.reshape(y, (shape[0], shape[1], shape[2], self.filters))
        if h is None or w is None:
            return super().convolution_op(inputs, kernel)
        if self.padding == "valid" and kh <= h < kh + sh and kw <= w < kw + sw:
            patch = ops.reshape(inputs[:, :kh, :kw, :], (-1, kh * kw * channels))
            y = ops.matmul(patch, ops.reshape(kernel, (kh * kw * channels, self.filters)))
            return ops.reshape(y, (-1, 1, 1, self.filters))
        if self.padding == "same" and (h, w, sh, sw) == (1, 1, 1, 1):
            y = ops.matmul(ops.reshape(inputs, (-1, channels)), kernel[kh // 2, kw // 2])
            return ops.reshape(y, (-1, 1, 1, self.filters))
        return super().convolution_op(inputs, kernel)


@keras.saving.register_keras_serializable(package="resnet")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """A `BatchNormalization` whose training step is TensorFlow's fused kernel.

    Why: Keras 3's batch norm on TensorFlow is not fused: in training it casts to float32,
    takes `moments` and normalises, and autodiff makes a dozen element-wise ops of each layer;
    on a 2-core CPU they take 40% (float32) to 70% (bfloat16) of a ResNet-50 step, more than
    the convolutions. `FusedBatchNormV3` (oneDNN; bfloat16 too) does the forward pass in one
    kernel and the backward pass in another, as tf.keras 2 did with `fused=True`
    (`python -m bench.bench_train --cases=ours-imagenet-bf16+mm,ours-imagenet-bf16+mm+fbn`).

    Only the training call of 4-D channels-last input on the TensorFlow backend, without
    mask, renorm or synchronisation, takes that path; anything else, inference included, is
    the stock layer's code. Same arithmetic: normalised with the biased batch variance, whose
    moving average is kept, as Keras keeps it (the kernel returns the unbiased one).
    """

    def _fusable(self, inputs, training, mask) -> bool:
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
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # this backend only: `models` imports no TensorFlow

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
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)  # unbiased -> biased
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
        return tf.cast(outputs, self.compute_dtype)
