"""`export_all` and its report, `app.export_lib`'s real-image samples, and `python -m app.export`.

Fast tests use a tiny conv net or an untrained ResNet-18 (the `resnet18` fixture). Slow: the
command-line errors, and ResNet-50 trained briefly on real CIFAR-10 images, exported in every
format and checked against Keras.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from app import export_lib
from app.data import DataConfig
from common.errors import UsageError
from export import FORMATS, TFLITE_FORMATS, all_formats, metadata, model_input, report, tflite
from models import preprocessing as preprocessing_lib
from models import resnet
from models.bundle import load_model_bundle, write_labels
from tests.helpers import (
    CIFAR10_CLASSES,
    random_images,
    run_program,
    save_bundle,
    tiny_model,
    write_folder,
)

CLASSES = [f"class_{i}" for i in range(10)]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_program("app.export", *args, timeout=timeout)


def test_parse_formats():
    assert all_formats.parse_formats("int8, saved_model") == ("saved_model", "int8")
    assert all_formats.parse_formats(",".join(FORMATS)) == FORMATS
    with pytest.raises(UsageError, match="unknown format 'tfjs'"):
        all_formats.parse_formats("saved_model,tfjs")
    with pytest.raises(UsageError, match="--formats is empty"):
        all_formats.parse_formats(" , ")
    from app import export as program  # its default is every format, in order

    assert all_formats.parse_formats(program.DEFAULT_FORMATS) == FORMATS


def test_int8_without_data_fails_before_writing(resnet18, tmp_path):
    export_dir = tmp_path / "export"
    config = all_formats.ExportConfig(export_dir=str(export_dir), formats=FORMATS, calibration=None)
    with pytest.raises(UsageError, match="--representative_data"):
        all_formats.export_all(resnet18, config)
    assert not export_dir.exists()
    # What app.export runs, for a model with neither --representative_data nor flags.txt.
    job = export_lib.ExportJob(resnet18.path, str(export_dir), FORMATS, data=None)
    with pytest.raises(UsageError, match="--representative_data"):
        export_lib.export_model(job)
    assert not export_dir.exists()


def test_bad_samples_fail_before_writing(tmp_path):
    model, pre = tiny_model(), preprocessing_lib.cifar(32)
    bundle = load_model_bundle(save_bundle(tmp_path / "run", model, pre, CLASSES))
    export_dir = tmp_path / "export"
    pixels = random_images(4, 32, 32)
    cases = {
        r"calibration images must be uint8 \[n, 32, 32, 3\]": all_formats.ExportConfig(
            str(export_dir),
            ("saved_model", "int8"),
            calibration=model_input.Sample(random_images(4, 48, 48), None, "too big"),
        ),
        r"evaluation images must be uint8 \[n, 32, 32, 3\].*got float32": all_formats.ExportConfig(
            str(export_dir),
            ("saved_model",),
            evaluation=model_input.Sample(pixels.astype(np.float32), None, "floats"),
        ),
        "3 evaluation labels for 4 images": all_formats.ExportConfig(
            str(export_dir),
            ("saved_model",),
            evaluation=model_input.Sample(pixels, np.zeros(3, np.int64), "short"),
        ),
        "unknown format 'tfjs'": all_formats.ExportConfig(str(export_dir), ("saved_model", "tfjs")),
    }
    for expected, config in cases.items():
        with pytest.raises(UsageError, match=expected):
            all_formats.export_all(bundle, config)
    assert not export_dir.exists()


def test_samples_come_from_train_and_held_out_images(tmp_path):
    """app.export_lib reads a dataset into the samples export_all takes: calibration from
    train, evaluation from the validation split held out of it, both at the model's size."""
    write_folder(tmp_path / "data", classes=("cat", "dog"), per_class=10, size=8)
    config = DataConfig(data_dir=str(tmp_path / "data"), validation_split=0.2, seed=0)
    calibration, evaluation = export_lib.calibration_and_evaluation(
        config, ["cat", "dog"], 16, num_calibration=6, num_evaluation=4
    )
    assert calibration.images.shape == (6, 16, 16, 3) and calibration.images.dtype == np.uint8
    assert calibration.labels is None
    assert evaluation.images.shape == (4, 16, 16, 3) and evaluation.images.dtype == np.uint8
    assert sorted(evaluation.labels.tolist()) == [0, 0, 1, 1]  # stratified
    assert evaluation.source.endswith("(validation split held out of train)")
    seen = {image.tobytes() for image in calibration.images}
    assert not seen & {image.tobytes() for image in evaluation.images}  # never calibrated on

    # Another model's classes: no labels, so no accuracy; no evaluation images: no sample.
    _, other = export_lib.calibration_and_evaluation(config, ["cat", "bird"], 16, 6, 4)
    assert other.labels is None and len(other.images) == 4
    assert export_lib.calibration_and_evaluation(config, ["cat", "dog"], 16, 6, 0)[1] is None


