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

The layer itself now lives in `models/layers.py` and every `models.resnet` network uses it;
`convert` applies it to other models (keras.applications) for comparison.
"""

from __future__ import annotations

import keras

from models.layers import MatmulConv2D


def convert(model: keras.Model) -> keras.Model:
    """A copy of `model` with every plain `Conv2D` replaced by `MatmulConv2D` (new weights).

    Build it under the dtype policy the copy should have; copy weights with `set_weights`.
    """

    def clone(layer):
        if type(layer) is keras.layers.Conv2D:
            return MatmulConv2D.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)
