"""Training as a library: `train(TrainConfig, DataConfig)` runs `model.fit` end to end.

What `python -m app.train` does, without flags: picks a `tf.distribute` strategy,
loads the data (`app.data`), builds the ResNet (`models.resnet`) with its optimizer
(SGD + momentum, decoupled weight decay that skips batch-norm and bias parameters,
cosine learning rate with linear warmup) and loss (sparse cross-entropy on logits with
optional label smoothing) inside the strategy's scope, trains with validation every
epoch, keeps the best model in `best.keras`, and writes the run records. Killed at any
point, the same call resumes exactly where the last backup left it (see
`app.training_state`); a finished run is not trained again.

Example:

    from app import data, training
    result = training.train(
        training.TrainConfig(model_dir="runs/x", model="resnet18", epochs=2, batch_size=64,
                             lr=0.05),
        data.DataConfig(data_dir="../shared/data/cifar10", train_limit=2000),
    )
    print(result.best_val_accuracy, result.best_path)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras

from app import training_state
from app.data import DataConfig
from common.errors import UsageError
from common.files import write_text_atomic
from models import qat, resnet
from models.bundle import write_labels
from models.preprocessing import Preprocessing, by_name

if TYPE_CHECKING:
    import tensorflow as tf

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
PRETRAINED_NONE = "none"
PRETRAINED_IMAGENET = "imagenet"
HEAD = "predictions"  # the Dense logits layer of models.resnet
BEST_FILE = "best.keras"
FLAGS_FILE = "flags.txt"
SAMPLES_FILE = "samples.png"
LOGS_DIR = "logs"
NUM_SAMPLES = 6  # the tutorial's 2x3 grid

# Settings that may change between a run and its resumption without changing what is
# computed (how it is run, printed or backed up). Everything else must match the backup.
RUNTIME_SETTINGS = frozenset(
    {
        "model_dir",
        "verbose",
        "strategy",
        "steps_per_execution",
        "backup_every_steps",
        "keep_backup",
        "collective_timeout",
        "heartbeat_timeout",
        "logical_cpus",
        "intra_op_threads",
        "inter_op_threads",
        "jit_compile",
    }
)


class WorkerLostError(RuntimeError):
    """Another worker of a multi-worker job died or stopped answering."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `train` needs besides the data; `app.train` fills it from flags.

    See `app/train.py` for what each field means (its flag's help text).
    """

    model_dir: str
    model: str = "resnet50"
    stem: str = "imagenet"
    stride_on: str = "auto"
    pretrained: str = PRETRAINED_NONE
    dropout: float = 0.0
    image_size: int = 32
    normalization: str = "auto"
    synchronized_bn: bool = False
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    freeze_backbone_epochs: int = 0
    qat: bool = False
    qat_weight: float = 1.0
    augment: bool = True
    mixed_precision: str = "none"
    seed: int = 0
    deterministic: bool = False
    strategy: str = "auto"
    steps_per_execution: int = 1
    jit_compile: bool = False
    backup_every_steps: int = 200
    keep_backup: bool = False
    collective_timeout: float = 600.0
    heartbeat_timeout: float = 30.0
    logical_cpus: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    verbose: int = 1


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished `train` call reports."""

    best_val_accuracy: float
    best_epoch: int
    best_path: str
    history: list[dict[str, float]]
    model_dir: str
    final_weights_sha256: str
    is_chief: bool = True
    worker: str = "worker"
    resumed_from: tuple[int, int] | None = None  # (epoch, step) of the backup used

    def final_line(self) -> str:
        return (
            f"Best validation accuracy {self.best_val_accuracy:.3f} at epoch "
            f"{self.best_epoch}, saved to {self.best_path}"
        )


# --------------------------------------------------------------------------------------
# Checking settings (no TensorFlow: runs before any work)


def check_config(config: TrainConfig) -> None:
    """Raises UsageError, naming the flag, for any value that cannot work."""

    def bad(flag: str, value: Any, why: str) -> UsageError:
        return UsageError(f"--{flag}={value} {why}")

    if config.model not in resnet.ARCHITECTURES:
        raise bad("model", config.model, f"is unknown; choose one of {resnet.ARCHITECTURES}")
    if config.stem not in ("imagenet", "cifar"):
        raise bad("stem", config.stem, "is unknown; choose imagenet or cifar")
    if config.stride_on not in ("auto", "1x1", "3x3"):
        raise bad("stride_on", config.stride_on, "is unknown; choose auto, 1x1 or 3x3")
    if config.strategy not in STRATEGIES:
        raise bad("strategy", config.strategy, f"is unknown; choose one of {STRATEGIES}")
    if config.mixed_precision not in PRECISIONS:
        raise bad("mixed_precision", config.mixed_precision, f"must be one of {list(PRECISIONS)}")
    if config.normalization not in ("auto", "cifar", "imagenet"):
        raise bad("normalization", config.normalization, "must be auto, cifar or imagenet")
    positive = {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "steps_per_execution": config.steps_per_execution,
        "collective_timeout": config.collective_timeout,
        "heartbeat_timeout": config.heartbeat_timeout,
    }
    for flag, value in positive.items():
        if not value > 0:
            raise bad(flag, value, "must be positive")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise bad("lr", config.lr, "must be a positive learning rate, e.g. 0.1")
    if not 0 <= config.min_lr <= config.lr:
        raise bad("min_lr", config.min_lr, f"must be in [0, --lr={config.lr}]")
    if not 0 <= config.warmup_epochs < config.epochs:
        raise bad("warmup_epochs", config.warmup_epochs, f"must be in [0, {config.epochs})")
    if not 0 <= config.momentum < 1:
        raise bad("momentum", config.momentum, "must be in [0, 1)")
    if config.nesterov and config.momentum == 0:
        raise bad("nesterov", True, "needs --momentum > 0")
    if not 0 <= config.weight_decay < 1:
        raise bad("weight_decay", config.weight_decay, "must be in [0, 1)")
    if not 0 <= config.label_smoothing < 1:
        raise bad("label_smoothing", config.label_smoothing, "must be in [0, 1)")
    if not 0 <= config.dropout < 1:
        raise bad("dropout", config.dropout, "must be in [0, 1)")
    if not 0 <= config.freeze_backbone_epochs < config.epochs:
        raise bad(
            "freeze_backbone_epochs",
            config.freeze_backbone_epochs,
            f"must be in [0, --epochs={config.epochs})",
        )
    if config.freeze_backbone_epochs and config.pretrained == PRETRAINED_NONE:
        raise bad("freeze_backbone_epochs", config.freeze_backbone_epochs, "needs --pretrained")
    if config.qat:
        if config.pretrained in (PRETRAINED_NONE, PRETRAINED_IMAGENET):
            raise bad(
                "qat",
                True,
                "fine-tunes a model trained on your classes: pass --pretrained=RUN/best.keras",
            )
        if config.mixed_precision != "none":
            raise bad(
                "qat",
                True,
                f"rounds activations as int8 does, in float32: pass --mixed_precision=none, "
                f"not {config.mixed_precision}",
            )
    if not (config.qat_weight >= 0 and math.isfinite(config.qat_weight)):
        raise bad("qat_weight", config.qat_weight, "must be >= 0")
    for flag in ("backup_every_steps", "logical_cpus", "intra_op_threads", "inter_op_threads"):
        if getattr(config, flag) < 0:
            raise bad(flag, getattr(config, flag), "must be >= 0")
    if config.pretrained == PRETRAINED_IMAGENET and config.model in ("resnet18", "resnet34"):
        raise bad(
            "pretrained",
            "imagenet",
            f"has no weights for {config.model}: Keras Applications has ImageNet weights for "
            "resnet50, resnet101 and resnet152",
        )
    if config.pretrained not in (PRETRAINED_NONE, PRETRAINED_IMAGENET) and not os.path.isfile(
        config.pretrained
    ):
        raise bad("pretrained", config.pretrained, "is not a file; pass none, imagenet or a path")
    if config.strategy == "multi_worker_mirrored" and not os.environ.get("TF_CONFIG"):
        raise UsageError(
            "--strategy=multi_worker_mirrored needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": '
            '{"type": "worker", "index": 0}}); see BUILD.md'
        )


def resolve_normalization(normalization: str, pretrained: str) -> str:
    """`auto`: the normalisation the starting weights were trained with.

    Keras Applications ImageNet weights (and legacy `.h5` files in their layout) expect
    "imagenet" (caffe BGR) input; a `.keras` file of ours says in its preprocessing.json;
    anything else (from scratch) gets the CIFAR mean/std.
    """
    if normalization != "auto":
        return normalization
    if pretrained == PRETRAINED_IMAGENET:
        return "imagenet"
    if pretrained != PRETRAINED_NONE:
        directory = os.path.dirname(os.path.abspath(pretrained))
        if pretrained.endswith(".keras") and os.path.isfile(
            os.path.join(directory, "preprocessing.json")
        ):
            return Preprocessing.load(directory).name
        from models import weights as weights_lib

        if weights_lib.default_stride_on(pretrained) == "1x1":  # a Keras Applications file
            return "imagenet"
    return "cifar"


def settings_fingerprint(config: TrainConfig, data_config: DataConfig) -> dict[str, Any]:
    """The settings that decide what a run computes (a resumed run must match them)."""
    out = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_SETTINGS}
    out.update({f"data.{k}": v for k, v in dataclasses.asdict(data_config).items()})
    return out


