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

--model may also be an exported model (what app.export writes): a SavedModel (its base path
`export/saved_model`, or a version folder), a `.tflite` file or `model.onnx`, e.g. to get the
int8 model's accuracy on a whole split. The class names come from the export itself, the data
flags from the training run of the model it was exported from (its report.json names it), and
the files, named after the format (`eval_validation_int8.json`), go into the export folder.

--flip scores each image by the mean of its prediction and its mirror image's (test-time
augmentation, twice the cost); its files are named `*_flip` (`eval_validation_flip.json`).

Usage:

    python -m app.evaluate --model=runs/cpu_quick/best.keras
    python -m app.evaluate --model=runs/cpu_quick/export/model_int8.tflite
    python -m app.evaluate --model=runs/cpu_quick/export/saved_model --split=validation
    python -m app.evaluate --model=runs/cpu_quick/export/model.onnx
    python -m app.evaluate --model=runs/cpu_quick/best.keras --split=validation --flip
    python -m app.evaluate --model=runs/cpu_quick/best.keras --data_dir=~/data/cifar10 \\
        --split=validation --eval_limit=1000 --output_dir=/tmp/eval
"""

from __future__ import annotations

from absl import flags

from app import cli, data, data_flags, evaluate_lib
from app.data import DataConfig

_MODEL: flags.FlagHolder[str]
_SPLIT: flags.FlagHolder[str]
_OUTPUT_DIR: flags.FlagHolder[str]
_BATCH_SIZE: flags.FlagHolder[int]
_SEED: flags.FlagHolder[int]
_VERBOSE: flags.FlagHolder[int]
_FLIP: flags.FlagHolder[bool]


def define_flags() -> None:
    """Defines this program's flags plus the shared data flags."""
    global _MODEL, _SPLIT, _OUTPUT_DIR, _BATCH_SIZE, _SEED, _VERBOSE, _FLIP
    _MODEL = flags.DEFINE_string(
        "model",
        None,
        "The .keras model (labels.txt and preprocessing.json beside it), or an exported "
        "model: a SavedModel folder (base path or version), a .tflite file or model.onnx.",
    )
    _SPLIT = flags.DEFINE_enum(
        "split",
        "test",
        list(data.SPLITS),
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
    _FLIP = flags.DEFINE_bool(
        "flip",
        False,
        "Test-time augmentation: average each image's prediction with its mirror's "
        "(twice the cost; the figures a recipe quotes with it say so).",
    )
    flags.mark_flag_as_required("model")
    data_flags.define_data_flags()
    flags.adopt_module_key_flags(data_flags)  # listed by --help


def data_config(model_path: str) -> DataConfig:
    """The `DataConfig` of the command line, with unset data flags and --seed taken from
    the training run's flags.txt beside the model (or beside the model it was exported from)."""
    trained = data_flags.training_run_flags(evaluate_lib.source_model_path(model_path))
    seed = _SEED.value if _SEED.value is not None else trained.get("seed", 0)
    return data_flags.data_config_from_flags(seed, inherit=trained)


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    evaluate_lib.evaluate(
        evaluate_lib.EvalConfig(
            model=_MODEL.value,
            data=data_config(_MODEL.value),
            split=_SPLIT.value,
            output_dir=_OUTPUT_DIR.value,
            batch_size=_BATCH_SIZE.value,
            verbose=_VERBOSE.value,
            flip=_FLIP.value,
        )
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
