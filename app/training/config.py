"""The settings of a training run: `TrainConfig`, each field documented where it is defined.

Every field's help text, and what a command-line flag for it needs (`choices`, `lower_bound`,
`upper_bound`), lives in its `dataclasses.field` metadata: `app.train` derives its flags from
them, in field order. `check_config` refuses, naming the flag, any value that cannot work;
it needs no TensorFlow, so it runs before any work.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from app.data import DataConfig
from common import files
from common.errors import UsageError
from models import resnet
from models.preprocessing import Preprocessing

STEMS = ("imagenet", "cifar", "cifar_pool")
STRIDES = ("auto", "1x1", "3x3")
NORMALIZATIONS = ("auto", "cifar", "imagenet")
PRECISIONS = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
# --mixed_precision=auto: bf16 where the hardware has bf16 units, else none (runtime.py).
AUTO_PRECISION = "auto"
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRETRAINED_NONE = "none"
PRETRAINED_IMAGENET = "imagenet"
# What a run writes into --model_dir besides the records of `callbacks.py` and the backup.
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


def _setting(default: Any, help: str, **flag: Any) -> Any:
    """A `TrainConfig` field: its default, its help text and its flag's `choices`/bounds."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `train` needs besides the data (`app.train` fills it from flags).

    Each field's `metadata["help"]` says what it means; the fields are in the order
    `python -m app.train --helpfull` and `flags.txt` list them.
    """

    # Where
    model_dir: str = _setting(
        dataclasses.MISSING,
        "Output folder, local or in a bucket (gs://...); rerunning into it resumes.",
    )
    # Model
    model: str = _setting("resnet50", "ResNet depth.", choices=resnet.ARCHITECTURES)
    stem: str = _setting(
        "imagenet",
        "imagenet: 7x7/2 conv + max-pool (the tutorial, ImageNet weights); cifar: one 3x3/1 "
        "conv, for training from scratch on 32x32 images; cifar_pool: that conv + the "
        "max-pool (16x16 maps into conv2 at 32x32, a quarter of cifar's cost).",
        choices=STEMS,
    )
    stride_on: str = _setting(
        "auto",
        "Where a bottleneck strides: 1x1 (Keras Applications, the layout of its ImageNet "
        "weights) or 3x3 (ResNet v1.5); auto: what the weights were trained with, else 3x3.",
        choices=STRIDES,
    )
    pretrained: str = _setting(
        PRETRAINED_NONE,
        "Starting weights: none, imagenet (Keras Applications, resnet50/101/152) or a path "
        "to a .h5/.keras file. The head is fresh when its class count differs.",
    )
    dropout: float = _setting(0.0, "Dropout before the head.", lower_bound=0.0)
    image_size: int = _setting(
        32, "Training/serving image size; images are resized (bilinear) to it.", lower_bound=1
    )
    normalization: str = _setting(
        "auto",
        "Input normalisation: cifar (CIFAR-10 mean/std) or imagenet (Keras Applications "
        "caffe BGR); auto: imagenet for Keras Applications ImageNet weights, else cifar.",
        choices=NORMALIZATIONS,
    )
    synchronized_bn: bool = _setting(
        False,
        "Batch norm over the global batch across replicas/workers (identical statistics on "
        "every worker; the same results as one device with the same global batch).",
    )
    # Optimisation
    epochs: int = _setting(40, "Epochs to train.", lower_bound=1)
    batch_size: int = _setting(
        128,
        "GLOBAL batch size (all replicas and workers together); must divide over replicas.",
        lower_bound=1,
    )
    lr: float = _setting(0.1, "Peak learning rate (for the global batch), after the warmup.")
    min_lr: float = _setting(
        0.0, "Learning rate at the end of the cosine decay (and at the start of the warmup)."
    )
    warmup_epochs: float = _setting(
        0.0, "Epochs of linear warmup from --min_lr to --lr (fractions allowed); 0: none."
    )
    momentum: float = _setting(0.9, "SGD momentum.")
    nesterov: bool = _setting(False, "Nesterov momentum.")
    weight_decay: float = _setting(
        0.0,
        "Decoupled weight decay (Keras SGD: w -= lr * wd * w each step) on conv/dense "
        "kernels; batch-norm and bias parameters are never decayed.",
    )
    label_smoothing: float = _setting(
        0.0, "Label smoothing of the cross-entropy (0: none; 0.1 is usual)."
    )
    freeze_backbone_epochs: int = _setting(
        0,
        "With --pretrained: train only the head for this many first epochs (backbone "
        "frozen, its batch norm in inference mode), then everything.",
        lower_bound=0,
    )
    augment: bool = _setting(True, "Random crop + horizontal flip of training images.")
    # Quantization-aware fine-tuning
    qat: bool = _setting(
        False,
        "Quantization-aware fine-tuning of --pretrained=RUN/best.keras for model_int8.tflite: "
        "also runs the model with weights and activations rounded as full-int8 LiteRT rounds "
        "them, and trains that twin towards the float model's probabilities (batch norm "
        "frozen, float32: needs --mixed_precision=none or auto). best.keras stays a plain float "
        "model. A few epochs at a small --lr (e.g. 0.005); see docs/export.md, "
        "Quantization-aware fine-tuning.",
    )
    qat_weight: float = _setting(
        1.0,
        "With --qat: weight of the int8 twin's KL divergence from the float probabilities "
        "against the float model's cross-entropy.",
        lower_bound=0.0,
    )
    # Execution
    mixed_precision: str = _setting(
        "none",
        "Compute precision: none (float32), bf16 (mixed_bfloat16), fp16 (mixed_float16, "
        "with loss scaling); auto: bf16 where the hardware has bf16 units (a CPU with AMX "
        "or AVX512-BF16, a GPU of compute capability 8.0+, a TPU), else none. The run's "
        "first line says which, and why.",
        choices=(AUTO_PRECISION, *PRECISIONS),
    )
    seed: int = _setting(0, "Seed of initialisation, data order, augmentation, split.")
    deterministic: bool = _setting(
        False, "TF op determinism: the same flags give the same history and weights (slower)."
    )
    strategy: str = _setting(
        "auto",
        "tf.distribute strategy. auto: mirrored over all GPUs when there are several, else "
        "default. multi_worker_mirrored reads the cluster from TF_CONFIG.",
        choices=STRATEGIES,
    )
    steps_per_execution: int = _setting(
        1,
        "Batches per compiled call (fewer Python round trips); lowered to a divisor of the "
        "epoch's steps.",
        lower_bound=1,
    )
    jit_compile: bool = _setting(False, "Compile the training step with XLA.")
    intra_op_threads: int = _setting(
        0, "Threads inside one TF op; 0: TensorFlow's choice.", lower_bound=0
    )
    inter_op_threads: int = _setting(
        0, "TF ops run in parallel; 0: TensorFlow's choice.", lower_bound=0
    )
    logical_cpus: int = _setting(
        0,
        "Split the CPU into this many logical devices (to run --strategy=mirrored with "
        "several replicas on one CPU, e.g. in tests); 0: no split.",
        lower_bound=0,
    )
    # Fault tolerance
    backup_every_steps: int = _setting(
        200,
        "Back up the whole training state (weights, optimizer, metrics, position) every N "
        "batches, besides every epoch end; a killed run resumes from there. 0: epoch ends only.",
        lower_bound=0,
    )
    keep_backup: bool = _setting(
        False,
        "Keep backup/state.npz (the final weights, optimizer state and history) after the "
        "run finishes, as Keras' BackupAndRestore(delete_checkpoint=False) does.",
    )
    collective_timeout: float = _setting(
        600.0,
        "Multi-worker: seconds a collective operation (and the start-up) may wait for the "
        "other workers before the job fails.",
    )
    heartbeat_timeout: float = _setting(
        30.0,
        "Multi-worker: seconds without a heartbeat after which a worker counts as dead and "
        "the job fails.",
    )
    verbose: int = _setting(
        1,
        "0: one tutorial-style line per epoch (for logs/CI); 1: Keras progress bar; "
        "2: Keras one line per epoch.",
        lower_bound=0,
        upper_bound=2,
    )


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
    # What `fit` trained in this process, for callers that measure it (`bench.profile_fit`):
    # the model (with `--qat`, the float model and its int8 twin) and the training dataset
    # of the last `fit`. None when the run had finished before this call.
    fit_model: Any = dataclasses.field(default=None, repr=False, compare=False)
    train_dataset: Any = dataclasses.field(default=None, repr=False, compare=False)

    def final_line(self) -> str:
        return (
            f"Best validation accuracy {self.best_val_accuracy:.3f} at epoch "
            f"{self.best_epoch}, saved to {self.best_path}"
        )


def _bad(flag: str, value: Any, why: str) -> UsageError:
    return UsageError(f"--{flag}={value} {why}")


def _check_field(field: dataclasses.Field, value: Any) -> None:
    """The rules a field's metadata states (the same its flag enforces): `choices`,
    `lower_bound`, `upper_bound`."""
    meta = field.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise _bad(field.name, value, f"is not one of {', '.join(meta['choices'])}")
    low, high = meta.get("lower_bound"), meta.get("upper_bound")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise _bad(field.name, value, f"must be {span}")


def check_config(config: TrainConfig) -> None:
    """Raises UsageError, naming the flag, for any value that cannot work.

    Every field is checked against its metadata first (what `app.train`'s flags enforce, so a
    `TrainConfig` built in code is held to the same rules); then the rules between fields.
    """
    for field in dataclasses.fields(config):
        _check_field(field, getattr(config, field.name))
    for flag in ("collective_timeout", "heartbeat_timeout"):
        if not getattr(config, flag) > 0:
            raise _bad(flag, getattr(config, flag), "must be positive")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise _bad("lr", config.lr, "must be a positive learning rate, e.g. 0.1")
    if not 0 <= config.min_lr <= config.lr:
        raise _bad("min_lr", config.min_lr, f"must be in [0, --lr={config.lr}]")
    if not 0 <= config.warmup_epochs < config.epochs:
        raise _bad("warmup_epochs", config.warmup_epochs, f"must be in [0, {config.epochs})")
    if not 0 <= config.momentum < 1:
        raise _bad("momentum", config.momentum, "must be in [0, 1)")
    if config.nesterov and config.momentum == 0:
        raise _bad("nesterov", True, "needs --momentum > 0")
    for flag in ("weight_decay", "label_smoothing", "dropout"):
        if not 0 <= getattr(config, flag) < 1:
            raise _bad(flag, getattr(config, flag), "must be in [0, 1)")
    if config.freeze_backbone_epochs >= config.epochs:
        raise _bad(
            "freeze_backbone_epochs",
            config.freeze_backbone_epochs,
            f"must be in [0, --epochs={config.epochs})",
        )
    if config.freeze_backbone_epochs and config.pretrained == PRETRAINED_NONE:
        raise _bad("freeze_backbone_epochs", config.freeze_backbone_epochs, "needs --pretrained")
    _check_qat(config)
    _check_pretrained(config)
    if config.strategy == "multi_worker_mirrored" and not os.environ.get("TF_CONFIG"):
        raise UsageError(
            "--strategy=multi_worker_mirrored needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": '
            '{"type": "worker", "index": 0}}); see docs/training.md, Several machines'
        )


def _check_qat(config: TrainConfig) -> None:
    if config.qat:
        if config.pretrained in (PRETRAINED_NONE, PRETRAINED_IMAGENET):
            raise _bad(
                "qat",
                True,
                "fine-tunes a model trained on your classes: pass --pretrained=RUN/best.keras",
            )
        if config.mixed_precision not in ("none", AUTO_PRECISION):
            raise _bad(
                "qat",
                True,
                f"rounds activations as int8 does, in float32: pass --mixed_precision=none, "
                f"not {config.mixed_precision}",
            )
    if not (config.qat_weight >= 0 and math.isfinite(config.qat_weight)):
        raise _bad("qat_weight", config.qat_weight, "must be >= 0")


def _check_pretrained(config: TrainConfig) -> None:
    if config.pretrained == PRETRAINED_IMAGENET and config.model in ("resnet18", "resnet34"):
        raise _bad(
            "pretrained",
            "imagenet",
            f"has no weights for {config.model}: Keras Applications has ImageNet weights for "
            "resnet50, resnet101 and resnet152",
        )
    if config.pretrained not in (PRETRAINED_NONE, PRETRAINED_IMAGENET) and not files.isfile(
        config.pretrained
    ):
        raise _bad("pretrained", config.pretrained, "is not a file; pass none, imagenet or a path")


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
        directory = files.dirname(pretrained)
        if pretrained.endswith(".keras") and files.isfile(
            files.join(directory, "preprocessing.json")
        ):
            return Preprocessing.load(directory).name
        from models import weights as weights_lib

        if weights_lib.is_legacy_h5(pretrained):  # a Keras Applications file
            return "imagenet"
    return "cifar"


def settings_fingerprint(config: TrainConfig, data_config: DataConfig) -> dict[str, Any]:
    """The settings that decide what a run computes (a resumed run must match them)."""
    out = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_SETTINGS}
    # max_pixels only refuses images, it changes nothing computed: a resume may change it.
    data = {k: v for k, v in dataclasses.asdict(data_config).items() if k != "max_pixels"}
    out.update({f"data.{k}": v for k, v in data.items()})
    return out