# --------------------------------------------------------------------------------------
# TensorFlow runtime and strategy


def configure_runtime(config: TrainConfig) -> None:
    """Process-wide TF settings; must run before TensorFlow executes anything."""
    import tensorflow as tf

    if config.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(config.intra_op_threads)
    if config.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(config.inter_op_threads)
    if config.logical_cpus > 1:
        # Several logical CPU devices let tests run multi-replica code on one machine.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * config.logical_cpus
        )
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(PRECISIONS[config.mixed_precision])
    if config.strategy == "multi_worker_mirrored":
        _configure_coordination_service(config)


def _configure_coordination_service(config: TrainConfig) -> None:
    """Bounds how long a multi-worker job waits for a dead or missing worker.

    MultiWorkerMirroredStrategy starts TF's coordination service with its defaults when
    none is configured; configuring it first (the same jobs, the same leader) sets the
    heartbeat timeout (a worker that stops answering fails the job after it) and the
    time the workers wait for each other at start. There is no public API for this in
    TF 2.21, hence `context.configure_coordination_service`.
    """
    import tensorflow as tf
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    try:
        cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"TF_CONFIG is not a valid cluster description ({e}); see BUILD.md") from e
    jobs = [j for j in ("chief", "worker") if j in cluster.jobs]
    if not jobs:
        raise UsageError("TF_CONFIG names no chief or worker tasks; see BUILD.md")
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=j, num_tasks=cluster.num_tasks(j))
            for j in jobs
        ],
        heartbeat_timeout_in_ms=int(config.heartbeat_timeout * 1000),
        cluster_register_timeout_in_ms=int(config.collective_timeout * 1000),
    )
    # Without a registration barrier a worker whose peers never start waits forever,
    # whatever the timeout; with it, start-up fails after cluster_register_timeout.
    context.context()._coordination_service_config.cluster_register_with_barrier = True


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy `--strategy` names (see TrainConfig.strategy)."""
    import tensorflow as tf

    name = config.strategy
    # Listing devices initialises TF, after which MultiWorkerMirroredStrategy can no longer
    # configure its collectives: only the single-machine strategies look.
    gpus = [] if name in ("multi_worker_mirrored", "tpu") else tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        # MirroredStrategy() alone takes the GPUs, or only the first CPU: name them all.
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker_mirrored":
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=config.collective_timeout
        )
        try:
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except tf.errors.UnknownError as e:  # e.g. "Could not start gRPC server"
            raise UsageError(
                f"cannot start this worker's server ({_first_line(e)}): is its TF_CONFIG "
                "address free and on this machine?"
            ) from e
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as e:
            raise WorkerLostError(
                f"not every worker of TF_CONFIG joined within --collective_timeout="
                f"{config.collective_timeout:g} s ({_first_line(e)}); start all of them"
            ) from e
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as e:
            raise UsageError(f"--strategy=tpu: no TPU found ({e})") from e
        return tf.distribute.TPUStrategy(resolver)
    raise UsageError(f"--strategy={name} is unknown; choose one of {STRATEGIES}")


def weights_digest(model: keras.Model) -> str:
    """sha256 of every model variable's bytes, in order: equal digests, equal weights."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for variable in model.variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def scratch_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """The throw-away output directory of a non-chief worker."""
    import hashlib

    key = hashlib.sha1(os.path.abspath(model_dir).encode()).hexdigest()[:12]
    task = worker_name(strategy).replace(" ", "")
    return os.path.join(tempfile.gettempdir(), f"app-train-worker-{task}-{key}")


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    import tensorflow as tf

    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def worker_name(strategy: tf.distribute.Strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "worker"
    return f"{resolver.task_type} {resolver.task_id}"


# --------------------------------------------------------------------------------------
# Model, loss, optimizer


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


def make_optimizer(
    schedule: float | keras.optimizers.schedules.LearningRateSchedule,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    variables: Sequence[keras.Variable],
) -> keras.optimizers.SGD:
    """SGD with momentum and weight decay on kernels only.

    Keras applies `weight_decay` decoupled (w -= lr * wd * w each step, outside the
    momentum), unlike PyTorch's SGD, which adds wd * w to the gradient. Batch-norm
    gammas/betas and biases (every variable of rank <= 1) are excluded, as usual.
    """
    optimizer = keras.optimizers.SGD(
        learning_rate=schedule,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay or None,
    )
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
    return optimizer


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


def set_backbone_frozen(model: keras.Model, frozen: bool) -> None:
    """Freezes everything but the head; frozen batch norm runs in inference mode.

    (In Keras 3, a BatchNormalization layer with trainable=False uses its moving
    statistics, as fine-tuning wants.)
    """
    for layer in model.layers:
        layer.trainable = not frozen or layer.name == HEAD


def fit_model(model: keras.Model, config: TrainConfig) -> keras.Model:
    """What `fit` trains: `model` itself, or with `--qat` it and its int8-rounded twin.

    Call it in the strategy's scope. Quantization-aware fine-tuning (`models.qat`) trains the
    float model on the labels and its int8-rounded twin towards the float model's
    probabilities; both share every weight, and `model` stays what is saved and exported.
    """
    if not config.qat:
        return model
    return qat.agreement_model(model, qat.quantized_twin(model))


def freeze_batch_norm(model: keras.Model) -> None:
    """Batch norm in inference mode, its scale and shift fixed (`--qat`).

    Full-int8 LiteRT folds each batch norm's moving statistics into the convolution before
    it: fine-tuning must compute with those, not with each batch's statistics.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def compile_model(
    model: keras.Model,
    config: TrainConfig,
    schedule: keras.optimizers.schedules.LearningRateSchedule,
    steps_per_execution: int,
    element_spec: tuple[tf.TensorSpec, tf.TensorSpec],
) -> None:
    """Compiles with a fresh optimizer, and creates every optimizer and metric variable.

    Call it in the strategy's scope, with `fit_model`'s model. Keras creates the metric
    variables lazily (while tracing the first step); a resumed run must assign the
    backed-up epoch metrics before that, so they are built here from `element_spec`
    ((images, labels) specs), with the same private `_symbolic_build` Keras uses under a
    distribution strategy.
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
    model._symbolic_build(data_batch=element_spec)


def _work_around_keras_multi_worker(model, element_spec, multi_worker: bool) -> None:
    """Two Keras 3.15 bugs with distributed datasets / MultiWorkerMirroredStrategy.

    1. `fit`/`evaluate` call `_maybe_symbolic_build`, which averages the first distributed
       batch with `strategy.reduce(..., axis=None)` over the (images, labels) tuple; under
       MultiWorkerMirroredStrategy that raises "Attempt to convert a value (PerReplica...)".
       The model is built already: build the compiled metrics/loss from the element spec.
    2. Under MultiWorkerMirroredStrategy, step outputs (scalar metric values) are reduced
       with `strategy.reduce("MEAN", v, axis=0)`, which fails on scalars ("Invalid
       reduction dimension 0 for input with 0 dimensions"). Returning them as [1]-vectors
       makes that reduction valid; the values are identical on every replica (the metric
       variables are synchronised), so their mean is exactly the value.
    """
    import tensorflow as tf

    def symbolic_build(iterator=None, data_batch=None):
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=element_spec)

    model._maybe_symbolic_build = symbolic_build
    if not multi_worker:
        return
    train_step, test_step = model.train_step, model.test_step

    def as_vectors(logs):
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    model.train_step = lambda data: as_vectors(train_step(data))
    model.test_step = lambda data: as_vectors(test_step(data))


