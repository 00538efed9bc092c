"""Classify image files with a trained or exported model: top-k classes with probabilities.

--model takes a `.keras` file (with labels.txt and preprocessing.json beside it), a
SavedModel folder (a version folder, or a TF Serving base path: its highest integer version
is used), a `.tflite` file (class names from its metadata; labels.txt beside it for exports
older than the metadata) or `model.onnx` (labels.txt beside it). Any image size; JPEG, PNG,
GIF, BMP or WebP, grayscale or RGBA. A file that is not an image is reported on stderr and
the others are still answered; the exit code is then 1.

Usage:

    python -m app.predict --model=runs/cpu_quick/best.keras cat.jpg dog.png
    python -m app.predict --model=runs/cpu_quick/export/saved_model --top_k=5 --json cat.jpg
    python -m app.predict --model=runs/cpu_quick/export/model_int8.tflite cat.jpg
    python -m app.predict --model=runs/cpu_quick/export/model.onnx cat.jpg
"""

from __future__ import annotations

import sys

from absl import flags

from app import cli, data_flags

_MODEL: flags.FlagHolder[str]
_TOP_K: flags.FlagHolder[int]
_JSON: flags.FlagHolder[bool]


def define_flags() -> None:
    """Defines this program's flags (called once, before `cli.run`)."""
    global _MODEL, _TOP_K, _JSON
    _MODEL = flags.DEFINE_string(
        "model",
        None,
        "A .keras file, a SavedModel folder (a version or the versioned base path), a .tflite "
        "or a model.onnx (what app.export writes).",
    )
    _TOP_K = flags.DEFINE_integer("top_k", 3, "Classes to print per image.", lower_bound=1)
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON document instead of a table.")
    flags.mark_flag_as_required("model")
    data_flags.define_max_pixels_flag()
    flags.declare_key_flag("max_pixels")  # listed by --help


def main(argv: list[str]) -> None:
    from app import predict_lib

    max_pixels = data_flags.max_pixels_from_flags()
    if not predict_lib.predict_files(_MODEL.value, argv[1:], _TOP_K.value, _JSON.value, max_pixels):
        sys.exit(1)  # some file was not an image; the others were answered


if __name__ == "__main__":
    define_flags()
    cli.run(main)
