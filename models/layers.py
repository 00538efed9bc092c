"""Layers the ResNet builders use beyond stock Keras."""

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