# --------------------------------------------------------------------------------------
# The run


def effective_steps_per_execution(requested: int, steps_per_epoch: int) -> int:
    """The largest divisor of the epoch's steps that is <= `requested`.

    Keras runs whole executions of `steps_per_execution` batches, so an epoch whose
    length it does not divide would eat into the next epoch's batches and break the
    exact (epoch, step) bookkeeping of resumption.
    """
    return max(d for d in range(1, min(requested, steps_per_epoch) + 1) if steps_per_epoch % d == 0)


def _finished_run(model_dir: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """metrics.json of a finished run in `model_dir` (None if there is none)."""
    from app.training_callbacks import METRICS_FILE

    path = os.path.join(model_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not metrics.get("completed"):
        return None
    diff = training_state.first_difference(metrics.get("settings", {}), settings)
    if diff:
        raise UsageError(
            f"--model_dir {model_dir} already holds a finished run with other settings "
            f"({diff}); pass a new --model_dir"
        )
    return metrics


def train(config: TrainConfig, data_config: DataConfig, flags_text: str = "") -> TrainResult:
    """Trains (or resumes, or reports a finished run) and returns the best result.

    Must be called before TensorFlow has executed anything in the process (the runtime
    and the strategy are configured here).

    Args:
        config: the training settings.
        data_config: where the data comes from.
        flags_text: the flagfile that reproduces the run, written to flags.txt.

    Raises:
        UsageError, DataError, WeightsError: bad settings or input (before any training).
        WorkerLostError: another worker of a multi-worker job died.
    """
    check_config(config)
    configure_runtime(config)
    strategy = make_strategy(config)
    chief = strategy.extended.should_checkpoint
    # Non-chief workers write their (identical) files to a scratch directory removed at
    # the end; running the same code keeps every collective operation in step. Its name
    # is fixed per (model_dir, task), so a restarted worker also removes what a killed
    # one left behind.
    out_dir = config.model_dir if chief else scratch_dir(config.model_dir, strategy)
    if not chief:
        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        return _train(config, data_config, flags_text, strategy, chief, out_dir)
    except Exception as e:
        if is_multi_worker(strategy) and _is_peer_failure(e):
            raise WorkerLostError(
                f"{worker_name(strategy)}: lost contact with another worker "
                f"({type(e).__name__}: {_first_line(e)}); restart every worker with the same "
                f"command to resume from the last backup in "
                f"{training_state.backup_path(config.model_dir)}"
            ) from e
        raise
    finally:
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)


def _is_peer_failure(error: BaseException) -> bool:
    import tensorflow as tf

    if isinstance(error, tf.errors.InternalError):  # only when a collective broke
        return "collective" in str(error).lower()
    return isinstance(
        error,
        tf.errors.UnavailableError
        | tf.errors.DeadlineExceededError
        | tf.errors.CancelledError
        | tf.errors.AbortedError,
    )


def _first_line(error: BaseException) -> str:
    message = getattr(error, "message", None) or str(error)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if "Graph execution error" not in line]
    return (useful or lines or [""])[0][:300]


