"""Train or fine-tune a ResNet on CIFAR-10 (or any image-classification data) with model.fit.

Builds the input pipeline and the network, trains with validation every epoch under a
tf.distribute strategy, keeps the best model by validation accuracy, and writes into
--model_dir: best.keras, flags.txt (a flagfile that reproduces the run), labels.txt,
preprocessing.json, history.csv, metrics.json, logs/ (TensorBoard), samples.png and
curves.png. Rerunning the same command after a kill resumes from the last backup
(exactly, with --deterministic); rerunning a finished run prints its result.

Usage (from the repository root):

    python -m app.train --flagfile=app/configs/cifar10_cpu_quick.flags \\
        --data_dir=~/data/cifar10 --model_dir=runs/cpu_quick
    python -m app.train --flagfile=app/configs/cifar10_tutorial.flags --epochs=2
    python -m app.train --flagfile=runs/cpu_quick/flags.txt --model_dir=runs/again

Several machines: the same command on each, with TF_CONFIG set and
--strategy=multi_worker_mirrored (see docs/training.md, Several machines). Data larger than
memory: docs/large-datasets.md; runs and data in a bucket (gs://): docs/buckets.md.
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
# The flag kind of each TrainConfig field type (a field with `choices` is an enum).
_FLAG_KINDS = {"str": "string", "int": "integer", "float": "float", "bool": "bool"}
# The library needs a model_dir; the program has one by default.
_PROGRAM_DEFAULTS = {"model_dir": "runs/train"}


def _define(kind: str, name: str, default, *args, **kwargs) -> None:
    """flags.DEFINE_<kind>(name, default, *args), recorded for TrainConfig and flags.txt."""
    define = getattr(flags, f"DEFINE_{kind}")
    _HOLDERS[name] = define(name, default, *args, **kwargs)
    _RECORDED.append(name)


def define_flags() -> None:
    """Defines this program's flags (called once, before `cli.run`).

    One flag per `TrainConfig` field, in field order, with the help text, enum choices and
    bounds of the field's metadata (`app.training.config`); then the data flags.
    """
    import dataclasses

    from app import data_flags
    from app.training import TrainConfig

    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        default = _PROGRAM_DEFAULTS.get(field.name, field.default)
        bounds = {k: meta[k] for k in ("lower_bound", "upper_bound") if k in meta}
        if "choices" in meta:
            _define("enum", field.name, default, list(meta["choices"]), meta["help"], **bounds)
        else:
            _define(_FLAG_KINDS[field.type], field.name, default, meta["help"], **bounds)
    before = set(FLAGS)
    data_flags.define_data_flags()
    _RECORDED.extend(name for name in FLAGS if name not in before)
    # --help lists only this module's key flags: the data flags are set by users too.
    flags.adopt_module_key_flags(data_flags)


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

    cli.no_arguments(argv)
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