def test_report_without_real_images_has_sizes_and_latencies(tmp_path):
    model, pre = tiny_model(), preprocessing_lib.cifar(32)
    bundle = load_model_bundle(save_bundle(tmp_path / "run", model, pre, CLASSES))
    export_dir = tmp_path / "run" / "export"
    result = all_formats.export_all(
        bundle,
        all_formats.ExportConfig(str(export_dir), formats=("saved_model", "float16", "onnx")),
    )
    assert sorted(os.listdir(export_dir)) == [
        "labels.txt",
        "model.onnx",
        "model_card.md",
        "model_float16.tflite",
        "preprocessing.json",
        "report.json",
        "report.md",
        "saved_model",
    ]
    assert json.loads((export_dir / "report.json").read_text()) == result
    for name in ("model_float16.tflite", "report.json", "labels.txt"):
        assert oct(os.stat(export_dir / name).st_mode & 0o777) == oct(0o644)  # servable
    assert [e["format"] for e in result["formats"]] == ["saved_model", "float16", "onnx"]
    for entry in result["formats"]:
        assert entry["size_bytes"] > 0 and entry["latency"]["median_ms"] > 0
        assert "top1_agreement" not in entry
    assert result["evaluation"] is None
    assert "Agreement not measured" in (export_dir / "report.md").read_text()
    card = (export_dir / "model_card.md").read_text()
    assert "Training flags unknown" in card and "Accuracy" in card
    assert "| onnx | `model.onnx` | ONNX Runtime, Triton, OpenVINO |" in card
    assert report.agreement(np.eye(3), np.eye(3)[[0, 2, 2]], np.array([0, 1, 2])) == {
        "images": 3,
        "top1_agreement": 2 / 3,
        "top1_disagreements": 1,
        "max_overturned_lead": 1.0,
        "max_abs_prob_diff": 1.0,
        "accuracy": 2 / 3,
    }


# --------------------------------------------------------------------------------------
# Slow: the command line, ResNet-50 on CIFAR-10


@pytest.mark.slow
def test_command_line_errors_are_one_line_and_write_nothing(tmp_path):
    not_keras = tmp_path / "run" / "best.keras"
    not_keras.parent.mkdir()
    not_keras.write_text("not a zip file")
    write_labels(str(not_keras.parent), CLASSES)
    preprocessing_lib.cifar(32).save(str(not_keras.parent))
    cases = {
        "model file not found": [f"--model={tmp_path / 'nope' / 'best.keras'}"],
        "is not a Keras model file": [f"--model={not_keras}", "--formats=saved_model"],
        "unknown format 'tfjs'": [f"--model={not_keras}", "--formats=saved_model,tfjs"],
    }
    for expected, args in cases.items():
        result = run_cli(*args, f"--export_dir={tmp_path / 'export'}")
        # TensorFlow's C++ start-up chatter aside, the program says one thing: the error.
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2, result.stderr
        assert len(errors) == 1 and expected in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "export").exists()


TRAIN_IMAGES, TRAIN_EPOCHS, TRAIN_BATCH, TRAIN_LR = 2048, 2, 32, 2e-3


def train_resnet50(cifar10_dir: pathlib.Path, model_dir: pathlib.Path) -> dict:
    """ResNet-50 (ImageNet stem on 32x32, as the reference tutorial) trained from scratch for
    128 steps (2 epochs of 2,048 real CIFAR-10 images); saved as app.train would. Returns how
    well it learned (about 33% on held-out images)."""
    from app import data

    splits = data.load(
        data.DataConfig(data_dir=str(cifar10_dir), train_limit=TRAIN_IMAGES, eval_limit=500)
    )
    pre = preprocessing_lib.cifar(32)
    keras.utils.set_random_seed(0)

    def augment(pixels, label):
        # Flips and a little pixel noise: a short run then learns a function that small
        # input perturbations (like int8 rounding) do not flip.
        pixels = tf.image.random_flip_left_right(tf.cast(pixels, tf.float32))
        pixels += tf.random.uniform(tf.shape(pixels), -4.0, 4.0)
        return pre(pixels), tf.one_hot(label, 10)

    dataset = (
        tf.data.Dataset.from_tensor_slices((splits.train.images, splits.train.labels))
        .shuffle(TRAIN_IMAGES, seed=0)
        .map(augment)
        .batch(TRAIN_BATCH)
    )
    model = resnet.resnet50(num_classes=10, input_shape=(32, 32, 3))
    # Zero-initialised last batch norm of every residual branch (Goyal et al., 2017): each
    # block starts as the identity, so a short from-scratch run does not blow up.
    for layer in model.layers:
        if layer.name.endswith("_3_bn"):
            layer.gamma.assign(tf.zeros_like(layer.gamma))
    steps = TRAIN_EPOCHS * (TRAIN_IMAGES // TRAIN_BATCH)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, alpha=0.01, warmup_target=TRAIN_LR, warmup_steps=steps // 10
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
    )
    model.fit(dataset, epochs=TRAIN_EPOCHS, shuffle=False, verbose=0)  # shuffled above
    logits = model.predict(pre(splits.validation.images.astype(np.float32)), verbose=0)
    accuracy = float((logits.argmax(-1) == splits.validation.labels).mean())
    save_bundle(model_dir, model, pre, splits.class_names)
    return {"validation_accuracy": accuracy, "steps": steps}