def _fetch_imagenet_weights(arch: str, num_classes: int) -> None:
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
            f"({_first_line(e)}); connect once (they are cached in ~/.keras/models) or pass "
            "--pretrained=PATH to a weights file"
        ) from e


@dataclasses.dataclass
class _Run:
    """What one training run works out before its first step, and its helpers."""

    config: TrainConfig
    strategy: Any
    chief: bool
    out_dir: str
    splits: Any  # app.data.Splits
    preprocessing: Preprocessing
    steps_per_epoch: int
    steps_per_execution: int
    backup_every: int
    state: training_state.RunState

    @property
    def distributed(self) -> bool:
        return self.strategy.num_replicas_in_sync > 1 or is_multi_worker(self.strategy)

    def say(self, *args) -> None:
        if self.chief:
            print(*args, flush=True)

    def _dataset(self, make):
        """`make(input_context)` as one dataset, or one per input pipeline when distributed."""
        if self.distributed:
            return self.strategy.distribute_datasets_from_function(make)
        return make(None)

    def train_data(self, epoch: int, step: int):
        """The endless training batches from batch `step` of epoch `epoch` on."""
        from app import data

        c = self.config
        return self._dataset(
            lambda ctx: data.train_dataset(
                self.splits.train,
                self.preprocessing,
                c.batch_size,
                seed=c.seed,
                augment=c.augment,
                start_epoch=epoch,
                start_step=step,
                input_context=ctx,
            )
        )

    def validation_data(self):
        from app import data

        return self._dataset(
            lambda ctx: data.eval_dataset(
                self.splits.validation, self.preprocessing, self.config.batch_size, ctx
            )
        )

    def summary(self, run: training_state.RunState, completed: bool) -> dict[str, Any]:
        """metrics.json."""
        c = self.config
        images = len(run.history) * self.steps_per_epoch * c.batch_size
        return {
            "completed": completed,
            "best_val_accuracy": run.best,
            "best_epoch": run.best_epoch,
            "best_path": os.path.join(c.model_dir, BEST_FILE),
            "epochs_done": len(run.history),
            "epochs": c.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch_size": c.batch_size,
            "replicas": self.strategy.num_replicas_in_sync,
            "train_examples": self.splits.train.num_examples,
            "validation_examples": self.splits.validation.num_examples,
            "class_names": self.splits.class_names,
            "normalization": self.preprocessing.name,
            # Wall time inside model.fit over all restarts (validation included).
            "train_seconds": round(run.train_seconds, 3),
            "train_images_per_second": (
                round(images / run.train_seconds, 1) if run.train_seconds > 0 else None
            ),
            "final": run.history[-1] if run.history else None,
            "final_weights_sha256": run.final_weights_sha256 if completed else None,
            "history": run.history,
            "settings": run.settings,
        }


