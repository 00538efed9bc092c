"""`model_card.md`: what the model is for, how it was made and how well each format does.

Written by `export.all_formats.export_all` from the export report (`report.json`: accuracy on
the evaluated images, per class, and size / latency / agreement / accuracy per format) and
the training run's flags (`flags.txt` beside the model), so the card never disagrees with
the report.
"""

from __future__ import annotations

from common import files

MODEL_CARD = "model_card.md"
# What each format is for, in the card's table.
_FORMAT_USE = {
    "saved_model": "TF Serving (REST/gRPC)",
    "float32": "LiteRT / MediaPipe, reference accuracy",
    "float16": "LiteRT GPU delegate, half the size",
    "dynamic_int8": "LiteRT CPU, int8 weights",
    "int8": "LiteRT CPU/NPU/Edge TPU, integer only",
    "onnx": "ONNX Runtime, Triton, OpenVINO",
}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def to_markdown(report: dict, class_names: list[str], training_flags: str | None) -> str:
    """The card's text.

    Args:
        report: what `export_all` returns (report.json).
        class_names: the labels, index order.
        training_flags: the training run's flags.txt, or None when it is not known.
    """
    size = report["image_size"]
    evaluation, calibration = report.get("evaluation"), report.get("calibration")
    lines = [
        f"# Model card: {report.get('model_name', 'model')} "
        f"({files.basename(files.dirname(report['model']))})",
        "",
        f"Image classifier, {len(class_names)} classes: {', '.join(class_names)}. "
        f"Exported {report['created']} from `{report['model']}`.",
        "",
        "## Intended use",
        "",
        f"Classifying photos into one of the {len(class_names)} classes above: every format "
        f"takes RGB pixels 0..255 resized (bilinear) to {size}x{size} and returns softmax "
        "probabilities, one per class of labels.txt (normalisation and softmax are inside).",
        "",
        "## Limits",
        "",
        "- It always answers one of its classes: an image of anything else gets a confident "
        "wrong label (no out-of-distribution detection).",
        f"- It sees {size}x{size} pixels: small objects and fine detail are lost.",
        "- Accuracy below is measured on a sample of the held-out split named there, from the "
        "training data's distribution; other cameras, lighting or framing will do worse.",
        "",
        "## Data and training",
        "",
    ]
    if evaluation:
        lines.append(f"- Evaluated on {evaluation['images']} images from `{evaluation['source']}`.")
    if calibration:
        lines.append(
            f"- int8 calibrated on {calibration['images']} images from `{calibration['source']}`."
        )
    if training_flags:
        flags = [line for line in training_flags.splitlines() if line.startswith("--")]
        lines += ["- Training recipe (flags.txt of the run):", "", "```", *flags, "```"]
    else:
        lines.append("- Training flags unknown (no flags.txt beside the model).")
    lines += ["", "## Accuracy", ""]
    if evaluation and "keras_accuracy" in evaluation:
        lines += [
            f"Keras model, top-1 on the {evaluation['images']} evaluated images: "
            f"{_pct(evaluation['keras_accuracy'])}.",
            "",
            "| class | top-1 accuracy |",
            "| --- | ---: |",
        ]
        per_class = evaluation.get("keras_per_class_accuracy") or []
        lines += [f"| {n} | {_pct(a)} |" for n, a in zip(class_names, per_class, strict=False)]
    else:
        lines.append("Not measured: no labelled held-out images (--representative_data).")
    lines += [
        "",
        "## Formats",
        "",
        "Agreement: share of images whose top-1 class is Keras'. Latency: batch 1, median, on "
        f"{report['environment']['cpu_count']} CPUs (see report.md).",
        "",
        "| format | file | use | size | latency ms | top-1 agreement | accuracy |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for entry in report["formats"]:
        lines.append(
            f"| {entry['format']} | `{entry['path']}` | {_FORMAT_USE.get(entry['format'], '')} "
            f"| {entry['size_bytes'] / 2**20:.2f} MiB | {entry['latency']['median_ms']:.2f} "
            f"| {_pct(entry.get('top1_agreement'))} | {_pct(entry.get('accuracy'))} |"
        )
    return "\n".join(lines) + "\n"


def write_model_card(
    export_dir: str, report: dict, class_names: list[str], training_flags: str | None
) -> str:
    """Writes `model_card.md` atomically; returns its path."""
    path = files.join(export_dir, MODEL_CARD)
    files.write_text(path, to_markdown(report, class_names, training_flags))
    return path
