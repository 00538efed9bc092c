"""The same network with stock Keras layers or with the fast ones of `models.layers`.

`models.resnet` builds with `MatmulConv2D` and `FusedBatchNormalization`; the benchmarks
measure each with and without them (`+mm`, `+fbn` in a `bench.bench_train` case name), and
keras.applications.ResNet50 with them too, so the comparison is layer for layer.
"""

from __future__ import annotations

import keras

from models.layers import FusedBatchNormalization, MatmulConv2D


def convert(model: keras.Model, matmul_convs: bool, fused_bn: bool) -> keras.Model:
    """A copy of `model` (new weights) whose every `Conv2D` and `BatchNormalization` is of the
    kind asked for: `MatmulConv2D` or stock `Conv2D`, `FusedBatchNormalization` or stock.

    Build it under the dtype policy the copy should have; copy weights with `set_weights`.
    """
    conv = MatmulConv2D if matmul_convs else keras.layers.Conv2D
    norm = FusedBatchNormalization if fused_bn else keras.layers.BatchNormalization

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Conv2D):
            return conv.from_config(config)
        if isinstance(layer, keras.layers.BatchNormalization):
            return norm.from_config(config)
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone, recursive=True)
