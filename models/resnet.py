"""ResNet v1 family (18/34/50/101/152) in the Keras 3 functional API.

Built from small residual-block functions in the style of
`keras/src/applications/resnet.py`: every layer name is derived from a `name`
argument (`conv2_block1_1_conv`), so ImageNet weights and `get_layer` line up
with `keras.applications.ResNet50`. Only `keras.layers`/`keras.ops` are used,
so the network builds on any Keras 3 backend.

Example:

    from models import resnet
    model = resnet.resnet50(num_classes=10, input_shape=(32, 32, 3), stem="cifar")
    model.summary()
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Sequence
from typing import Literal

import keras
from keras import layers

from common import files
from models import weights as weights_lib
from models.layers import FusedBatchNormalization, MatmulConv2D

Stem = Literal["imagenet", "cifar", "cifar_pool"]
StrideOn = Literal["1x1", "3x3"]

# Same epsilon as keras.applications, so its ImageNet statistics fold in exactly.
BN_EPSILON = 1.001e-5
# PyTorch's default (its momentum 0.1): moving statistics settle within a few
# hundred steps, which short CIFAR runs need; Keras' 0.99 lags far behind.
BN_MOMENTUM = 0.9

# Names of the feature maps at the end of each stage, for stage-by-stage taps.
STAGE_NAMES = ("conv2", "conv3", "conv4", "conv5")
# The Dense logits layer: pretrained-weight loading and fine-tuning find the head by it.
HEAD = "predictions"


def conv_bn(
    x,
    filters: int,
    kernel_size: int,
    strides: int = 1,
    activation: bool = True,
    zero_gamma: bool = False,
    name: str = "conv",
):
    """Bias-free convolution, batch norm and optional ReLU.

    Stride-2 convolutions are padded symmetrically by `kernel_size // 2`, as
    torchvision does: TensorFlow's "same" pads only bottom/right for stride 2.

    Args:
        x: input tensor.
        filters: number of output channels.
        kernel_size: square kernel size.
        strides: convolution stride.
        activation: whether to append a ReLU named `{name}_relu`.
        zero_gamma: start the batch norm's scale at 0 (see `zero_init_last`).
        name: prefix; layers are `{name}_conv`, `{name}_bn`, `{name}_relu`.

    Returns:
        Output tensor.
    """
    padding = "same"
    if strides > 1 and kernel_size > 1:
        x = layers.ZeroPadding2D(padding=kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    x = MatmulConv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = FusedBatchNormalization(
        epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM,
        gamma_initializer="zeros" if zero_gamma else "ones",
        name=f"{name}_bn",
    )(x)
    if activation:
        x = layers.Activation("relu", name=f"{name}_relu")(x)
    return x


def _shortcut(x, filters: int, strides: int, name: str):
    """Identity, or a 1x1 conv + BN projection when shape or channels change."""
    if strides != 1 or x.shape[-1] != filters:
        return conv_bn(x, filters, 1, strides=strides, activation=False, name=f"{name}_0")
    return x


def basic_block(
    x,
    filters: int,
    strides: int = 1,
    zero_init_last: bool = True,
    name: str = "block",
):
    """Building block of ResNet-18/34: two 3x3 conv-BN; output has `filters` channels.

    Args:
        x: input tensor.
        filters: output channels of both convolutions.
        strides: stride of the first convolution and the shortcut.
        zero_init_last: see `resnet`.
        name: block prefix, e.g. `conv2_block1`.

    Returns:
        Output tensor, ReLU(F(x) + shortcut(x)).
    """
    shortcut = _shortcut(x, filters, strides, name)
    x = conv_bn(x, filters, 3, strides=strides, name=f"{name}_1")
    x = conv_bn(x, filters, 3, activation=False, zero_gamma=zero_init_last, name=f"{name}_2")
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def bottleneck_block(
    x,
    filters: int,
    strides: int = 1,
    stride_on: StrideOn = "3x3",
    zero_init_last: bool = True,
    name: str = "block",
):
    """Bottleneck of ResNet-50/101/152: 1x1 reduce, 3x3, 1x1 expand (x4).

    Args:
        x: input tensor.
        filters: channels of the 1x1 and 3x3 convolutions; output is 4x that.
        strides: stride of the block (shortcut included).
        stride_on: "3x3" puts the stride on the 3x3 conv (ResNet v1.5, the
            reference tutorial); "1x1" on the first 1x1 (the original paper,
            `keras.applications.ResNet50`).
        zero_init_last: see `resnet`.
        name: block prefix, e.g. `conv2_block1`.

    Returns:
        Output tensor, ReLU(F(x) + shortcut(x)).
    """
    if stride_on not in ("1x1", "3x3"):
        raise ValueError(f'stride_on must be "1x1" or "3x3", got {stride_on!r}')
    shortcut = _shortcut(x, 4 * filters, strides, name)
    stride_1x1, stride_3x3 = (strides, 1) if stride_on == "1x1" else (1, strides)
    x = conv_bn(x, filters, 1, strides=stride_1x1, name=f"{name}_1")
    x = conv_bn(x, filters, 3, strides=stride_3x3, name=f"{name}_2")
    x = conv_bn(x, 4 * filters, 1, activation=False, zero_gamma=zero_init_last, name=f"{name}_3")
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def make_layer(
    x,
    block: Callable,
    filters: int,
    blocks: int,
    strides: int,
    stride_on: StrideOn = "3x3",
    zero_init_last: bool = True,
    name: str = "conv2",
):
    """A stage of `blocks` residual blocks; only the first one strides.

    Args:
        x: input tensor.
        block: `basic_block` or `bottleneck_block`.
        filters: base channels of the stage.
        blocks: number of blocks.
        strides: stride of the first block.
        stride_on: see `bottleneck_block` (the basic block has no 1x1 to stride on).
        zero_init_last: see `resnet`.
        name: stage prefix; blocks are `{name}_block1` ... `{name}_block{blocks}`.

    Returns:
        Output tensor of the last block (`{name}_block{blocks}_out`).
    """
    options = {"stride_on": stride_on} if block is bottleneck_block else {}
    for i in range(1, blocks + 1):
        x = block(
            x,
            filters,
            strides=strides if i == 1 else 1,
            zero_init_last=zero_init_last,
            name=f"{name}_block{i}",
            **options,
        )
    return x


def build_stem(x, kind: Stem):
    """ImageNet stem (7x7/2 conv + 3x3/2 max-pool), CIFAR stem (3x3/1 conv) or both halves.

    `cifar_pool` is the CIFAR stem's 3x3/1 conv followed by the ImageNet stem's max-pool:
    at 32x32 it feeds 16x16 maps into conv2, between the ImageNet stem's 8x8 (cheap,
    coarse) and the CIFAR stem's 32x32 (16x the cost of 8x8). All pad symmetrically (3
    pixels for the 7x7 conv, 1 for the pool), as `keras.applications` and torchvision do.
    """
    if kind == "imagenet":
        x = conv_bn(x, 64, 7, strides=2, name="conv1")
    elif kind in ("cifar", "cifar_pool"):
        x = conv_bn(x, 64, 3, strides=1, name="conv1")
    else:
        raise ValueError(f'stem must be "imagenet", "cifar" or "cifar_pool", got {kind!r}')
    if kind == "cifar":
        return x
    x = layers.ZeroPadding2D(padding=1, name="pool1_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


def _keras_file_stride_on(path: str) -> str | None:
    """The stride placement of a `.keras` ResNet, read from its config.json."""
    try:
        with zipfile.ZipFile(io.BytesIO(files.read_bytes(path))) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None
    for layer in config.get("config", {}).get("layers", []):
        if layer.get("name") == "conv3_block1_1_conv":  # conv3's first block strides
            return "1x1" if tuple(layer["config"]["strides"]) == (2, 2) else "3x3"
    return None


def default_stride_on(weights: str | None) -> StrideOn:
    """The layout `weights` were trained with: "1x1" for Keras Applications' (ImageNet or
    a legacy `.h5` in their layout), a `.keras` ResNet's own, else "3x3" (ResNet v1.5)."""
    if weights == "imagenet":
        return "1x1"
    if weights and files.exists(weights):
        if weights.endswith(".keras"):
            return _keras_file_stride_on(weights) or "3x3"
        if weights_lib.is_legacy_h5(weights):
            return "1x1"
    return "3x3"


