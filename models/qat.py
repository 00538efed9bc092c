"""Quantization-aware fine-tuning for full-int8 LiteRT: a twin that rounds as int8 rounds.

Full-int8 LiteRT stores every activation tensor in 256 levels over the range calibration
measured (one scale per tensor) and every kernel in 255 levels per output channel, so a
network whose features are narrow with rare large values changes its top-1 on some images.
`quantized_twin` builds the same network with its input, kernels and every stored activation
rounded that way (`Int8Kernel`, `ActivationFakeQuant`: ranges tracked as moving min/max) and
*shares every weight with the float model*; `agreement_model` runs both on the same batch, and
`AgreementLoss` trains the float model on the labels while pulling the twin's probabilities
onto the float model's. What is saved and exported stays the plain float model: only its
weights move, towards ones whose int8 rounding keeps its decisions (`app.train --qat`).

Not simulated: the rounding of `x - mean` inside the normalisation (LiteRT stores it too, in
steps of about one pixel level), the int32 biases, and the softmax's 1/256 output steps.

Example:

    from models import qat
    twin = qat.quantized_twin(model)            # shares model's weights
    joint = qat.agreement_model(model, twin)    # [batch, 2, classes]: float, int8-rounded
    joint.compile(optimizer, loss=qat.AgreementLoss(), metrics=qat.agreement_metrics())
"""

from __future__ import annotations

import keras
from keras import layers, ops

# Layers int8 LiteRT runs in the scale of their input: no rounding of their own.
_SAME_SCALE = (
    layers.ZeroPadding2D,
    layers.MaxPooling2D,
    layers.Dropout,
    layers.Reshape,
    layers.Flatten,
)