def _check_model_dir(config: TrainConfig, settings: dict[str, Any]):
    """(metrics.json of a finished run, the backup of an unfinished one); refuses others."""
    finished = _finished_run(config.model_dir, settings)
    if finished is not None:
        return finished, None
    backup = training_state.load_backup(training_state.backup_path(config.model_dir))
    if backup is not None:
        diff = training_state.first_difference(backup.state.settings, settings)
        if diff:
            raise UsageError(
                f"--model_dir {config.model_dir} holds an unfinished run with other settings "
                f"({diff}); rerun with its flags (flags.txt) to resume it, or pass a new "
                "--model_dir"
            )
    return None, backup


def _train(config, data_config, flags_text, strategy, chief, out_dir) -> TrainResult:
    import tensorflow as tf

    from app import data, plots

    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise UsageError(
            f"--batch_size={config.batch_size} (the global batch) does not divide over the "
            f"{replicas} replicas of --strategy={config.strategy}; use a multiple of {replicas}"
        )
    settings = settings_fingerprint(config, data_config)
    finished, backup = _check_model_dir(config, settings)
    if finished is not None:
        if chief:
            print(f"{config.model_dir} holds this run, finished; nothing to train.", flush=True)
        return TrainResult(
            best_val_accuracy=finished["best_val_accuracy"],
            best_epoch=finished["best_epoch"],
            best_path=os.path.join(config.model_dir, BEST_FILE),
            history=finished["history"],
            model_dir=config.model_dir,
            final_weights_sha256=finished["final_weights_sha256"],
            is_chief=chief,
            worker=worker_name(strategy),
        )

    splits = data.load(data_config)
    steps_per_epoch = data.steps_per_epoch(splits.train, config.batch_size)
    if steps_per_epoch < 1:
        raise UsageError(
            f"{splits.train.num_examples} training examples make no full batch of "
            f"--batch_size={config.batch_size}; lower it or use more data"
        )
    spe = effective_steps_per_execution(config.steps_per_execution, steps_per_epoch)
    backup_every = config.backup_every_steps
    if backup_every and backup_every % spe:
        backup_every += spe - backup_every % spe  # backups fall between executions
    normalization = resolve_normalization(config.normalization, config.pretrained)
    run = _Run(
        config=config,
        strategy=strategy,
        chief=chief,
        out_dir=out_dir,
        splits=splits,
        preprocessing=by_name(normalization, config.image_size),
        steps_per_epoch=steps_per_epoch,
        steps_per_execution=spe,
        backup_every=backup_every,
        state=backup.state if backup is not None else training_state.RunState(),
    )
    run.state.settings = settings

    run.say(splits.summary())
    run.say(
        f"{config.model} ({config.stem} stem, {normalization} normalisation, "
        f"{config.image_size}px), {config.epochs} epochs x {steps_per_epoch} steps of "
        f"{config.batch_size} images, {replicas} replica(s) ({type(strategy).__name__})"
        + (f", steps_per_execution {spe}" if spe > 1 else "")
    )
    if config.mixed_precision == "fp16" and not tf.config.list_logical_devices("GPU"):
        run.say("note: --mixed_precision=fp16 is emulated on CPUs and very slow; use bf16 or none")
    if spe != config.steps_per_execution:
        run.say(
            f"note: --steps_per_execution={config.steps_per_execution} does not divide the "
            f"{steps_per_epoch} steps of an epoch; using {spe}"
        )

    # The model, in the strategy's scope, before anything is written (weights may not load).
    if config.pretrained == PRETRAINED_IMAGENET:
        _fetch_imagenet_weights(config.model, len(splits.class_names))
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = build_model(config, len(splits.class_names))
        trained = fit_model(model, config)
    element_spec = (
        tf.TensorSpec([None, config.image_size, config.image_size, 3], tf.float32),
        tf.TensorSpec([None], tf.int32),
    )
    if run.distributed:
        _work_around_keras_multi_worker(trained, element_spec, is_multi_worker(strategy))

    os.makedirs(out_dir, exist_ok=True)
    if flags_text:
        write_text_atomic(os.path.join(out_dir, FLAGS_FILE), flags_text)
    write_labels(out_dir, splits.class_names)
    run.preprocessing.save(out_dir)
    images, labels = data.sample_images(splits.train, NUM_SAMPLES, data_config.seed)
    plots.save_samples_grid(images, labels, splits.class_names, os.path.join(out_dir, SAMPLES_FILE))

    if backup is not None:
        run.say(
            f"Resuming from {backup.path}: epoch {run.state.epoch + 1}/{config.epochs}, "
            f"step {run.state.step}/{steps_per_epoch}"
        )
    resumed_from = (run.state.epoch, run.state.step) if backup is not None else None
    records = _fit_phases(run, model, trained, element_spec, backup)

    state = run.state
    if state.best is None or not math.isfinite(state.best):
        raise UsageError(
            "training diverged: no epoch reached a finite validation accuracy; lower --lr"
        )
    state.final_weights_sha256 = weights_digest(model)
    records.write(completed=True)
    if not config.keep_backup:
        shutil.rmtree(os.path.dirname(training_state.backup_path(out_dir)), ignore_errors=True)
    return TrainResult(
        best_val_accuracy=state.best,
        best_epoch=state.best_epoch,
        best_path=os.path.join(config.model_dir, BEST_FILE),
        history=state.history,
        model_dir=config.model_dir,
        final_weights_sha256=state.final_weights_sha256,
        is_chief=chief,
        worker=worker_name(strategy),
        resumed_from=resumed_from,
    )


