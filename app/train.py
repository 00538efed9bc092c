"""Train or fine-tune a ResNet on CIFAR-10 (or any image-classification data) with model.fit.

Builds the input pipeline and the network, trains with validation every epoch under a
tf.distribute strategy, keeps the best model by validation accuracy, and writes into
--model_dir: best.keras, flags.txt (a flagfile that reproduces the run), labels.txt,
preprocessing.json, history.csv, metrics.json, logs/ (TensorBoard), samples.png and
curves.png. Rerunning the same command after a kill resumes from the last backup
(exactly, with --deterministic); rerunning a finished run prints its result.

Usage (from the repository root):

    python -m app.train --flagfile=app/configs/cifar10_cpu_quick.flags \\
        --data_dir=../shared/data/cifar10 --model_dir=runs/cpu_quick
    python -m app.train --flagfile=app/configs/cifar10_tutorial.flags --epochs=2
    python -m app.train --flagfile=runs/cpu_quick/flags.txt --model_dir=runs/again

Several machines: the same command on each, with TF_CONFIG set and
--strategy=multi_worker_mirrored (see BUILD.md).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from absl import flags

from app import cli

if TYPE_CHECKING:
    from app.training import TrainConfig

FLAGS = flags.FLAGS
_HOLDERS: dict[str, flags.FlagHolder] = {}
# Flags written to flags.txt: this program's and the data flags, in definition order.
_RECORDED: list[str] = []


def _define(kind: str, name: str, default, *args, **kwargs) -> None:
    """flags.DEFINE_<kind>(name, default, *args), recorded for TrainConfig and flags.txt."""
    define = getattr(flags, f"DEFINE_{kind}")
    _HOLDERS[name] = define(name, default, *args, **kwargs)
    _RECORDED.append(name)


def define_flags() -> None:
    """Defines this program's flags (called once, before `cli.run`)."""
    from app import data_flags, training
    from models import resnet

    d = training.TrainConfig(model_dir="")  # the library's defaults are the flags' defaults
    # Where
    _define("string", "model_dir", "runs/train", "Output folder; rerunning into it resumes.")
    # Model
    _define("enum", "model", d.model, resnet.ARCHITECTURES, "ResNet depth.")
    _define(
        "enum",
        "stem",
        d.stem,
        ["imagenet", "cifar"],
        "imagenet: 7x7/2 conv + max-pool (the tutorial, ImageNet weights); cifar: one 3x3/1 "
        "conv, for training from scratch on 32x32 images.",
    )
    _define(
        "enum",
        "stride_on",
        d.stride_on,
        ["auto", "1x1", "3x3"],
        "Where a bottleneck strides: 1x1 (Keras Applications, the layout of its ImageNet "
        "weights) or 3x3 (ResNet v1.5); auto: what the weights were trained with, else 3x3.",
    )
    _define(
        "string",
        "pretrained",
        d.pretrained,
        "Starting weights: none, imagenet (Keras Applications, resnet50/101/152) or a path "
        "to a .h5/.keras file. The head is fresh when its class count differs.",
    )
    _define("float", "dropout", d.dropout, "Dropout before the head.", lower_bound=0.0)
    _define(
        "integer",
        "image_size",
        d.image_size,
        "Training/serving image size; images are resized (bilinear) to it.",
        lower_bound=1,
    )
    _define(
        "enum",
        "normalization",
        d.normalization,
        ["auto", "cifar", "imagenet"],
        "Input normalisation: cifar (CIFAR-10 mean/std) or imagenet (Keras Applications "
        "caffe BGR); auto: imagenet for Keras Applications ImageNet weights, else cifar.",
    )
    _define(
        "bool",
        "synchronized_bn",
        d.synchronized_bn,
        "Batch norm over the global batch across replicas/workers (identical statistics on "
        "every worker; the same results as one device with the same global batch).",
    )
    # Optimisation
    _define("integer", "epochs", d.epochs, "Epochs to train.", lower_bound=1)
    _define(
        "integer",
        "batch_size",
        d.batch_size,
        "GLOBAL batch size (all replicas and workers together); must divide over replicas.",
        lower_bound=1,
    )
    _define("float", "lr", d.lr, "Peak learning rate (for the global batch), after the warmup.")
    _define(
        "float",
        "min_lr",
        d.min_lr,
        "Learning rate at the end of the cosine decay (and at the start of the warmup).",
    )
    _define(
        "float",
        "warmup_epochs",
        d.warmup_epochs,
        "Epochs of linear warmup from --min_lr to --lr (fractions allowed); 0: none.",
    )
    _define("float", "momentum", d.momentum, "SGD momentum.")
    _define("bool", "nesterov", d.nesterov, "Nesterov momentum.")
    _define(
        "float",
        "weight_decay",
        d.weight_decay,
        "Decoupled weight decay (Keras SGD: w -= lr * wd * w each step) on conv/dense "
        "kernels; batch-norm and bias parameters are never decayed.",
    )
    _define(
        "float",
        "label_smoothing",
        d.label_smoothing,
        "Label smoothing of the cross-entropy (0: none; 0.1 is usual).",
    )
    _define(
        "integer",
        "freeze_backbone_epochs",
        d.freeze_backbone_epochs,
        "With --pretrained: train only the head for this many first epochs (backbone "
        "frozen, its batch norm in inference mode), then everything.",
        lower_bound=0,
    )
    _define("bool", "augment", d.augment, "Random crop + horizontal flip of training images.")
    # Quantization-aware fine-tuning
    _define(
        "bool",
        "qat",
        d.qat,
        "Quantization-aware fine-tuning of --pretrained=RUN/best.keras for model_int8.tflite: "
        "also runs the model with weights and activations rounded as full-int8 LiteRT rounds "
        "them, and trains that twin towards the float model's probabilities (batch norm "
        "frozen, float32: needs --mixed_precision=none). best.keras stays a plain float "
        "model. A few epochs at a small --lr (e.g. 0.005); see BUILD.md, Export.",
    )
    _define(
        "float",
        "qat_weight",
        d.qat_weight,
        "With --qat: weight of the int8 twin's KL divergence from the float probabilities "
        "against the float model's cross-entropy.",
        lower_bound=0.0,
    )
    # Execution
    _define(
        "enum",
        "mixed_precision",
        d.mixed_precision,
        list(training.PRECISIONS),
        "Compute precision: none (float32), bf16 (mixed_bfloat16), fp16 (mixed_float16, "
        "with loss scaling).",
    )
    _define("integer", "seed", d.seed, "Seed of initialisation, data order, augmentation, split.")
    _define(
        "bool",
        "deterministic",
        d.deterministic,
        "TF op determinism: the same flags give the same history and weights (slower).",
    )
    _define(
        "enum",
        "strategy",
        d.strategy,
        list(training.STRATEGIES),
        "tf.distribute strategy. auto: mirrored over all GPUs when there are several, else "
        "default. multi_worker_mirrored reads the cluster from TF_CONFIG.",
    )
    _define(
        "integer",
        "steps_per_execution",
        d.steps_per_execution,
        "Batches per compiled call (fewer Python round trips); lowered to a divisor of the "
        "epoch's steps.",
        lower_bound=1,
    )
    _define("bool", "jit_compile", d.jit_compile, "Compile the training step with XLA.")
    _define(
        "integer",
        "intra_op_threads",
        d.intra_op_threads,
        "Threads inside one TF op; 0: TensorFlow's choice.",
        lower_bound=0,
    )
    _define(
        "integer",
        "inter_op_threads",
        d.inter_op_threads,
        "TF ops run in parallel; 0: TensorFlow's choice.",
        lower_bound=0,
    )
    _define(
        "integer",
        "logical_cpus",
        d.logical_cpus,
        "Split the CPU into this many logical devices (to run --strategy=mirrored with "
        "several replicas on one CPU, e.g. in tests); 0: no split.",
        lower_bound=0,
    )
    # Fault tolerance
    _define(
        "integer",
        "backup_every_steps",
        d.backup_every_steps,
        "Back up the whole training state (weights, optimizer, metrics, position) every N "
        "batches, besides every epoch end; a killed run resumes from there. 0: epoch ends only.",
        lower_bound=0,
    )
    _define(
        "bool",
        "keep_backup",
        d.keep_backup,
        "Keep backup/state.npz (the final weights, optimizer state and history) after the "
        "run finishes, as Keras' BackupAndRestore(delete_checkpoint=False) does.",
    )
    _define(
        "float",
        "collective_timeout",
        d.collective_timeout,
        "Multi-worker: seconds a collective operation (and the start-up) may wait for the "
        "other workers before the job fails.",
    )
    _define(
        "float",
        "heartbeat_timeout",
        d.heartbeat_timeout,
        "Multi-worker: seconds without a heartbeat after which a worker counts as dead and "
        "the job fails.",
    )
    _define(
        "integer",
        "verbose",
        d.verbose,
        "0: one tutorial-style line per epoch (for logs/CI); 1: Keras progress bar; "
        "2: Keras one line per epoch.",
        lower_bound=0,
        upper_bound=2,
    )
    before = set(FLAGS)
    data_flags.define_data_flags()
    _RECORDED.extend(name for name in FLAGS if name not in before)


