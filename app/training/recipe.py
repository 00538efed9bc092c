"""The training recipe: the ResNet, its loss, learning-rate schedule and optimizer, compiled.

SGD with momentum and decoupled weight decay that skips batch-norm and bias parameters,
a cosine learning rate with linear warmup, sparse cross-entropy on logits with optional
label smoothing; fine-tuning freezes the backbone first, and quantization-aware
fine-tuning (`--qat`) trains the model together with its int8-rounded twin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import keras

from app.training import workarounds
from app.training.config import PRETRAINED_NONE, TrainConfig
from common.errors import UsageError, first_line
from models import qat, resnet

if TYPE_CHECKING:
    import tensorflow as tf


def build_model(config: TrainConfig, num_classes: int) -> keras.Model:
    """The ResNet of `config` (pretrained weights loaded, head fresh when they differ)."""
    model = resnet.build(
        config.model,
        num_classes=num_classes,
        input_shape=(config.image_size, config.image_size, 3),
        stem=config.stem,
        weights=None if config.pretrained == PRETRAINED_NONE else config.pretrained,
        dropout=config.dropout,
        stride_on=None if config.stride_on == "auto" else config.stride_on,
    )
    if config.synchronized_bn:
        # BatchNormalization reads `synchronized` at call time: with it, every replica
        # normalises with the statistics of the global batch (TF backend only).
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True
    return model


def fetch_imagenet_weights(arch: str, num_classes: int) -> None:
    """Downloads (once; Keras caches them) the Keras Applications weights, or says why not.

    `keras.utils.get_file` raises a bare Exception when offline: turned into one line here.
    """
    from models import weights as weights_lib

    try:
        weights_lib.imagenet_weights_path(
            arch, include_top=num_classes == weights_lib.IMAGENET_CLASSES
        )
    except weights_lib.WeightsError:
        raise
    except Exception as e:  # get_file: URL errors, HTTP errors, bad hash
        raise UsageError(
            f"--pretrained=imagenet: cannot get the Keras Applications {arch} weights "
            f"({first_line(e)}); connect once (they are cached in ~/.keras/models) or pass "
            "--pretrained=PATH to a weights file"
        ) from e


def training_model(model: keras.Model, config: TrainConfig) -> keras.Model:
    """What `fit` trains: `model` itself, or with `--qat` it and its int8-rounded twin.

    Call it in the strategy's scope. Quantization-aware fine-tuning (`models.qat`) trains the
    float model on the labels and its int8-rounded twin towards the float model's
    probabilities; both share every weight, and `model` stays what is saved and exported.
    """
    if not config.qat:
        return model
    return qat.agreement_model(model, qat.quantized_twin(model))


@keras.saving.register_keras_serializable(package="app")
class SparseCategoricalCrossentropyWithSmoothing(keras.losses.Loss):
    """Sparse categorical cross-entropy from logits, with label smoothing.

    Keras' SparseCategoricalCrossentropy has no `label_smoothing`; this one-hots the
    integer labels inside the loss and uses `categorical_crossentropy`'s, so the data
    keeps sparse labels and the "accuracy" metric stays the sparse one. Registered, so a
    `best.keras` compiled with it reloads with `compile=True` once this module is imported.
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "sparse_ce_smoothed", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        one_hot = keras.ops.one_hot(labels, keras.ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def make_loss(label_smoothing: float) -> keras.losses.Loss:
    """Sparse categorical cross-entropy from logits, label-smoothed when asked."""
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return SparseCategoricalCrossentropyWithSmoothing(label_smoothing)


def lr_schedule(
    lr: float, min_lr: float, total_steps: int, warmup_steps: int = 0
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Cosine decay from `lr` to `min_lr` over all steps, after a linear warmup.

    Keras' CosineDecay warms up only when `warmup_target` is set (from
    `initial_learning_rate`, here `min_lr`, to `lr`), then decays over `decay_steps`
    more steps; `alpha` is the final rate as a *fraction* of the peak.
    """
    decay_steps = max(1, total_steps - warmup_steps)
    alpha = float(min_lr) / float(lr)
    if warmup_steps > 0:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=float(min_lr),
            decay_steps=decay_steps,
            alpha=alpha,
            warmup_target=float(lr),
            warmup_steps=warmup_steps,
        )
    return keras.optimizers.schedules.CosineDecay(float(lr), decay_steps, alpha=alpha)


@keras.saving.register_keras_serializable(package="app")
class FusedSGD(keras.optimizers.SGD):
    """Keras' SGD with the momentum update of each variable in one TensorFlow kernel.

    Keras computes `m = momentum * m - lr * g; w += m` (Nesterov: `w += momentum * m - lr *
    g`) as separate element-wise ops, each a pass over the variable's memory; profiled in
    `app.train`'s `fit`, they were about a fifth of the op time of a ResNet-18 step on a CPU.
    TensorFlow's `ResourceApplyKerasMomentum` is that same update in one pass. Other
    backends, sparse gradients and momentum 0 take Keras' own path; the variables, config
    and saved files are Keras' SGD's.
    """

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if (
            not self.momentum
            or keras.backend.backend() != "tensorflow"
            or isinstance(gradient, tf.IndexedSlices)
        ):
            return super().update_step(gradient, variable, learning_rate)
        accumulator = workarounds.optimizer_slot(self, self.momentums, variable)
        if isinstance(variable, keras.Variable):
            variable = variable.value
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle,
            accum=accumulator.value.handle,
            lr=tf.cast(learning_rate, variable.dtype),
            grad=tf.cast(gradient, variable.dtype),
            momentum=tf.cast(self.momentum, variable.dtype),
            use_nesterov=self.nesterov,
        )


def make_optimizer(
    schedule: float | keras.optimizers.schedules.LearningRateSchedule,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    variables: Sequence[keras.Variable],
) -> keras.optimizers.SGD:
    """SGD with momentum (`FusedSGD`) and weight decay on kernels only.

    Keras applies `weight_decay` decoupled (w -= lr * wd * w each step, outside the
    momentum), unlike PyTorch's SGD, which adds wd * w to the gradient. Batch-norm
    gammas/betas and biases (every variable of rank <= 1) are excluded, as usual.
    """
    optimizer = FusedSGD(
        learning_rate=schedule,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay or None,
    )
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
    return optimizer


def set_backbone_frozen(model: keras.Model, frozen: bool) -> None:
    """Freezes everything but the head; frozen batch norm runs in inference mode.

    (In Keras 3, a BatchNormalization layer with trainable=False uses its moving
    statistics, as fine-tuning wants.)
    """
    for layer in model.layers:
        layer.trainable = not frozen or layer.name == resnet.HEAD


def freeze_batch_norm(model: keras.Model) -> None:
    """Batch norm in inference mode, its scale and shift fixed (`--qat`).

    Full-int8 LiteRT folds each batch norm's moving statistics into the convolution before
    it: fine-tuning must compute with those, not with each batch's statistics.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def set_phase_trainable(model: keras.Model, frozen_backbone: bool, config: TrainConfig) -> None:
    """What a phase trains: the head only (backbone frozen) or everything, and for `--qat`
    never the batch norm."""
    set_backbone_frozen(model, frozen_backbone)
    if config.qat:
        freeze_batch_norm(model)


def compile_model(
    model: keras.Model,
    config: TrainConfig,
    schedule: keras.optimizers.schedules.LearningRateSchedule,
    steps_per_execution: int,
    element_spec: tuple[tf.TensorSpec, tf.TensorSpec],
) -> None:
    """Compiles with a fresh optimizer, and creates every optimizer and metric variable.

    Call it in the strategy's scope, with `training_model`'s model. Keras creates the metric
    variables lazily (while tracing the first step); a resumed run must assign the
    backed-up epoch metrics before that, so they are built here from `element_spec`
    ((images, labels) specs; see `workarounds.build_metrics`).
    """
    optimizer = make_optimizer(
        schedule, config.momentum, config.nesterov, config.weight_decay, model.trainable_variables
    )
    if config.qat:
        loss = qat.AgreementLoss(config.qat_weight, config.label_smoothing)
        metrics = qat.agreement_metrics()
    else:
        loss, metrics = make_loss(config.label_smoothing), ["accuracy"]
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=metrics,
        steps_per_execution=steps_per_execution,
        jit_compile=config.jit_compile,
    )
    model.optimizer.build(model.trainable_variables)
    workarounds.build_metrics(model, element_spec)
