r"""Exports a trained model for TF Serving (SavedModel) and phones (.tflite), and checks each.

Writes under --export_dir (default: export/ beside the model): saved_model/<version>/ (the next
integer version; existing versions are left alone), model_float32.tflite,
model_float16.tflite, model_dynamic_int8.tflite, model_int8.tflite, labels.txt,
preprocessing.json, and report.json + report.md (size, batch-1 latency and agreement with the
Keras model on real images, for every format).

Real images: a stratified sample of the training split calibrates model_int8.tflite; another of
the test split (or else the validation split held out of train, with the training run's seed
and fraction) measures agreement. They come from --representative_data, or else from the data
the model was trained on (--dataset/--data_dir in the flags.txt beside the model).

Usage:

    python -m app.export --model=runs/cpu_quick/best.keras \
        --representative_data=../shared/data/cifar10

    # only the SavedModel, into a TF Serving model base path of your choice:
    python -m app.export --model=runs/cpu_quick/best.keras --formats=saved_model \
        --export_dir=/srv/models/resnet
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging

from app import cli

DEFAULT_FORMATS = "saved_model,float32,float16,dynamic_int8,int8"
TRAINING_FLAGS_FILE = "flags.txt"

_MODEL: flags.FlagHolder[str]
_EXPORT_DIR: flags.FlagHolder[str]
_FORMATS: flags.FlagHolder[str]
_REPRESENTATIVE_DATA: flags.FlagHolder[str]
_NUM_CALIBRATION: flags.FlagHolder[int]
_NUM_EVALUATION: flags.FlagHolder[int]


def define_flags() -> None:
    """Defines this program's flags."""
    global _MODEL, _EXPORT_DIR, _FORMATS, _REPRESENTATIVE_DATA, _NUM_CALIBRATION, _NUM_EVALUATION
    _MODEL = flags.DEFINE_string(
        "model", None, "The .keras model (labels.txt and preprocessing.json beside it)."
    )
    _EXPORT_DIR = flags.DEFINE_string(
        "export_dir", None, "Output folder; default: export/ beside --model."
    )
    _FORMATS = flags.DEFINE_string(
        "formats",
        DEFAULT_FORMATS,
        "Comma-separated formats to write: saved_model (TF Serving, a new integer version) "
        "and the .tflite models float32, float16, dynamic_int8, int8.",
    )
    _REPRESENTATIVE_DATA = flags.DEFINE_string(
        "representative_data",
        None,
        "Real images: an image folder (<class>/*.jpg, or train/<class>/... and test/...), "
        "cifar-10-batches-py or a TFDS data dir. Calibrates model_int8.tflite (train split) "
        "and measures agreement (test, else validation split). Default: the training run's "
        "data (flags.txt beside the model).",
    )
    _NUM_CALIBRATION = flags.DEFINE_integer(
        "num_calibration", 200, "Training images that calibrate the int8 model.", lower_bound=1
    )
    _NUM_EVALUATION = flags.DEFINE_integer(
        "num_evaluation",
        500,
        "Held-out images on which every format is compared with the Keras model; 0: none.",
        lower_bound=0,
    )
    flags.mark_flag_as_required("model")


def data_config(model_path: str, representative_data: str | None):
    """The real images' `DataConfig`: --representative_data or the training run's data,
    with the training run's seed and validation fraction (so its hold-out is the same);
    None when neither is known."""
    from app.data import DataConfig
    from app.evaluation import read_flagfile
    from common.errors import UsageError

    trained = read_flagfile(
        os.path.join(os.path.dirname(os.path.abspath(model_path)), TRAINING_FLAGS_FILE)
    )
    if representative_data is None and not trained:
        return None
    try:
        seed = int(trained.get("seed", 0))
        validation_split = float(trained.get("validation_split", 0.1))
    except ValueError as e:
        raise UsageError(f"bad --seed or --validation_split in the model's flags.txt ({e})") from e
    return DataConfig(
        dataset=trained.get("dataset") or "cifar10",
        data_dir=representative_data or trained.get("data_dir") or None,
        validation_split=validation_split,
        seed=seed,
    )


def main(argv: list[str]) -> None:
    from common.errors import UsageError
    from export import exporter, report
    from models.bundle import load_model_bundle

    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # TensorFlow's own INFO lines (one per saved function and asset, through absl and its
    # "tensorflow" logger) would bury this program's progress lines (export.* loggers).
    if not flags.FLAGS["verbosity"].present:  # an explicit --verbosity keeps absl's levels
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
        logging.getLogger("export").setLevel(logging.INFO)
    formats = exporter.parse_formats(_FORMATS.value)
    bundle = load_model_bundle(_MODEL.value)
    export_dir = _EXPORT_DIR.value or os.path.join(
        os.path.dirname(os.path.abspath(_MODEL.value)), "export"
    )
    data = data_config(_MODEL.value, _REPRESENTATIVE_DATA.value)
    if data is None and "int8" not in formats:
        print(
            "note: no --representative_data nor flags.txt: no agreement figures in the report",
            file=sys.stderr,
        )
    result = exporter.export_all(
        bundle,
        exporter.ExportConfig(
            export_dir=export_dir,
            formats=formats,
            data=data,
            num_calibration=_NUM_CALIBRATION.value,
            num_evaluation=_NUM_EVALUATION.value,
        ),
    )
    print(report.to_markdown(result))
    print(f"exported {', '.join(formats)} to {export_dir}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