@keras.saving.register_keras_serializable(package="resnet")
class ActivationFakeQuant(keras.layers.Layer):
    """Rounds a tensor to 256 levels over its running [min, max], as full-int8 LiteRT does.

    The range is a moving average of each training batch's min and max (the first batch sets
    it), widened to hold 0 as the converter does; inference uses the stored range. Rounding
    is TensorFlow's `fake_quant_with_min_max_vars` (via `keras.quantizers`): zero-point
    nudging as the converter's, gradient passed straight through inside the range.

    Args:
        momentum: weight of the old range in each moving-average update.
    """

    def __init__(self, momentum: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        self.momentum = momentum

    def build(self, input_shape):
        def scalar(name):
            return self.add_weight(name=name, shape=(), initializer="zeros", trainable=False)

        self.range_min = scalar("range_min")
        self.range_max = scalar("range_max")
        self.seen = scalar("seen")  # 0 until the first training batch sets the range

    def call(self, inputs, training=False):
        x = ops.cast(inputs, "float32")
        if training:
            batch_min = ops.minimum(ops.min(ops.stop_gradient(x)), 0.0)
            batch_max = ops.maximum(ops.max(ops.stop_gradient(x)), 0.0)
            keep = self.momentum * self.seen
            self.range_min.assign(keep * self.range_min + (1.0 - keep) * batch_min)
            self.range_max.assign(keep * self.range_max + (1.0 - keep) * batch_max)
            self.seen.assign(1.0)
        rounded = keras.quantizers.fake_quant_with_min_max_vars(
            x, self.range_min, self.range_max, num_bits=8
        )
        return ops.cast(rounded, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}


class Int8Kernel(keras.layers.Layer):
    """Runs a convolution or dense layer with its kernel rounded as the int8 converter rounds it.

    Per output channel, symmetric, 127 steps each side (the converter folds the batch norm
    in first, which scales each output channel: the same rounding). Wraps `layer` and uses its
    variables, so the float model and the twin train the same kernel; the gradient passes
    straight through the rounding.
    """

    def __init__(self, layer: keras.Layer, **kwargs):
        super().__init__(name=f"{layer.name}_int8", **kwargs)
        self.layer = layer

    def call(self, inputs):
        kernel = ops.cast(self.layer.kernel, "float32")
        axes = tuple(range(len(kernel.shape) - 1))
        scale = ops.max(ops.abs(kernel), axis=axes, keepdims=True) / 127.0
        scale = ops.where(scale > 0, scale, 1.0)
        rounded = ops.clip(ops.round(kernel / scale), -127.0, 127.0) * scale
        kernel = kernel + ops.stop_gradient(rounded - kernel)
        x = ops.cast(inputs, "float32")
        if isinstance(self.layer, layers.Dense):
            outputs = ops.matmul(x, kernel)
        else:
            outputs = self.layer.convolution_op(x, kernel)
        if self.layer.use_bias:
            outputs = outputs + ops.cast(self.layer.bias, "float32")
        return self.layer.activation(outputs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def _is_relu(layer: keras.Layer) -> bool:
    if isinstance(layer, layers.ReLU):
        return True
    activation = getattr(layer, "activation", None)
    return isinstance(layer, layers.Activation) and activation is keras.activations.relu


def _consumers(model: keras.Model) -> dict[str, list[keras.Layer]]:
    """For each layer name, the layers that take its output.

    (Keras 3 has no public API for a functional model's edges: `_inbound_nodes` and
    `_keras_history` are private, stable in the pinned 3.15, and the twin test fails if not.)
    """
    consumers = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                producer = tensor._keras_history.operation
                if producer.name in consumers and layer not in consumers[producer.name]:
                    consumers[producer.name].append(layer)
    return consumers


def quantized_outputs(model: keras.Model) -> list[str]:
    """Names of the layers whose output full-int8 LiteRT stores in a scale of its own.

    Not rounded: the input layer (`quantized_twin` rounds the input), layers that keep their
    input's scale (padding, max-pooling), convolutions and dense layers feeding only a batch
    norm (folded into them), and any layer feeding only ReLUs (fused: the ReLU's output is
    the one stored).
    """
    consumers = _consumers(model)
    names = []
    for layer in model.layers:
        if isinstance(layer, (layers.InputLayer, *_SAME_SCALE)):
            continue
        after = consumers[layer.name]
        folded = all(isinstance(c, layers.BatchNormalization) for c in after)
        if after and folded and isinstance(layer, (layers.Conv2D, layers.Dense)):
            continue
        if after and all(_is_relu(c) for c in after):
            continue
        names.append(layer.name)
    return names


def quantized_twin(model: keras.Model) -> keras.Model:
    """`model` with its input, kernels and every stored activation rounded to int8.

    The twin calls `model`'s own layers and variables, so training either trains both. Its
    rounding layers are named `<layer>_fq` (`input_fq` for the input) and `<layer>_int8`.
    """
    rounded = {name: ActivationFakeQuant(name=f"{name}_fq") for name in quantized_outputs(model)}

    def call(layer, *args, **kwargs):
        if isinstance(layer, (layers.Conv2D, layers.Dense)) and not kwargs:
            outputs = Int8Kernel(layer)(*args)
        else:
            outputs = layer(*args, **kwargs)
        return rounded[layer.name](outputs) if layer.name in rounded else outputs

    body = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    inputs = keras.Input(shape=model.input_shape[1:], name="images")
    outputs = body(ActivationFakeQuant(name="input_fq")(inputs))
    return keras.Model(inputs, outputs, name=f"{model.name}_int8")


def agreement_model(model: keras.Model, twin: keras.Model) -> keras.Model:
    """Logits of the float model and of its int8-rounded twin, stacked: [batch, 2, classes]."""
    inputs = keras.Input(shape=model.input_shape[1:], name="images")
    stacked = ops.stack([model(inputs), twin(inputs)], axis=1)
    return keras.Model(inputs, stacked, name="float_and_int8")


@keras.saving.register_keras_serializable(package="resnet")
class AgreementLoss(keras.losses.Loss):
    """Cross-entropy of the float logits + `weight` x KL(float probabilities || int8 ones).

    The float probabilities are the target of the KL term, not trained by it: the labels
    keep the float model accurate, the KL term makes its decisions survive int8 rounding.

    Args:
        weight: of the KL term.
        label_smoothing: of the cross-entropy.
    """

    def __init__(
        self, weight: float = 1.0, label_smoothing: float = 0.0, name: str = "agreement", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.weight = weight
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        float_logits = ops.cast(y_pred[:, 0], "float32")
        int8_logits = ops.cast(y_pred[:, 1], "float32")
        labels = ops.one_hot(
            ops.cast(ops.reshape(y_true, (-1,)), "int32"), ops.shape(float_logits)[-1]
        )
        cross_entropy = keras.losses.categorical_crossentropy(
            labels, float_logits, from_logits=True, label_smoothing=self.label_smoothing
        )
        target = ops.stop_gradient(ops.log_softmax(float_logits, axis=-1))
        kl = ops.sum(ops.exp(target) * (target - ops.log_softmax(int8_logits, axis=-1)), axis=-1)
        return cross_entropy + self.weight * kl

    def get_config(self):
        return {
            **super().get_config(),
            "weight": self.weight,
            "label_smoothing": self.label_smoothing,
        }


def _float_accuracy(y_true, y_pred):
    return _hits(y_true, y_pred[:, 0])


def _int8_accuracy(y_true, y_pred):
    return _hits(y_true, y_pred[:, 1])


def _top1_agreement(y_true, y_pred):
    del y_true
    return ops.cast(ops.argmax(y_pred[:, 0], -1) == ops.argmax(y_pred[:, 1], -1), "float32")


def _hits(y_true, logits):
    labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    return ops.cast(ops.argmax(logits, -1) == labels, "float32")


def agreement_metrics() -> list[keras.metrics.Metric]:
    """`accuracy` (float model), `int8_accuracy`, `agreement` (same top-1) for `agreement_model`."""
    return [
        keras.metrics.MeanMetricWrapper(_float_accuracy, name="accuracy"),
        keras.metrics.MeanMetricWrapper(_int8_accuracy, name="int8_accuracy"),
        keras.metrics.MeanMetricWrapper(_top1_agreement, name="agreement"),
    ]
