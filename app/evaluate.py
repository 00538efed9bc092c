"""Evaluate a trained model on one split: top-1/top-5 accuracy, loss, per-class accuracy.

Prints the metrics and a per-class table, and writes `eval_<split>.json`,
`confusion_<split>.png` (labelled confusion matrix) and `predictions_<split>.png` (six
images titled `predict:<class>`, blue when right, red when wrong) next to the model, or in
--output_dir.

Data flags left unset are taken from the training run's `flags.txt` beside the model
(--dataset, --data_dir, --validation_split, --seed), so the validation split held out of
train is the one training held out. --split=test on data without a test split evaluates the
validation split instead, says so, and names the files `*_validation.*`. Data whose classes
differ from the model's labels.txt is refused.

Usage:

    python -m app.evaluate --model=runs/cpu_quick/best.keras
    python -m app.evaluate --model=runs/cpu_quick/best.keras --data_dir=../shared/data/cifar10 \\
        --split=validation --eval_limit=1000 --output_dir=/tmp/eval
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from absl import flags

from app import cli, data_flags

TRAINING_FLAGS_FILE = "flags.txt"
# Data flags that, when not given, default to the training run's values in flags.txt.
INHERITED_DATA_FLAGS = ("dataset", "data_dir", "validation_split")

_MODEL: flags.FlagHolder[str]
_SPLIT: flags.FlagHolder[str]
_OUTPUT_DIR: flags.FlagHolder[str]
_BATCH_SIZE: flags.FlagHolder[int]
_SEED: flags.FlagHolder[int]
_VERBOSE: flags.FlagHolder[int]


def define_flags() -> None:
    """Defines this program's flags plus the shared data flags."""
    global _MODEL, _SPLIT, _OUTPUT_DIR, _BATCH_SIZE, _SEED, _VERBOSE
    _MODEL = flags.DEFINE_string(
        "model", None, "The .keras model (labels.txt and preprocessing.json beside it)."
    )
    _SPLIT = flags.DEFINE_enum(
        "split",
        "test",
        ["train", "validation", "test"],
        "Split to evaluate; test falls back to validation when the data has none.",
    )
    _OUTPUT_DIR = flags.DEFINE_string(
        "output_dir", None, "Where to write the results; default: the model's folder."
    )
    _BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Images per batch.", lower_bound=1)
    _SEED = flags.DEFINE_integer(
        "seed",
        None,
        "Seed of the validation hold-out and the limits; default: the training run's "
        "(flags.txt beside the model), else 0.",
    )
    _VERBOSE = flags.DEFINE_integer("verbose", 1, "1: progress bar; 0: quiet.", lower_bound=0)
    flags.mark_flag_as_required("model")
    data_flags.define_data_flags()


def data_config(model_path: str):
    """The `DataConfig` of the command line, with unset data flags and --seed taken from
    the training run's flags.txt beside the model."""
    from app import evaluation
    from common.errors import UsageError

    trained = evaluation.read_flagfile(
        os.path.join(os.path.dirname(os.path.abspath(model_path)), TRAINING_FLAGS_FILE)
    )
    try:
        seed = _SEED.value if _SEED.value is not None else int(trained.get("seed", 0))
        split_fraction = float(trained.get("validation_split", 0.1))
    except ValueError as e:
        raise UsageError(f"bad --seed or --validation_split in the model's flags.txt ({e})") from e
    config = data_flags.data_config_from_flags(seed)
    inherited = {}
    for name in INHERITED_DATA_FLAGS:
        if not flags.FLAGS[name].present and trained.get(name):
            inherited[name] = split_fraction if name == "validation_split" else trained[name]
    return dataclasses.replace(config, **inherited)


def main(argv: list[str]) -> None:
    from app import data, evaluation
    from common.errors import UsageError
    from models.bundle import load_model_bundle

    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    model_path = _MODEL.value
    bundle = load_model_bundle(model_path)
    config = data_config(model_path)
    # Unless train is evaluated, load one training image only: the hold-out is chosen
    # before the limit, and decoding 45,000 unused images would cost most of the run.
    load_config = config if _SPLIT.value == "train" else dataclasses.replace(config, train_limit=1)
    splits = data.load(load_config)
    evaluation.check_class_names(bundle.class_names, splits.class_names, splits.train.origin)
    split, examples, note = evaluation.choose_split(splits, _SPLIT.value)
    if note:
        print(f"note: {note}", file=sys.stderr)
    dataset = data.eval_dataset(examples, bundle.preprocessing, _BATCH_SIZE.value)
    keep = evaluation.sample_indices(examples.num_examples)
    logits, labels, kept = evaluation.predict_logits(
        bundle.model, dataset, keep, verbose=_VERBOSE.value, total=examples.num_examples
    )
    result = evaluation.compute_metrics(logits, labels, bundle.class_names, split)
    output_dir = _OUTPUT_DIR.value or os.path.dirname(os.path.abspath(model_path))
    paths = evaluation.write_outputs(
        result,
        output_dir,
        images=bundle.preprocessing.invert(np.stack([kept[i] for i in keep])),
        labels=[labels[i] for i in keep],
        predictions=[int(logits[i].argmax()) for i in keep],
        extra={
            "model": os.path.abspath(model_path),
            "requested_split": _SPLIT.value,
            "data_source": splits.source,
            "data_origin": examples.origin,
            "data_config": dataclasses.asdict(config),
        },
    )
    print(evaluation.format_report(result))
    print(f"wrote {paths['json']}, {paths['confusion']}, {paths['predictions']}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
