"""Prototype: convolutions that are really matrix products, computed as one matmul.

Why: on this CPU, TensorFlow's oneDNN convolution handles a 1x1 convolution on a small feature
map as one small product per image row, re-reading the whole kernel each time. At 32x32 input
with the ImageNet stem, ResNet-50's conv4/conv5 stages run on 2x2 and 1x1 maps, and there a
1x1 convolution runs at ~10 GFLOP/s (float32) and ~5 GFLOP/s (bfloat16 backward) where the
same product as one `matmul` with batch*height*width rows runs at 100-250 GFLOP/s. Measured
with `python -m bench.bench_train --cases=ours-imagenet-f32,ours-imagenet-f32+mm`.

`MatmulConv2D` is a `keras.layers.Conv2D` (same config, same kernel shape and name, so weights
and checkpoints are interchangeable) whose convolution becomes `reshape -> matmul -> reshape`
wherever that is exactly the same arithmetic:
  - 1x1 kernels, any stride (a strided 1x1 convolution reads every s-th pixel);
  - a "valid" convolution whose output is 1x1 (one patch: flatten it);
  - a "same" stride-1 convolution on a 1x1 input (only the centre tap meets data).
Everything else goes to the ordinary convolution. Only `keras.ops`: any backend.

This lives in bench/ as a measured proposal; the place for it is `models/resnet.py`.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="resnet")
class MatmulConv2D(keras.layers.Conv2D):
    """`Conv2D` computed as one matmul where that is exact (see the module docstring)."""

    def convolution_op(self, inputs, kernel):
        plain = (
            self.data_format == "channels_last"
            and tuple(self.dilation_rate) == (1, 1)
            and self.groups == 1
        )
        if not plain:
            return super().convolution_op(inputs, kernel)
        kh, kw = self.kernel_size
        sh, sw = self.strides
        _, h, w, cin = inputs.shape
        if (kh, kw) == (1, 1):
            x = inputs if (sh, sw) == (1, 1) else inputs[:, ::sh, ::sw, :]
            shape = ops.shape(x)
            y = ops.matmul(ops.reshape(x, (-1, cin)), ops.reshape(kernel, (cin, self.filters)))
            return ops.reshape(y, (shape[0], shape[1], shape[2], self.filters))
        if h is None or w is None:
            return super().convolution_op(inputs, kernel)
        if self.padding == "valid" and h - kh < sh and w - kw < sw and h >= kh and w >= kw:
            patch = ops.reshape(inputs[:, :kh, :kw, :], (-1, kh * kw * cin))
            y = ops.matmul(patch, ops.reshape(kernel, (kh * kw * cin, self.filters)))
            return ops.reshape(y, (-1, 1, 1, self.filters))
        if self.padding == "same" and (h, w, sh, sw) == (1, 1, 1, 1):
            y = ops.matmul(ops.reshape(inputs, (-1, cin)), kernel[kh // 2, kw // 2])
            return ops.reshape(y, (-1, 1, 1, self.filters))
        return super().convolution_op(inputs, kernel)


def convert(model: keras.Model) -> keras.Model:
    """A copy of `model` with every plain `Conv2D` replaced by `MatmulConv2D` (new weights).

    Build it under the dtype policy the copy should have; copy weights with `set_weights`.
    """

    def clone(layer):
        if type(layer) is keras.layers.Conv2D:
            return MatmulConv2D.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)