def flags_text() -> str:
    """A flagfile that reproduces this run: every flag of the program, as used."""
    lines = [
        f"# Written by app.train: the flags of this run. Reproduce it (from {os.getcwd()}) with",
        "#   python -m app.train --flagfile=THIS_FILE [--model_dir=NEW_DIR]",
    ]
    for name in _RECORDED:
        serialized = FLAGS[name].serialize()
        if serialized:
            lines.append(serialized)
    return "\n".join(lines) + "\n"


def config_from_flags() -> TrainConfig:
    """The `TrainConfig` the parsed flags describe."""
    from app import training

    values = {name: holder.value for name, holder in _HOLDERS.items()}
    return training.TrainConfig(**values)


def main(argv: list[str]) -> None:
    from app import data_flags, training
    from common.errors import UsageError

    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    config = config_from_flags()
    data_config = data_flags.data_config_from_flags(config.seed)
    try:
        result = training.train(config, data_config, flags_text())
    except training.WorkerLostError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # TF's shutdown waits for the lost worker at a barrier: leave at once instead.
        os._exit(3)
    # Equal digests on every worker (and in a resumed vs an uninterrupted run) mean
    # equal final weights.
    prefix = "" if result.is_chief else f"[{result.worker}] "
    print(f"{prefix}Final weights sha256 {result.final_weights_sha256}", flush=True)
    if result.is_chief:
        print(result.final_line(), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
