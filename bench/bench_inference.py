"""Inference speed of one ResNet-50 in every form it ships in.

Rows: Keras `model.predict`; a direct `model(x, training=False)` call inside a `tf.function`
(float32, and the same weights under mixed_bfloat16); the TF Serving SavedModel's
`serving_default` signature (uint8 pixels in, preprocessing and softmax inside); and each
`.tflite` model through the LiteRT interpreter (XNNPACK, 2 threads). The SavedModel and the
`.tflite` files are written by the project's own export library (`export.saved_model`,
`export.tflite`), exactly as `python -m app.export` writes them.

Throughput is images/s over `--images` images fed in batches of `--batch_size`; the `.tflite`
models have a fixed batch of 1 (the phone contract), so their throughput is one image per
`invoke`. Latency is the median (and 90th percentile) of `--latency_runs` single-image calls.

Usage:
    python -m bench.bench_inference                      # an untrained ResNet-50, 32x32
    python -m bench.bench_inference --model=runs/cpu_quick/best.keras --formats=float32,int8
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np
from absl import flags, logging

from app import cli
from bench import common
from export import TFLITE_FORMATS

# Keras predict on all images in one call; the others are called once per batch.
ALL_ROWS = ("keras_predict", "tf_function", "tf_function_bf16", "saved_model")
IMAGE_SIZE = 32
NUM_CLASSES = 10
DEFAULT_DATA_DIR = common.default_data_dir()


@dataclasses.dataclass(frozen=True)
class Row:
    """One way of running the model: throughput at a batch, latency at batch 1."""

    name: str
    how: str
    images_per_s: float
    batch: int
    latency_median_ms: float
    latency_p90_ms: float
    size_mb: float | None = None


def _times(call, image, runs: int) -> list[float]:
    """Seconds of each of `runs` calls of `call(image)`, after three untimed ones."""
    for _ in range(3):
        call(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call(image)
        times.append(time.perf_counter() - start)
    return times


def _throughput(call, images: np.ndarray, batch: int, whole=None) -> float:
    """Images/s of `call` over `images` in batches of `batch` (one untimed batch first).

    `whole`, when given, takes all the images in one call and batches them itself (as
    `model.predict` does).
    """
    call(images[:batch])
    start = time.perf_counter()
    if whole is not None:
        whole(images)
    else:
        for i in range(0, len(images), batch):
            call(images[i : i + batch])
    return len(images) / (time.perf_counter() - start)


def default_bundle(stem: str = "imagenet"):
    """An untrained ResNet-50 (CIFAR normalisation, 10 classes): speed does not need training."""
    from models import preprocessing, resnet
    from models.bundle import ModelBundle

    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    model = resnet.resnet50(num_classes=NUM_CLASSES, input_shape=shape, stem=stem)
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    return ModelBundle(model, names, preprocessing.cifar(IMAGE_SIZE), "(untrained resnet50)")


def calibration_images(data_dir: str | None, class_names: list[str], size: int, n: int = 100):
    """Real training images for the int8 model when `data_dir` is readable, else random."""
    if data_dir and os.path.isdir(data_dir):
        from app import export_lib
        from app.data import DataConfig

        sample, _ = export_lib.calibration_and_evaluation(
            DataConfig(data_dir=data_dir), class_names, size, n, 0
        )
        return sample.images, sample.source
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "random pixels"


def measure(
    bundle,
    rows: tuple[str, ...] = ALL_ROWS,
    tflite_formats: tuple[str, ...] = TFLITE_FORMATS,
    batch: int = 64,
    num_images: int = 512,
    latency_runs: int = 30,
    data_dir: str | None = None,
    work_dir: str | None = None,
    log=print,
) -> list[Row]:
    """Times the model of `bundle` (a `models.bundle.ModelBundle`) in each requested form."""
    import keras
    import tensorflow as tf

    model, prep = bundle.model, bundle.preprocessing
    size = prep.image_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
    normalised = np.asarray(prep(pixels.astype(np.float32)), dtype=np.float32)
    out: list[Row] = []

    def add(name, how, call, images, batch_size, size_mb=None, whole=None):
        ips = _throughput(call, images, batch_size, whole)
        ms = 1000 * np.array(_times(call, images[:1], latency_runs))
        median, p90 = float(np.median(ms)), float(np.percentile(ms, 90))
        out.append(Row(name, how, ips, batch_size, median, p90, size_mb))
        if log:
            log(f"  {name}: {ips:.1f} images/s, {median:.2f} ms at batch 1")

    if "keras_predict" in rows:
        add(
            "Keras model.predict",
            "float32 input, normalised",
            lambda x: model.predict(x, batch_size=batch, verbose=0),
            normalised,
            batch,
            whole=lambda x: model.predict(x, batch_size=batch, verbose=0),
        )
    spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    if "tf_function" in rows:
        direct = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        add(
            "tf.function model(x)",
            "float32 input, normalised",
            lambda x: direct(x).numpy(),
            normalised,
            batch,
        )
    if "tf_function_bf16" in rows:
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            bf16 = keras.models.clone_model(model)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        bf16.set_weights(model.get_weights())
        direct_bf16 = tf.function(lambda x: bf16(x, training=False), input_signature=[spec])
        add(
            "tf.function model(x), mixed_bfloat16",
            "float32 input, normalised",
            lambda x: direct_bf16(x).numpy(),
            normalised,
            batch,
        )

    if "saved_model" in rows or tflite_formats:
        with tempfile.TemporaryDirectory(prefix="bench-export-", dir=work_dir) as tmp:
            if "saved_model" in rows:
                from export import report, saved_model

                start = time.perf_counter()
                path = saved_model.export_saved_model(
                    model, bundle.class_names, prep, os.path.join(tmp, "saved_model")
                )
                served = tf.saved_model.load(path).signatures["serving_default"]
                if log:
                    log(f"  SavedModel written and loaded in {time.perf_counter() - start:.0f}s")
                add(
                    "SavedModel serving_default",
                    "uint8 pixels; preprocessing, softmax inside",
                    lambda x: served(images=tf.constant(x))["probabilities"].numpy(),
                    pixels,
                    batch,
                    report.file_size(path) / 2**20,
                )
            if tflite_formats:
                from export import tflite

                calibration = None
                if "int8" in tflite_formats:
                    calibration, source = calibration_images(data_dir, bundle.class_names, size)
                    if log:
                        log(f"  int8 calibration: {len(calibration)} images from {source}")
                start = time.perf_counter()
                blobs = tflite.convert(model, prep, list(tflite_formats), calibration)
                if log:
                    log(f"  converted {', '.join(blobs)} in {time.perf_counter() - start:.0f}s")
                for fmt, blob in blobs.items():
                    path = os.path.join(tmp, tflite.filename(fmt))
                    with open(path, "wb") as f:
                        f.write(blob)
                    classifier = tflite.TFLiteClassifier(path, num_threads=tflite.NUM_THREADS)
                    add(
                        f"LiteRT {tflite.filename(fmt)}",
                        f"XNNPACK, {tflite.NUM_THREADS} threads, batch 1 per invoke",
                        classifier.predict,
                        pixels,
                        1,
                        len(blob) / 2**20,
                    )
    return out


def report(rows: list[Row]) -> str:
    """Markdown table of `measure`'s rows."""
    return common.table(
        ["runtime", "how", "images/s (batch)", "batch-1 latency ms, median (p90)", "size MiB"],
        [
            (
                r.name,
                r.how,
                f"{r.images_per_s:.0f} ({r.batch})",
                f"{r.latency_median_ms:.2f} ({r.latency_p90_ms:.2f})",
                f"{r.size_mb:.1f}" if r.size_mb is not None else "",
            )
            for r in rows
        ],
    )


