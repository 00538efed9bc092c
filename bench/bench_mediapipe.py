"""MediaPipe's ImageClassifier on an export's `.tflite` files, against LiteRT and Keras.

For an `app.export` output folder: picks `--per_class` real images a class (seeded, stratified;
exactly that many a class when the classes are the same size, as in CIFAR-10) from the
held-out images `app.export` measures on (the test split, else the validation split held out
of train with the training run's seed and fraction), and classifies them with each `.tflite`
file three ways: MediaPipe Tasks' `ImageClassifier` (the C++ task Android and iOS apps run,
reading the labels and normalisation from the metadata; `export.metadata.mediapipe_top1`),
LiteRT (`export.tflite.TFLiteClassifier`) and the Keras model the export came from
(report.json names it; `--model` overrides). Prints, per file, how often MediaPipe's top-1 is
LiteRT's and Keras', the largest difference between MediaPipe's score and LiteRT's
probability, and whether every category came back named with its class.

Usage (6 s in all for 50 images of a ResNet-18 at 32x32, --per_class=5, on the busy 2-core
machine; MediaPipe runs one image at a time):
    python -m app.export --model=runs/measure/best.keras \\
        --representative_data=~/data/cifar10 --num_evaluation=500
    python -m bench.bench_mediapipe --export_dir=runs/measure/export \\
        --data_dir=~/data/cifar10 --per_class=30
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from absl import flags

from app import cli
from bench import common


@dataclasses.dataclass(frozen=True)
class Row:
    """One `.tflite` file classified by MediaPipe, LiteRT and Keras."""

    file: str
    images: int
    same_as_litert: int  # images where MediaPipe's top-1 is LiteRT's
    same_as_keras: int
    litert_as_keras: int
    max_score_diff: float  # |MediaPipe's score - LiteRT's probability of that class|
    all_named: bool  # every category named, with its class's name


def keras_model_of(export_dir: str, model: str | None = None) -> str:
    """The `.keras` file an export came from: `model`, else what its report.json names.

    Raises:
        UsageError: no report.json (not an `app.export` folder) or the model is gone.
    """
    from common.errors import UsageError

    if model is None:
        path = os.path.join(export_dir, "report.json")
        if not os.path.isfile(path):
            raise UsageError(
                f"{path} not found: --export_dir must be a python -m app.export output folder"
            )
        with open(path) as f:
            model = json.load(f).get("model")
        if not model:
            raise UsageError(f"{path} names no model: pass --model=RUN/best.keras")
    if not os.path.isfile(model):
        raise UsageError(f"Keras model not found: {model}; pass --model=RUN/best.keras")
    return model


def measure(export_dir: str, data_dir: str, per_class: int = 30, model: str | None = None):
    """Rows for every `.tflite` file of `export_dir`, and the images' description.

    Raises:
        UsageError: no `.tflite` file, no report.json or model (`keras_model_of`).
        app.data.DataError: the real images cannot be read.
    """
    from app import data_flags, export_lib
    from common.errors import UsageError
    from export import TFLITE_FORMATS, metadata, report, tflite
    from models.bundle import load_model_bundle

    if not os.path.isdir(export_dir):
        raise UsageError(f"export folder not found: {export_dir}; run python -m app.export first")
    files = [
        os.path.join(export_dir, tflite.filename(fmt))
        for fmt in TFLITE_FORMATS
        if os.path.isfile(os.path.join(export_dir, tflite.filename(fmt)))
    ]
    if not files:
        raise UsageError(
            f"no .tflite file in {export_dir}: export with python -m app.export "
            "--formats=float32,float16,dynamic_int8,int8"
        )
    bundle = load_model_bundle(keras_model_of(export_dir, model))
    classes = bundle.class_names
    # The held-out images app.export compares on, `per_class` a class (stratified).
    _, sample = export_lib.calibration_and_evaluation(
        data_flags.training_data_config(bundle.path, data_dir),
        classes,
        bundle.preprocessing.image_size,
        1,
        per_class * len(classes),
    )
    pixels = sample.images
    counts = "labels unknown"
    if sample.labels is not None:
        found = np.bincount(sample.labels, minlength=len(classes))
        counts = f"{found.min()}" if found.min() == found.max() else f"{found.min()}-{found.max()}"
        counts += " a class"
    described = f"{len(pixels)} images ({counts}) from {sample.source}, model {bundle.path}"
    keras_top = report.keras_probabilities(bundle.model, bundle.preprocessing, pixels).argmax(-1)
    rows = []
    for path in files:
        probabilities = tflite.TFLiteClassifier(path).predict(pixels)
        top = metadata.mediapipe_top1(path, pixels)
        litert_top = probabilities.argmax(-1)
        rows.append(
            Row(
                file=os.path.basename(path),
                images=len(pixels),
                same_as_litert=int((top.indices == litert_top).sum()),
                same_as_keras=int((top.indices == keras_top).sum()),
                litert_as_keras=int((litert_top == keras_top).sum()),
                max_score_diff=float(
                    np.abs(top.scores - probabilities[np.arange(len(pixels)), top.indices]).max()
                ),
                all_named=top.names == [classes[i] for i in top.indices],
            )
        )
    return rows, described


def report_table(rows: list[Row]) -> str:
    """Markdown: one line per `.tflite` file."""

    def share(count: int, total: int) -> str:
        return f"{100 * count / total:.2f}% ({count}/{total})"

    return common.table(
        [
            "file",
            "MediaPipe = LiteRT (top-1)",
            "MediaPipe = Keras (top-1)",
            "LiteRT = Keras (top-1)",
            "max score diff vs LiteRT",
            "all categories named",
        ],
        [
            (
                r.file,
                share(r.same_as_litert, r.images),
                share(r.same_as_keras, r.images),
                share(r.litert_as_keras, r.images),
                f"{r.max_score_diff:.2e}",
                "yes" if r.all_named else "no",
            )
            for r in rows
        ],
    )


def define_flags() -> None:
    flags.DEFINE_string("export_dir", None, "A python -m app.export output folder.", required=True)
    flags.DEFINE_string("data_dir", common.default_data_dir(), "Its real images.")
    flags.DEFINE_integer("per_class", 30, "Held-out images a class.", lower_bound=1)
    flags.DEFINE_string("model", None, "The .keras it came from; unset: report.json's model.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    rows, described = measure(
        flags.FLAGS.export_dir, flags.FLAGS.data_dir, flags.FLAGS.per_class, flags.FLAGS.model
    )
    print(described)
    print(report_table(rows))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
