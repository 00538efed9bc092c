"""`export_all`: every deployable format of a trained model, plus the report that checks them.

Takes a model bundle and image arrays (`export.model_input.Sample`: int8 calibration images and
held-out images to compare every format with Keras on); `app.export_lib` reads them from a
dataset for `python -m app.export`. Everything that can be wrong with the input (formats,
calibration images) is checked before anything is written; each file is then written
atomically, so a failure never leaves half a file or half a SavedModel version behind.

Example:

    from export import all_formats, model_input
    from models.bundle import load_model_bundle
    bundle = load_model_bundle("runs/cpu_quick/best.keras")
    calibration = model_input.Sample(uint8_train_images, None, "my training images")
    config = all_formats.ExportConfig("runs/cpu_quick/export", calibration=calibration)
    report = all_formats.export_all(bundle, config)
"""

from __future__ import annotations

import dataclasses
import datetime
import logging

import numpy as np

from common import files
from common.errors import UsageError
from common.pixel_limits import MAX_PIXELS
from export import (
    FORMATS,
    ONNX,
    SAVED_MODEL,
    TFLITE_FORMATS,
    metadata,
    model_card,
    model_input,
    onnx,
    report,
    saved_model,
    tflite,
)
from models.bundle import ModelBundle, write_labels

log = logging.getLogger(__name__)

