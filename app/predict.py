"""Classify image files with a trained or exported model: top-k classes with probabilities.

--model takes a `.keras` file (with labels.txt and preprocessing.json beside it), a
SavedModel folder (a version folder, or a TF Serving base path: its highest integer version
is used) or a `.tflite` file (labels.txt beside it). Any image size; JPEG, PNG, GIF, BMP or
WebP, grayscale or RGBA. A file that is not an image is reported on stderr and the others are
still answered; the exit code is then 1.

Usage:

    python -m app.predict --model=runs/cpu_quick/best.keras cat.jpg dog.png
    python -m app.predict --model=runs/cpu_quick/export/saved_model --top_k=5 --json cat.jpg
    python -m app.predict --model=runs/cpu_quick/export/model_int8.tflite cat.jpg
"""

from __future__ import annotations

import json
import sys

from absl import flags

from app import cli

_MODEL: flags.FlagHolder[str]
_TOP_K: flags.FlagHolder[int]
_JSON: flags.FlagHolder[bool]


def define_flags() -> None:
    """Defines this program's flags (called once, before `cli.run`)."""
    global _MODEL, _TOP_K, _JSON
    _MODEL = flags.DEFINE_string(
        "model", None, "A .keras file, a SavedModel folder (or versioned base path) or a .tflite."
    )
    _TOP_K = flags.DEFINE_integer("top_k", 3, "Classes to print per image.", lower_bound=1)
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON document instead of a table.")
    flags.mark_flag_as_required("model")


def main(argv: list[str]) -> None:
    from app import prediction
    from common.errors import UsageError

    paths = argv[1:]
    if not paths:
        raise UsageError("no images given: python -m app.predict --model=MODEL IMAGE [IMAGE ...]")
    predictor = prediction.load_predictor(_MODEL.value)
    results = prediction.classify_files(predictor, paths, _TOP_K.value)
    for result in results:
        if result.error is not None:
            print(f"error: {result.error}", file=sys.stderr)
    if _JSON.value:
        document = {
            "model": predictor.path,
            "format": predictor.kind,
            "results": [r.to_dict() for r in results],
        }
        print(json.dumps(document, indent=2))
    else:
        print(prediction.format_results(results))
    if any(r.error is not None for r in results):
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
