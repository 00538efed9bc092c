r"""Exports a trained model for TF Serving, phones and ONNX Runtime, and checks each format.

Writes under --export_dir (default: export/ beside the model):
- saved_model/<version>/: the next integer version (existing versions are left alone);
  saved_model/ is TF Serving's --model_base_path;
- model_float32.tflite, model_float16.tflite, model_dynamic_int8.tflite, model_int8.tflite,
  each with TFLite metadata (labels, input normalisation);
- model.onnx (ONNX Runtime, Triton, OpenVINO);
- labels.txt, preprocessing.json;
- report.json + report.md (size, batch-1 latency and agreement with the Keras model on real
  images, for every format) and model_card.md (data, training flags, accuracy, formats).

Real images: a stratified sample of the training split calibrates model_int8.tflite; another of
the test split (or else the validation split held out of train, with the training run's seed
and fraction) measures agreement. They come from --representative_data, or else from the data
the model was trained on (--dataset/--data_dir in the flags.txt beside the model).

Usage:

    python -m app.export --model=runs/cpu_quick/best.keras \
        --representative_data=~/data/cifar10

    # only the SavedModel: it lands in /srv/models/resnet/saved_model/<N>/, so TF Serving
    # runs with --model_base_path=/srv/models/resnet/saved_model
    python -m app.export --model=runs/cpu_quick/best.keras --formats=saved_model \
        --export_dir=/srv/models/resnet

    # into a bucket (docs/buckets.md): TF Serving's --model_base_path=gs://b/resnet/saved_model
    python -m app.export --model=gs://b/runs/r1/best.keras --export_dir=gs://b/resnet
"""

from __future__ import annotations

from absl import flags

from app import cli, data_flags
from export import FORMATS, TFLITE_FORMATS

DEFAULT_FORMATS = ",".join(FORMATS)

_MODEL: flags.FlagHolder[str]
_EXPORT_DIR: flags.FlagHolder[str]
_FORMATS: flags.FlagHolder[str]
_REPRESENTATIVE_DATA: flags.FlagHolder[str]
_NUM_CALIBRATION: flags.FlagHolder[int]
_NUM_EVALUATION: flags.FlagHolder[int]
_AUTHOR: flags.FlagHolder[str]
_MODEL_VERSION: flags.FlagHolder[str]


def define_flags() -> None:
    """Defines this program's flags."""
    global _MODEL, _EXPORT_DIR, _FORMATS, _REPRESENTATIVE_DATA, _NUM_CALIBRATION, _NUM_EVALUATION
    global _AUTHOR, _MODEL_VERSION
    _MODEL = flags.DEFINE_string(
        "model", None, "The .keras model (labels.txt and preprocessing.json beside it)."
    )
    _EXPORT_DIR = flags.DEFINE_string(
        "export_dir",
        None,
        "Output folder, local or in a bucket (gs://...); default: export/ beside --model.",
    )
    _FORMATS = flags.DEFINE_string(
        "formats",
        DEFAULT_FORMATS,
        "Comma-separated formats to write: saved_model (TF Serving, a new integer version), "
        f"the .tflite models {', '.join(TFLITE_FORMATS)} (with TFLite metadata: labels and "
        "input normalisation for MediaPipe / Android), and onnx (model.onnx).",
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
    _AUTHOR = flags.DEFINE_string("author", "", "The author field of the .tflite metadata.")
    _MODEL_VERSION = flags.DEFINE_string(
        "model_version", "", "The version field of the .tflite metadata; default: export time."
    )
    flags.mark_flag_as_required("model")
    data_flags.define_max_pixels_flag()
    flags.declare_key_flag("max_pixels")  # listed by --help


def main(argv: list[str]) -> None:
    from app import export_lib
    from export import all_formats

    cli.no_arguments(argv)
    cli.show_progress_of("export", export_lib.__name__)
    export_lib.export_model(
        export_lib.ExportJob(
            model=_MODEL.value,
            export_dir=_EXPORT_DIR.value,
            formats=all_formats.parse_formats(_FORMATS.value),
            data=data_flags.training_data_config(_MODEL.value, _REPRESENTATIVE_DATA.value),
            num_calibration=_NUM_CALIBRATION.value,
            num_evaluation=_NUM_EVALUATION.value,
            author=_AUTHOR.value,
            version=_MODEL_VERSION.value,
            max_pixels=data_flags.max_pixels_from_flags(),
        )
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