SAVED_MODEL_DIR = "saved_model"
# Images for latency alone when no real images are given (latency does not depend on them).
_LATENCY_ONLY_IMAGES = 20


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What to write and which real images to calibrate and compare on.

    Attributes:
        export_dir: output folder; the SavedModel base path is `export_dir/saved_model`.
        formats: some of `export.FORMATS`.
        calibration: training images (uint8 [n, S, S, 3], see `export.model_input`) that
            calibrate the full-int8 model; None: no int8 model.
        evaluation: held-out images on which every format is compared with Keras (labels,
            when they are the model's classes, add accuracy); None: no agreement figures.
        author: the author field of the `.tflite` metadata (empty: not said).
        version: the version field of the `.tflite` metadata; empty: the export's UTC time.
        training_flags: the training run's flags.txt, for the model card; None: unknown.
        max_pixels: the SavedModel's signatures refuse images over this many pixels.
    """

    export_dir: str
    formats: tuple[str, ...] = FORMATS
    calibration: model_input.Sample | None = None
    evaluation: model_input.Sample | None = None
    author: str = ""
    version: str = ""
    training_flags: str | None = None
    max_pixels: int = MAX_PIXELS


def parse_formats(text: str) -> tuple[str, ...]:
    """`"saved_model,int8"` -> ("saved_model", "int8"), in `FORMATS` order; checks names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    choices = f"choose a comma-separated list of {','.join(FORMATS)}"
    if not names:
        raise UsageError(f"--formats is empty; {choices}")
    unknown = [name for name in names if name not in FORMATS]
    if unknown:
        raise UsageError(f"--formats: unknown format {unknown[0]!r}; {choices}")
    return tuple(name for name in FORMATS if name in names)


def export_all(bundle: ModelBundle, config: ExportConfig) -> dict:
    """Writes the formats, labels.txt, preprocessing.json, report.json/.md, model_card.md.

    Returns:
        The report (what report.json holds).
    """
    unknown = [fmt for fmt in config.formats if fmt not in FORMATS]
    if unknown:
        raise UsageError(f"unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    size = bundle.preprocessing.image_size
    calibration, evaluation = config.calibration, config.evaluation
    if "int8" in config.formats and (calibration is None or not len(calibration.images)):
        raise UsageError(
            "model_int8.tflite needs calibration images: pass --representative_data=DIR "
            "(the training data: an image folder, cifar-10-batches-py or a TFDS data dir), "
            "or leave int8 out of --formats"
        )
    for name, sample in (("calibration", calibration), ("evaluation", evaluation)):
        if sample is not None:
            _check_sample(sample, size, name)
            log.info("%d %s images from %s", len(sample.images), name, sample.source)

    files.makedirs(config.export_dir)
    # The export folder stands on its own: the sidecars that give the outputs meaning.
    write_labels(config.export_dir, bundle.class_names)
    bundle.preprocessing.save(config.export_dir)

    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    written: dict[str, str] = {}
    if SAVED_MODEL in config.formats:
        base = files.join(config.export_dir, SAVED_MODEL_DIR)
        written[SAVED_MODEL] = saved_model.export_saved_model(
            bundle.model,
            bundle.class_names,
            bundle.preprocessing,
            base,
            max_pixels=config.max_pixels,
        )
        log.info("wrote %s", written[SAVED_MODEL])
    lite_formats = [fmt for fmt in config.formats if fmt in TFLITE_FORMATS]
    if lite_formats:
        blobs = tflite.convert(
            bundle.model,
            bundle.preprocessing,
            lite_formats,
            calibration.images if calibration is not None else None,
        )
        info = metadata.ModelInfo(
            name=bundle.model.name, version=config.version or created, author=config.author
        )
        for fmt, blob in blobs.items():
            # Labels and input normalisation inside the file, for MediaPipe and Android.
            blob = metadata.add_metadata(blob, bundle.class_names, info)
            path = files.join(config.export_dir, tflite.filename(fmt))
            files.write_bytes(path, blob)
            written[fmt] = path
            log.info("wrote %s (%d bytes)", path, len(blob))

    if ONNX in config.formats:
        path = files.join(config.export_dir, onnx.FILENAME)
        blob = onnx.convert(bundle.model, bundle.preprocessing)
        files.write_bytes(path, blob)
        written[ONNX] = path
        log.info("wrote %s (%d bytes)", path, len(blob))

    result = _report(bundle, config, written, calibration, evaluation, created)
    json_path, md_path = report.write_report(config.export_dir, result)
    card = model_card.write_model_card(
        config.export_dir, result, bundle.class_names, config.training_flags
    )
    log.info("wrote %s, %s and %s", json_path, md_path, card)
    return result


def _check_sample(sample: model_input.Sample, size: int, name: str) -> None:
    """The contract of `Sample`, checked before anything is written."""
    pixels = np.asarray(sample.images)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
        raise UsageError(
            f"{name} images must be uint8 [n, {size}, {size}, 3] (see export.model_input."
            f"to_model_input), got {pixels.dtype} {list(pixels.shape)}"
        )
    if sample.labels is not None and len(sample.labels) != len(pixels):
        raise UsageError(f"{len(sample.labels)} {name} labels for {len(pixels)} images")


def _report(
    bundle: ModelBundle,
    config: ExportConfig,
    written: dict[str, str],
    calibration: model_input.Sample | None,
    evaluation: model_input.Sample | None,
    created: str,
) -> dict:
    size = bundle.preprocessing.image_size
    result = {
        "model": files.resolve(bundle.path),
        "model_name": bundle.model.name,
        "created": created,
        "image_size": size,
        "num_classes": len(bundle.class_names),
        "max_pixels": config.max_pixels,
        "environment": report.environment(),
        "calibration": None,
        "evaluation": None,
        "formats": [],
    }
    if calibration is not None and "int8" in written:
        result["calibration"] = {"source": calibration.source, "images": len(calibration.images)}
    reference = labels = None
    pixels = np.full((_LATENCY_ONLY_IMAGES, size, size, 3), 128, np.uint8)
    if evaluation is not None and len(evaluation.images):
        pixels = evaluation.images
        labels = evaluation.labels
        reference = report.keras_probabilities(bundle.model, bundle.preprocessing, pixels)
        result["evaluation"] = {"source": evaluation.source, "images": len(pixels)}
        if labels is not None:
            result["evaluation"].update(
                report.accuracies(reference, labels, len(bundle.class_names))
            )
    for fmt, path in written.items():
        log.info("measuring %s", fmt)
        entry = {"format": fmt, "path": files.relpath(path, config.export_dir)}
        entry.update(report.measure(fmt, path, pixels, reference, labels))
        result["formats"].append(entry)
    float32 = next((e for e in result["formats"] if e["format"] == "float32"), None)
    for entry in result["formats"]:
        if float32 is not None and entry["format"] in TFLITE_FORMATS:
            entry["size_vs_float32"] = entry["size_bytes"] / float32["size_bytes"]
    return result
