"""Full-int8 calibration: TensorFlow's recorded ranges vs the exact ones `app.export` uses.

For a trained model and real images: converts to `model_int8.tflite` once with the converter's
calibration as it is and once with exact activation ranges (`export.tflite`; the converter
records some inputs of in-place ops with their output's range, tensorflow/tensorflow#127842),
on `--subsets` disjoint sets of `--num_calibration` training images, and reports top-1
agreement with the Keras model on `--num_evaluation` held-out images (the export report's
measure), plus the mean L1 distance of the probabilities (less noisy than flips).

Two figures say where the remaining flips come from: the float32 model with only its weights
rounded to int8 as the converter rounds them (per output channel, symmetric), activations left
float ("weights only"), and how many flips fall on images the Keras model gets wrong.

Usage (about 25 s per conversion for ResNet-50 at 32x32 on the 2-core machine):
    python -m bench.bench_int8 --model=runs/r50_ft2/best.keras \\
        --data_dir=~/data/cifar10 --subsets=4
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
    calibration: str  # "converter", "exact" or "weights only" (not calibrated: subset -1)
    agreement: float
    disagreements: int
    mean_l1: float
    accuracy: float | None
    disagreements_keras_wrong: int | None = None  # of them, on images Keras misclassifies


def round_weights_to_int8(float32_model: bytes) -> bytes:
    """The float model with every conv/dense weight rounded to int8 and back, nothing else.

    Per output channel, symmetric, 127 steps each side: the converter's weight rounding. The
    activations stay float32, so comparing this model with Keras isolates what weight
    rounding alone costs.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    ops = schema.BuiltinOperator
    channel_axis = {ops.CONV_2D: 0, ops.FULLY_CONNECTED: 0, ops.DEPTHWISE_CONV_2D: 3}
    model = flatbuffer_utils.read_model_from_bytearray(float32_model)
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    subgraph = model.subgraphs[0]
    rounded = set()
    for op in subgraph.operators:
        axis = channel_axis.get(codes[op.opcodeIndex])
        if axis is None:
            continue
        tensor = subgraph.tensors[op.inputs[1]]
        buffer = model.buffers[tensor.buffer]
        if (
            tensor.type != schema.TensorType.FLOAT32
            or buffer.data is None  # computed at run time
            or tensor.buffer in rounded  # shared with an op already done
        ):
            continue
        weights = np.frombuffer(bytes(buffer.data), np.float32).reshape(tensor.shape)
        others = tuple(a for a in range(weights.ndim) if a != axis)
        scale = np.abs(weights).max(axis=others, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        weights = (np.clip(np.round(weights / scale), -127, 127) * scale).astype(np.float32)
        buffer.data = np.frombuffer(weights.tobytes(), np.uint8)
        rounded.add(tensor.buffer)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def measure(
    model_path: str,
    data_dir: str,
    num_calibration: int = 200,
    subsets: int = 4,
    num_evaluation: int = 2000,
    log=print,
) -> list[Row]:
    """Both calibrations on each calibration subset; see the module docstring."""
    from app import data_flags, export_lib
    from export import report, tflite
    from models.bundle import load_model_bundle

    bundle = load_model_bundle(model_path)
    size = bundle.preprocessing.image_size
    calibration, evaluation = export_lib.calibration_and_evaluation(
        data_flags.training_data_config(model_path, data_dir),
        bundle.class_names,
        size,
        num_calibration * subsets,
        num_evaluation,
    )
    reference = report.keras_probabilities(bundle.model, bundle.preprocessing, evaluation.images)
    labels = evaluation.labels
    known = labels is not None and (labels >= 0).all()  # None: not the model's classes
    keras_wrong = reference.argmax(-1) != labels if known else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        path = os.path.join(tmp, "model.tflite")

        def compare(blob: bytes, subset: int, name: str) -> None:
            with open(path, "wb") as f:
                f.write(blob)
            probabilities = tflite.TFLiteClassifier(path).predict(evaluation.images)
            found = report.agreement(reference, probabilities, labels)
            flipped = reference.argmax(-1) != probabilities.argmax(-1)
            row = Row(
                subset=subset,
                calibration=name,
                agreement=found["top1_agreement"],
                disagreements=found["top1_disagreements"],
                mean_l1=float(np.abs(reference - probabilities).sum(-1).mean()),
                accuracy=found.get("accuracy"),
                disagreements_keras_wrong=(
                    None if keras_wrong is None else int((flipped & keras_wrong).sum())
                ),
            )
            log(row)
            rows.append(row)

        float32 = tflite.convert(bundle.model, bundle.preprocessing, ["float32"])["float32"]
        compare(round_weights_to_int8(float32), -1, "weights only")
        for subset in range(subsets):
            part = calibration.images[subset * num_calibration : (subset + 1) * num_calibration]
            for name, exact in (("converter", False), ("exact", True)):
                blob = tflite.convert(
                    bundle.model, bundle.preprocessing, ["int8"], part, exact_int8_ranges=exact
                )["int8"]
                compare(blob, subset, name)
    return rows


def report_table(rows: list[Row]) -> str:
    """Markdown: one line per calibration subset, converter vs exact side by side, then the
    weights-only figure."""

    def flips(row: Row) -> str:
        found = f"{100 * row.agreement:.2f}% ({row.disagreements} differ"
        if row.disagreements_keras_wrong is not None:
            found += f", {row.disagreements_keras_wrong} where Keras is wrong"
        return found + ")"

    lines = [
        "| calibration images | converter's ranges: agreement | exact ranges: agreement "
        "| mean L1, converter -> exact |",
        "| --- | ---: | ---: | ---: |",
    ]
    by_subset: dict[int, dict[str, Row]] = {}
    for row in rows:
        by_subset.setdefault(row.subset, {})[row.calibration] = row
    weights_only = by_subset.pop(-1, {}).get("weights only")
    for subset, pair in sorted(by_subset.items()):
        old, new = pair["converter"], pair["exact"]
        lines.append(
            f"| set {subset + 1} | {flips(old)} | {flips(new)} "
            f"| {old.mean_l1:.4f} -> {new.mean_l1:.4f} |"
        )
    if weights_only is not None:
        lines += [
            "",
            f"Weights alone rounded to int8 (activations float): {flips(weights_only)}, "
            f"mean L1 {weights_only.mean_l1:.4f}.",
        ]
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("model", None, "A trained best.keras.", required=True)
    flags.DEFINE_string("data_dir", common.default_data_dir(), "Its real images.")
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