@pytest.mark.slow
def test_resnet50_trained_on_cifar10_exports_every_format_faithfully(cifar10_dir, tmp_path):
    model_dir = tmp_path / "run"
    trained = train_resnet50(cifar10_dir, model_dir)
    print(f"ResNet-50 after {trained['steps']} steps: {trained['validation_accuracy']:.3f}")
    assert trained["validation_accuracy"] > 0.2  # it learned something: not chance (0.1)

    result = run_cli(
        f"--model={model_dir / 'best.keras'}",
        f"--representative_data={cifar10_dir}",
        "--num_evaluation=500",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    export_dir = model_dir / "export"
    got = json.loads((export_dir / "report.json").read_text())
    print((export_dir / "report.md").read_text())
    entries = {entry["format"]: entry for entry in got["formats"]}
    assert list(entries) == list(FORMATS)
    assert got["evaluation"]["images"] == 500
    assert got["calibration"]["images"] == 200
    assert entries["saved_model"]["max_abs_prob_diff"] < 1e-5
    assert entries["saved_model"]["top1_agreement"] == 1.0
    assert entries["float32"]["top1_agreement"] == 1.0
    # A model trained for 128 steps has many near-ties (median lead of its top-1 over the
    # runner-up about 0.08) and quantization flips some of them: int8 agrees on about 96-97%,
    # short of the 99%, and float16 on 99.6-100% (one run flipped 2 of 500 with leads
    # under 0.0004), short of 99.8%; judging those needs a better-trained model than a test
    # can afford.
    assert entries["float16"]["top1_agreement"] >= 0.99
    # Checked instead: quantization flips only near-ties of this model (measured: no lead
    # above 0.018 overturned).
    assert entries["dynamic_int8"]["top1_agreement"] >= 0.98
    assert entries["int8"]["top1_agreement"] >= 0.95
    for fmt in TFLITE_FORMATS[1:]:  # every quantized format
        assert entries[fmt]["max_overturned_lead"] < 0.05, entries[fmt]
    assert entries["int8"]["size_vs_float32"] <= 0.27
    assert entries["onnx"]["top1_agreement"] == 1.0
    assert entries["onnx"]["max_abs_prob_diff"] < 1e-5
    for fmt in TFLITE_FORMATS:
        assert metadata.read_metadata(str(export_dir / tflite.filename(fmt))).labels == (
            CIFAR10_CLASSES
        )
    card = (export_dir / "model_card.md").read_text()
    assert f"{100 * got['evaluation']['keras_accuracy']:.1f}%" in card
    assert (export_dir / "labels.txt").read_text().split() == CIFAR10_CLASSES
    assert json.loads((export_dir / "preprocessing.json").read_text())["image_size"] == 32

    shown = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "saved_model_cli"),
            "show",
            "--all",
            "--dir",
            str(export_dir / "saved_model" / "1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    for text in (
        "signature_def['serving_default']",
        "signature_def['serving_bytes']",
        "inputs['images']",
        "inputs['image_bytes']",
        "outputs['class_names']",
    ):
        assert text in shown.stdout


def test_model_card_is_written_from_the_report_and_training_flags(tmp_path):
    model, pre = tiny_model(num_classes=3, size=16), preprocessing_lib.cifar(16)
    bundle = load_model_bundle(save_bundle(tmp_path / "run", model, pre, CLASSES[:3]))
    labels = np.array([0, 0, 1, 1, 2, 2])
    config = all_formats.ExportConfig(
        str(tmp_path / "export"),
        formats=("onnx",),
        evaluation=model_input.Sample(random_images(6, 16, 16), labels, "six images"),
        training_flags="# training run\n--arch=tiny\n--epochs=3\n",
    )
    result = all_formats.export_all(bundle, config)
    evaluation = result["evaluation"]
    predicted = report.keras_probabilities(model, pre, random_images(6, 16, 16)).argmax(-1)
    assert evaluation["keras_accuracy"] == float((predicted == labels).mean())
    assert evaluation["keras_per_class_accuracy"] == [
        float((predicted[labels == k] == k).mean()) for k in range(3)
    ]
    card = (tmp_path / "export" / "model_card.md").read_text()
    assert "--arch=tiny\n--epochs=3\n" in card and "# training run" not in card
    assert "6 images from `six images`" in card
    for name, accuracy in zip(CLASSES[:3], evaluation["keras_per_class_accuracy"], strict=True):
        assert f"| {name} | {100 * accuracy:.1f}% |" in card
    (onnx_entry,) = result["formats"]
    assert f"| {_pct(onnx_entry['top1_agreement'])} | {_pct(onnx_entry['accuracy'])} |" in card


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"
