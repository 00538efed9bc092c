"""Size, batch-1 latency and agreement with Keras of every exported format.

`report.json` holds the figures; `report.md` the same as a table for people.
Agreement is measured on the same uint8 pixels for every format: top-1 agreement with the
Keras model, the largest absolute difference of any probability, and top-1 accuracy when the
images' labels are known.
"""

from __future__ import annotations

import json
import os
import platform
import time

import keras
import numpy as np
import tensorflow as tf

from common import files
from export import ONNX, SAVED_MODEL, graph, onnx, saved_model, tflite
from models.preprocessing import Preprocessing

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def keras_probabilities(
    model: keras.Model, preprocessing: Preprocessing, images: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """The reference: softmax of the Keras model's logits on uint8 images [n, S, S, 3]."""
    model = graph.float32_model(model)
    out = []
    for start in range(0, len(images), batch_size):
        pixels = tf.constant(images[start : start + batch_size], tf.float32)
        out.append(graph.probabilities(model, preprocessing, pixels).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def agreement(
    reference: np.ndarray, probabilities: np.ndarray, labels: np.ndarray | None = None
) -> dict:
    """Top-1 agreement with `reference`, max |probability difference|, accuracy if labelled."""
    same = reference.argmax(-1) == probabilities.argmax(-1)
    ranked = np.sort(reference, axis=-1)
    lead = ranked[:, -1] - ranked[:, -2] if reference.shape[-1] > 1 else ranked[:, -1]
    result = {
        "images": len(reference),
        "top1_agreement": float(same.mean()) if len(same) else None,
        "top1_disagreements": int((~same).sum()),
        # How clear a Keras decision the format overturned: the largest lead of Keras' top-1
        # over its runner-up among the images whose top-1 changed (0 when none did).
        "max_overturned_lead": float(lead[~same].max()) if (~same).any() else 0.0,
        "max_abs_prob_diff": float(np.abs(reference - probabilities).max()) if len(same) else None,
    }
    if labels is not None and len(labels) and (labels >= 0).all():
        result["accuracy"] = float((probabilities.argmax(-1) == labels).mean())
    return result


def accuracies(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Keras' top-1 accuracy on the labelled images, overall and per class (None: no images)."""
    right = probabilities.argmax(-1) == labels
    per_class = [
        float(right[labels == k].mean()) if (labels == k).any() else None
        for k in range(num_classes)
    ]
    return {"keras_accuracy": float(right.mean()), "keras_per_class_accuracy": per_class}


def _latency(seconds: np.ndarray) -> dict:
    ms = 1000.0 * np.asarray(seconds)
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}


def file_size(path: str) -> int:
    """Bytes of a file, or of every file under a folder."""
    if files.isfile(path):
        return files.size(path)
    return sum(
        files.size(files.join(root, name)) for root, _, names in files.walk(path) for name in names
    )


def measure_file(
    classifier: tflite.TFLiteClassifier | onnx.ONNXClassifier,
    images: np.ndarray,
    reference: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict:
    """Size, batch-1 latency and agreement of a single-file model run by its classifier
    (`.tflite`: LiteRT with XNNPACK; `model.onnx`: ONNX Runtime on the CPU; 2 threads each).

    Without `reference` (no real images) only size and latency are measured.
    """
    # A few unmeasured calls first: XNNPACK packs its weights on the first invoke.
    classifier.predict(images[:3])
    probabilities, seconds = classifier.predict_timed(images)
    return {
        "size_bytes": file_size(classifier.path),
        "latency": _latency(seconds),
        **(agreement(reference, probabilities, labels) if reference is not None else {}),
    }


def measure_saved_model(
    path: str,
    images: np.ndarray,
    reference: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    latency_runs: int = 30,
) -> dict:
    """Size, batch-1 latency (TensorFlow, `serving_default`) and agreement of a SavedModel."""
    served = saved_model.load_serving(path)
    probabilities = np.concatenate(
        [served.predict(images[i : i + 64])["probabilities"] for i in range(0, len(images), 64)]
    )
    one = images[:1]
    for _ in range(3):
        served.predict(one)
    seconds = []
    for _ in range(latency_runs):
        start = time.perf_counter()
        served.predict(one)
        seconds.append(time.perf_counter() - start)
    return {
        "size_bytes": file_size(path),
        "latency": _latency(np.array(seconds)),
        **(agreement(reference, probabilities, labels) if reference is not None else {}),
    }


def environment() -> dict:
    """Where the latencies were measured."""
    from importlib.metadata import version

    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "ai_edge_litert": version("ai-edge-litert"),
        "onnxruntime": version("onnxruntime"),
        "tflite_threads": tflite.NUM_THREADS,
    }


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _lead(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def to_markdown(report: dict) -> str:
    """`report.md`: the figures as a table."""
    lines = [
        "# Export report",
        "",
        f"Model: `{report['model']}` ({report['num_classes']} classes, input "
        f"{report['image_size']}x{report['image_size']}). Exported {report['created']}.",
        "",
    ]
    evaluation = report.get("evaluation")
    if evaluation:
        lines += [
            f"Agreement with Keras on {evaluation['images']} real images from "
            f"`{evaluation['source']}`; int8 calibrated on {report['calibration']['images']} "
            f"other images from `{report['calibration']['source']}`."
            if report.get("calibration")
            else f"Agreement with Keras on {evaluation['images']} real images from "
            f"`{evaluation['source']}`.",
            "",
        ]
        if "keras_accuracy" in evaluation:
            lines += [f"Keras top-1 accuracy on them: {_pct(evaluation['keras_accuracy'])}.", ""]
    else:
        lines += ["Agreement not measured: no real images (--representative_data).", ""]
    env = report["environment"]
    lines += [
        "Largest lead overturned: among the images whose top-1 class differs from Keras', the "
        "largest gap between Keras' top-1 probability and its runner-up (quantization flips "
        "near-ties only when this is small).",
        "",
        f"Latency: batch 1, median (p90), on {env['cpu_count']} CPUs ({env['processor']}); "
        f"LiteRT {env['ai_edge_litert']} with XNNPACK and {env['tflite_threads']} threads, "
        f"SavedModel through TensorFlow {env['tensorflow']}"
        + (f", ONNX through ONNX Runtime {env['onnxruntime']}." if "onnxruntime" in env else "."),
        "",
        "| format | file | size | latency ms | top-1 agreement | max abs prob diff "
        "| largest lead overturned | accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in report["formats"]:
        latency = entry["latency"]
        diff = entry.get("max_abs_prob_diff")
        agree = entry.get("top1_agreement")
        lines.append(
            f"| {entry['format']} | `{entry['path']}` | {_mib(entry['size_bytes'])} | "
            f"{latency['median_ms']:.2f} ({latency['p90_ms']:.2f}) | "
            f"{_pct(agree)}"
            + (f" ({entry['top1_disagreements']} differ)" if agree is not None else "")
            + f" | {'-' if diff is None else f'{diff:.2e}'}"
            + f" | {_lead(entry.get('max_overturned_lead'))} | {_pct(entry.get('accuracy'))} |"
        )
    return "\n".join(lines) + "\n"


def write_report(export_dir: str, report: dict) -> tuple[str, str]:
    """Writes `report.json` and `report.md` atomically; returns their paths."""
    json_path = files.join(export_dir, REPORT_JSON)
    md_path = files.join(export_dir, REPORT_MD)
    files.write_text(json_path, json.dumps(report, indent=2) + "\n")
    files.write_text(md_path, to_markdown(report))
    return json_path, md_path


def measure(
    fmt: str,
    path: str,
    images: np.ndarray,
    reference: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict:
    """The figures of the exported format `fmt` (one of `export.FORMATS`) written at `path`."""
    if fmt == SAVED_MODEL:
        return measure_saved_model(path, images, reference, labels)
    classifier = onnx.ONNXClassifier(path) if fmt == ONNX else tflite.TFLiteClassifier(path)
    return measure_file(classifier, images, reference, labels)