def define_flags() -> None:
    flags.DEFINE_string(
        "model",
        None,
        "A best.keras (with labels.txt, preprocessing.json); "
        "default: an untrained ResNet-50 at 32x32.",
    )
    flags.DEFINE_enum("stem", "imagenet", ["imagenet", "cifar"], "Stem of the default model.")
    flags.DEFINE_list("rows", list(ALL_ROWS), f"Non-LiteRT rows, some of {','.join(ALL_ROWS)}.")
    flags.DEFINE_list(
        "formats",
        list(TFLITE_FORMATS),
        "`.tflite` formats to convert and time (empty: none).",
    )
    flags.DEFINE_integer("batch_size", 64, "Batch for the throughput column.", lower_bound=1)
    flags.DEFINE_integer("images", 512, "Images per throughput measurement.", lower_bound=1)
    flags.DEFINE_integer("latency_runs", 30, "Single-image calls timed.", lower_bound=1)
    flags.DEFINE_string(
        "data_dir",
        DEFAULT_DATA_DIR,
        "Real images to calibrate the int8 model (random pixels when the folder is absent).",
    )


def main(argv: list[str]) -> None:
    del argv

    def flag(name: str):
        return flags.FLAGS[name].value

    from common.errors import UsageError
    from models.bundle import load_model_bundle

    logging.set_verbosity(logging.WARNING)  # TensorFlow's SavedModel writer logs every file
    unknown = [r for r in flag("rows") if r not in ALL_ROWS]
    unknown += [f for f in flag("formats") if f not in TFLITE_FORMATS]
    if unknown:
        raise UsageError(
            f"unknown row or format {unknown[0]!r}: --rows takes {','.join(ALL_ROWS)}, "
            f"--formats takes {','.join(TFLITE_FORMATS)}"
        )
    print(common.environment())
    bundle = load_model_bundle(flag("model")) if flag("model") else default_bundle(flag("stem"))
    rows = measure(
        bundle,
        rows=tuple(flag("rows")),
        tflite_formats=tuple(flag("formats")),
        batch=flag("batch_size"),
        num_images=flag("images"),
        latency_runs=flag("latency_runs"),
        data_dir=flag("data_dir"),
    )
    print(report(rows))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