def resnet(
    block: Callable,
    blocks_per_stage: Sequence[int],
    num_classes: int = 1000,
    input_shape: tuple[int | None, int | None, int] = (224, 224, 3),
    stem: Stem = "imagenet",
    include_top: bool = True,
    weights: str | None = None,
    dropout: float = 0.0,
    stride_on: StrideOn | None = None,
    pooling: Literal["avg", "max"] | None = None,
    zero_init_last: bool = True,
    name: str = "resnet",
) -> keras.Model:
    """Builds a ResNet v1 with the functional API.

    Args:
        block: `basic_block` or `bottleneck_block`.
        blocks_per_stage: blocks in conv2_x .. conv5_x, e.g. (3, 4, 6, 3).
        num_classes: logits of the head.
        input_shape: (height, width, channels); height/width may be None.
        stem: "imagenet", "cifar" or "cifar_pool" (see `build_stem`).
        include_top: whether to add pooling + dropout + Dense logits head.
        weights: None, "imagenet" (Keras Applications weights, downloaded by
            Keras) or a path to a weights file (see `models.weights`).
        dropout: dropout rate before the head.
        stride_on: see `bottleneck_block`. None means "1x1" for Keras
            Applications weights (the layout they were trained with), else "3x3".
        pooling: without the top, optional global pooling of the last stage.
        zero_init_last: start the scale (gamma) of each block's last batch norm at 0, so
            every block starts as the identity (Goyal et al. 2017; timm's default,
            torchvision's `zero_init_residual`). Without it the residual sum grows with
            depth and a fresh ResNet-50's logits are large enough to give an initial loss
            of 4-5 on 10 classes. Loaded weights replace the initial values.
        name: model name.

    Returns:
        A `keras.Model` that returns float32 logits (or features without top).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if stride_on is None:
        stride_on = default_stride_on(weights)

    inputs = keras.Input(shape=input_shape, name="images")
    x = build_stem(inputs, stem)
    filters = 64
    for i, (stage, blocks) in enumerate(zip(STAGE_NAMES, blocks_per_stage, strict=True)):
        # conv2 keeps the stem's resolution: the stems already downsample (or not).
        strides = 1 if i == 0 else 2
        x = make_layer(x, block, filters, blocks, strides, stride_on, zero_init_last, name=stage)
        filters *= 2

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout > 0:
            x = layers.Dropout(dropout, name="top_dropout")(x)
        # float32 logits even under a mixed-precision policy, for a stable loss.
        x = layers.Dense(num_classes, dtype="float32", name=HEAD)(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)

    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        weights_lib.load_into(model, weights, arch=name, head=HEAD)
    return model


_ARCHS: dict[str, tuple[Callable, tuple[int, ...]]] = {
    "resnet18": (basic_block, (2, 2, 2, 2)),
    "resnet34": (basic_block, (3, 4, 6, 3)),
    "resnet50": (bottleneck_block, (3, 4, 6, 3)),
    "resnet101": (bottleneck_block, (3, 4, 23, 3)),
    "resnet152": (bottleneck_block, (3, 8, 36, 3)),
}
ARCHITECTURES = tuple(_ARCHS)


def build(arch: str, **options) -> keras.Model:
    """Builds a ResNet by name ("resnet18" ... "resnet152").

    Args:
        arch: one of `ARCHITECTURES`.
        **options: the keyword arguments of `resnet` (all but `block`, `blocks_per_stage`
            and `name`, which come from `arch`).
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown model {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    block, blocks_per_stage = _ARCHS[arch]
    return resnet(block, blocks_per_stage, name=arch, **options)


def resnet18(**kwargs) -> keras.Model:
    """ResNet-18 (basic blocks 2-2-2-2); keyword arguments as `build`."""
    return build("resnet18", **kwargs)


def resnet34(**kwargs) -> keras.Model:
    """ResNet-34 (basic blocks 3-4-6-3); keyword arguments as `build`."""
    return build("resnet34", **kwargs)


def resnet50(**kwargs) -> keras.Model:
    """ResNet-50 (bottlenecks 3-4-6-3); keyword arguments as `build`."""
    return build("resnet50", **kwargs)


def resnet101(**kwargs) -> keras.Model:
    """ResNet-101 (bottlenecks 3-4-23-3); keyword arguments as `build`."""
    return build("resnet101", **kwargs)


def resnet152(**kwargs) -> keras.Model:
    """ResNet-152 (bottlenecks 3-8-36-3); keyword arguments as `build`."""
    return build("resnet152", **kwargs)


def stage_outputs(model: keras.Model) -> dict[str, keras.KerasTensor]:
    """Symbolic outputs of the stem and each stage, keyed conv1, pool1, conv2..conv5."""
    names = {"conv1": "conv1_relu", "pool1": "pool1_pool"}
    for stage in STAGE_NAMES:
        last = max(
            int(layer.name.split("_block")[1].split("_")[0])
            for layer in model.layers
            if layer.name.startswith(f"{stage}_block")
        )
        names[stage] = f"{stage}_block{last}_out"
    return {
        key: model.get_layer(layer_name).output
        for key, layer_name in names.items()
        if layer_name in {layer.name for layer in model.layers}
    }
