"""The programs with their files in a bucket: TF's in-process `ram://` file system stands in
for `gs://`. It lives inside one process only, so every program's `main` runs in this one
(`helpers.run_main`), each test under its own ram:// root, with an empty local working
directory that must stay without a `ram:` folder.

The data is in the bucket too: an image folder copied to ram:// file by file.
"""

from __future__ import annotations

import json
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from app.training.backup import backup_path, read_state
from app.training.callbacks import read_history_csv
from common import files
from models import preprocessing
from tests import helpers
from tests.helpers import (
    final_digest,
    program_flags,
    random_images,
    run_main,
    save_bundle,
    tiny_model,
    write_folder,
    write_png,
)

CLASSES = ["cat", "dog"]
# A tiny deterministic run: 24 images of 8x8 (6 held out), 3 steps of 6 per epoch, a backup
# after every step.
TRAIN = (
    "--model=resnet18",
    "--stem=cifar",
    "--image_size=8",
    "--epochs=2",
    "--batch_size=6",
    "--lr=0.01",
    "--warmup_epochs=0",
    "--mixed_precision=none",
    "--validation_split=0.25",
    "--backup_every_steps=1",
    "--steps_per_execution=1",
    "--deterministic",
    "--verbose=0",
)
RUN_FILES = {*helpers.RUN_FILES, "logs"}


