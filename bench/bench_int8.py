"""Full-int8 calibration: TensorFlow's recorded ranges vs the exact ones `app.export` uses.

For a trained model and real images: converts to `model_int8.tflite` once with the converter's
calibration as it is and once with exact activation ranges (`export.tflite`; the converter
records some inputs of in-place ops with their output's range, tensorflow/tensorflow#127842),
on `--subsets` disjoint sets of `--num_calibration` training images, and reports top-1
agreement with the Keras model on `--num_evaluation` held-out images (the export report's
measure), plus the mean L1 distance of the probabilities (less noisy than flips).

Usage (about 20 s per conversion for ResNet-50 at 32x32 on the 2-core machine):
    python -m bench.bench_int8 --model=runs/r50_ft/best.keras \\
        --data_dir=../shared/data/cifar10 --subsets=4
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
from absl import flags

from app import cli
from bench import common


@dataclasses.dataclass(frozen=True)
class Row:
    """One int8 conversion compared with Keras."""

    subset: int
    calibration: str  # "converter" or "exact"
    agreement: float
    disagreements: int
    mean_l1: float
    accuracy: float | None


def measure(
    model_path: str,
    data_dir: str,
    num_calibration: int = 200,
    subsets: int = 4,
    num_evaluation: int = 2000,
    log=print,
) -> list[Row]:
    """Both calibrations on each calibration subset; see the module docstring."""
    from app.common import load_model_bundle
    from app.export import data_config
    from export import images, report, tflite

    bundle = load_model_bundle(model_path)
    size = bundle.preprocessing.image_size
    calibration, evaluation = images.calibration_and_evaluation(
        data_config(model_path, data_dir),
        bundle.class_names,
        size,
        num_calibration * subsets,
        num_evaluation,
    )
    reference = report.keras_probabilities(bundle.model, bundle.preprocessing, evaluation.images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        path = os.path.join(tmp, tflite.filename("int8"))
        for subset in range(subsets):
            part = calibration.images[subset * num_calibration : (subset + 1) * num_calibration]
            for name, exact in (("converter", False), ("exact", True)):
                blob = tflite.convert(
                    bundle.model, bundle.preprocessing, ["int8"], part, exact_int8_ranges=exact
                )["int8"]
                with open(path, "wb") as f:
                    f.write(blob)
                probabilities = tflite.TFLiteClassifier(path).predict(evaluation.images)
                found = report.agreement(reference, probabilities, evaluation.labels)
                row = Row(
                    subset=subset,
                    calibration=name,
                    agreement=found["top1_agreement"],
                    disagreements=found["top1_disagreements"],
                    mean_l1=float(np.abs(reference - probabilities).sum(-1).mean()),
                    accuracy=found.get("accuracy"),
                )
                log(row)
                rows.append(row)
    return rows


def report_table(rows: list[Row]) -> str:
    """Markdown: one line per calibration subset, converter vs exact side by side."""
    lines = [
        "| calibration images | converter's ranges: agreement | exact ranges: agreement "
        "| mean L1, converter -> exact |",
        "| --- | ---: | ---: | ---: |",
    ]
    by_subset: dict[int, dict[str, Row]] = {}
    for row in rows:
        by_subset.setdefault(row.subset, {})[row.calibration] = row
    for subset, pair in sorted(by_subset.items()):
        old, new = pair["converter"], pair["exact"]
        lines.append(
            f"| set {subset + 1} | {100 * old.agreement:.2f}% ({old.disagreements} differ) "
            f"| {100 * new.agreement:.2f}% ({new.disagreements} differ) "
            f"| {old.mean_l1:.4f} -> {new.mean_l1:.4f} |"
        )
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("model", None, "A trained best.keras.", required=True)
    flags.DEFINE_string("data_dir", common.shared_cifar10_dir(), "Its real images.")
    flags.DEFINE_integer("num_calibration", 200, "Images per calibration set.", lower_bound=1)
    flags.DEFINE_integer("subsets", 4, "Disjoint calibration sets.", lower_bound=1)
    flags.DEFINE_integer("num_evaluation", 2000, "Held-out images compared.", lower_bound=1)


def main(argv: list[str]) -> None:
    del argv
    rows = measure(
        flags.FLAGS.model,
        flags.FLAGS.data_dir,
        flags.FLAGS.num_calibration,
        flags.FLAGS.subsets,
        flags.FLAGS.num_evaluation,
    )
    print(report_table(rows))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