def _fit_phases(run: _Run, model: keras.Model, trained: keras.Model, element_spec, backup):
    """`trained.fit` from where the run stands to the end; returns the RunRecords callback.

    `trained` is `fit_model(model)`; `model` is what the best checkpoint holds. One `fit`
    per phase (frozen backbone, then full), and one more for a half-done epoch of a resumed
    run. The first phase compiled restores the backup's variables.
    """
    from app import training_callbacks
    from app.training_state import backup_path

    config, state, out_dir = run.config, run.state, run.out_dir
    steps_per_epoch, frozen_epochs = run.steps_per_epoch, config.freeze_backbone_epochs
    schedule = lr_schedule(
        config.lr,
        config.min_lr,
        config.epochs * steps_per_epoch,
        round(config.warmup_epochs * steps_per_epoch),
    )
    # Callbacks, in the order they must run at an epoch end: checkpoint, records, backup.
    clock = training_callbacks.TrainingClock(state)
    checkpoint = training_callbacks.AtomicModelCheckpoint(
        os.path.join(out_dir, BEST_FILE),
        saved_model=model,
        monitor="val_accuracy",
        mode="max",
        save_best_only=True,
        initial_value_threshold=state.best,
    )
    records = training_callbacks.RunRecords(
        state,
        out_dir,
        config.epochs,
        run.summary,
        print_lines=config.verbose == 0,
        prefix="" if run.chief else f"[{worker_name(run.strategy)}] ",
    )
    backups = training_callbacks.MidEpochBackup(
        state, backup_path(out_dir), run.backup_every, steps_per_epoch, clock
    )
    summaries = training_callbacks.EpochSummaries(os.path.join(out_dir, LOGS_DIR))
    records.write(completed=False)  # a resumed run drops rows of epochs it redoes
    validation = run.validation_data()

    backup_file = backup.path if backup is not None else ""

    def assign(variables, values, what):
        training_state.assign(variables, values, what, backup_file)

    phase = None
    while state.epoch < config.epochs:
        frozen = state.epoch < frozen_epochs
        if phase != ("frozen" if frozen else "full"):
            phase = "frozen" if frozen else "full"
            with run.strategy.scope():
                set_backbone_frozen(model, frozen)
                if config.qat:
                    freeze_batch_norm(model)
                compile_model(trained, config, schedule, run.steps_per_execution, element_spec)
            if backup is not None:
                assign(trained.variables, backup.arrays["model"], "model")
            if backup is not None and backup.state.optimizer_phase == phase:
                assign(trained.optimizer.variables, backup.arrays["optimizer"], "optimizer")
            else:
                # A new phase's optimizer continues the schedule where the last one stopped.
                trained.optimizer.iterations.assign(state.epoch * steps_per_epoch + state.step)
            state.optimizer_phase = phase
            if frozen:
                run.say(f"Training the head only for {frozen_epochs} epoch(s) (backbone frozen)")
        # A half-done epoch is a fit of its own, with its metric sums put back first.
        end_epoch = state.epoch + 1 if state.step else (frozen_epochs if frozen else config.epochs)
        epoch_metrics = backup.arrays.get("metrics") if backup is not None and state.step else None
        restore_metrics = training_callbacks.RestoreEpochMetrics(
            state.epoch,
            epoch_metrics,
            lambda variables, values: assign(variables, values, "metric"),
        )
        backup = None  # restored
        trained.fit(
            run.train_data(state.epoch, state.step),
            initial_epoch=state.epoch,
            epochs=end_epoch,
            steps_per_epoch=steps_per_epoch - state.step,
            validation_data=validation,
            callbacks=[restore_metrics, clock, checkpoint, records, backups, summaries],
            verbose=config.verbose if run.chief else 0,
            shuffle=False,  # the pipeline orders each epoch itself
        )
    return records