@pytest.fixture
def ram_root(tmp_path, monkeypatch):
    """A fresh ram:// folder; the working directory an empty local one."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = f"ram://test-{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(root)
    yield root
    assert list(work.iterdir()) == []  # never a local `ram:` folder
    files.rmtree(root)


@pytest.fixture
def data_dir(tmp_path, ram_root):
    """24 small images of two classes, in ram_root/data/<class>/."""
    local = tmp_path / "data"
    write_folder(local, CLASSES, per_class=12, size=8)
    root = files.join(ram_root, "data")
    for path in sorted(local.rglob("*.png")):
        files.copy(str(path), files.join(root, path.parent.name, path.name))
    return root


class Stopped(Exception):
    """What the injected failure raises."""


class StopAfter(keras.callbacks.Callback):
    """Fails the run after `batches` training batches (after that batch's backup)."""

    def __init__(self, batches: int):
        super().__init__()
        self.batches, self.seen = batches, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.batches:
            raise Stopped(f"stopped after {self.seen} batches")


def _names(folder: str) -> set[str]:
    return {name.rstrip("/") for name in tf.io.gfile.listdir(folder)}


def test_a_run_in_a_bucket_resumes_exactly_after_failing_mid_epoch(ram_root, data_dir):
    from tensorflow.python.framework import config as tf_config

    from app import data_flags, training

    try:
        whole = files.join(ram_root, "whole")
        done = run_main("app.train", f"--model_dir={whole}", f"--data_dir={data_dir}", *TRAIN)
        assert done.returncode == 0, done.stderr[-3000:]
        names = _names(whole)
        assert names == RUN_FILES, names  # no lock, no backup, no temporaries left
        assert tf.io.gfile.listdir(files.join(whole, "logs"))  # TensorBoard's event files
        assert [row["epoch"] for row in read_history_csv(files.join(whole, "history.csv"))] == [
            1,
            2,
        ]
        metrics = json.loads(files.read_text(files.join(whole, "metrics.json")))
        assert metrics["completed"] and metrics["best_path"] == files.join(whole, "best.keras")

        cut = files.join(ram_root, "cut")
        flags = (f"--model_dir={cut}", f"--data_dir={data_dir}", *TRAIN)
        with program_flags("app.train", *flags) as (train, _):
            config = train.config_from_flags()
            with pytest.raises(Stopped):
                training.train(
                    config,
                    data_flags.data_config_from_flags(config.seed),
                    train.flags_text(),
                    callbacks=[StopAfter(5)],  # epoch 2 (of 3 steps each), step 2
                )
        state = read_state(backup_path(cut))
        assert (state.epoch, state.step) == (1, 2)
        assert "train.lock" not in _names(cut)  # released on the way out

        resumed = run_main("app.train", *flags)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "Resuming from" in resumed.stdout
        assert final_digest(resumed.stdout) == final_digest(done.stdout)
        assert _names(cut) == RUN_FILES
    finally:
        tf_config.disable_op_determinism()  # --deterministic is process-wide


@pytest.fixture
def bundle_on_ram(ram_root, tmp_path):
    """A tiny two-class model with its sidecars, copied to ram_root/run/."""
    local = save_bundle(tmp_path / "bundle", tiny_model(2), preprocessing.cifar(32), CLASSES)
    run = files.join(ram_root, "run")
    for name in ("best.keras", "labels.txt", "preprocessing.json"):
        files.copy(files.join(files.dirname(local), name), files.join(run, name))
    return files.join(run, "best.keras")


def test_export_from_and_to_a_bucket(bundle_on_ram, ram_root, tmp_path, data_dir):
    export_dir = files.join(ram_root, "export")
    formats = "saved_model,float32,dynamic_int8,int8"
    for _ in range(2):  # a second export adds version 2
        result = run_main(
            "app.export", f"--model={bundle_on_ram}", f"--export_dir={export_dir}",
            f"--formats={formats}", f"--representative_data={data_dir}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    names = _names(export_dir)
    assert names == {
        "saved_model",
        "model_float32.tflite",
        "model_dynamic_int8.tflite",
        "model_int8.tflite",
        "labels.txt",
        "preprocessing.json",
        "report.json",
        "report.md",
        "model_card.md",
    }, names
    base = files.join(export_dir, "saved_model")
    assert _names(base) == {"1", "2"}
    version = files.join(base, "2")
    assert {"saved_model.pb", "variables", "assets.extra", "fingerprint.pb"} <= _names(version)
    report = json.loads(files.read_text(files.join(export_dir, "report.json")))
    assert report["model"] == bundle_on_ram
    assert [(e["format"], e["path"]) for e in report["formats"]] == [
        ("saved_model", "saved_model/2"),
        ("float32", "model_float32.tflite"),
        ("dynamic_int8", "model_dynamic_int8.tflite"),
        ("int8", "model_int8.tflite"),
    ]
    assert all(e["size_bytes"] > 0 for e in report["formats"])
    int8 = report["formats"][-1]  # calibrated and measured on the images in the bucket
    assert int8["images"] > 0 and 0.0 <= int8["top1_agreement"] <= 1.0

    # What was published answers as the Keras model does, read back from ram://.
    image = random_images(1, 40, 30, seed=3)[0]
    image_path = files.join(ram_root, "images", "a.png")
    write_png(tmp_path / "a.png", image)
    files.copy(str(tmp_path / "a.png"), image_path)
    answers = {}
    for model in (bundle_on_ram, base, files.join(export_dir, "model_float32.tflite")):
        result = run_main("app.predict", f"--model={model}", "--json", image_path)
        assert result.returncode == 0, result.stderr[-3000:]
        (answer,) = json.loads(result.stdout)["results"]
        answers[model] = answer["predictions"][0]
    top = {(a["name"], round(a["probability"], 4)) for a in answers.values()}
    assert len(top) == 1, answers


def test_predict_evaluate_and_visualize_with_the_model_in_a_bucket(
    bundle_on_ram, ram_root, tmp_path, data_dir
):
    image = tmp_path / "b.png"
    write_png(image, random_images(1, 32, 32, seed=5)[0])
    result = run_main("app.predict", f"--model={bundle_on_ram}", "--top_k=2", str(image))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == str(image)

    result = run_main(
        "app.evaluate", f"--model={bundle_on_ram}", f"--data_dir={data_dir}",
        "--split=validation", "--validation_split=0.25", "--verbose=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = files.dirname(bundle_on_ram)
    written = {"eval_validation.json", "confusion_validation.png", "predictions_validation.png"}
    assert written <= _names(run)
    document = json.loads(files.read_text(files.join(run, "eval_validation.json")))
    assert document["model"] == bundle_on_ram and document["num_examples"] == 6
    assert 0.0 <= document["top1_accuracy"] <= 1.0

    output = files.join(ram_root, "pictures", "samples.png")
    result = run_main("app.visualize", f"--data_dir={data_dir}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert files.read_bytes(output).startswith(b"\x89PNG")
    assert np.asarray(tf.io.decode_png(files.read_bytes(output))).shape[-1] in (3, 4)
