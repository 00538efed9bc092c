"""The training program (app/train.py over app/training*.py).

Fast tests check the pieces in-process (schedule, weight decay, loss, freezing, backups,
the checkpoint's atomic write, flag checks). Slow tests run `python -m app.train` in a
subprocess on real CIFAR-10 images: a short run writes every file and learns, flags.txt
reproduces it exactly, a finished run is not retrained, and a SIGKILLed run resumes.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from app import training, training_callbacks, training_state
from app.training_state import RunState
from common.errors import UsageError
from tests.helpers import REPO, final_digest, history_rows, run_train, start_train, wait_for_backup

# --- helpers ----------------------------------------------------------------------------


# --- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"lr": -0.1}, "--lr"),
        ({"lr": 0.0}, "--lr"),
        ({"min_lr": 0.5}, "--min_lr"),
        ({"model": "resnet9"}, "--model"),
        ({"strategy": "parameter_server"}, "--strategy"),
        ({"mixed_precision": "int8"}, "--mixed_precision"),
        ({"warmup_epochs": 40}, "--warmup_epochs"),
        ({"label_smoothing": 1.0}, "--label_smoothing"),
        ({"freeze_backbone_epochs": 2}, "--freeze_backbone_epochs"),  # needs --pretrained
        ({"pretrained": "imagenet", "model": "resnet18"}, "--pretrained"),
        ({"pretrained": "/nonexistent/weights.h5"}, "--pretrained"),
        ({"nesterov": True, "momentum": 0.0}, "--nesterov"),
        ({"qat": True}, "--qat"),  # needs a trained --pretrained model
        ({"qat": True, "pretrained": "imagenet"}, "--qat"),
        ({"qat": True, "pretrained": __file__, "mixed_precision": "bf16"}, "--qat"),
        ({"qat_weight": -1.0}, "--qat_weight"),
    ],
)
def test_check_config_names_the_bad_flag(changes, flag):
    config = training.TrainConfig(model_dir="x", **changes)
    with pytest.raises(UsageError, match=flag):
        training.check_config(config)


def test_check_config_accepts_the_defaults():
    training.check_config(training.TrainConfig(model_dir="x"))


def test_multi_worker_without_tf_config_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UsageError, match="TF_CONFIG"):
        training.check_config(training.TrainConfig(model_dir="x", strategy="multi_worker_mirrored"))


def test_normalization_follows_the_starting_weights(tmp_path):
    assert training.resolve_normalization("auto", "none") == "cifar"
    assert training.resolve_normalization("auto", "imagenet") == "imagenet"
    assert training.resolve_normalization("cifar", "imagenet") == "cifar"
    # A .keras of ours carries its normalisation in preprocessing.json beside it.
    from models import preprocessing

    preprocessing.imagenet(64).save(str(tmp_path))
    (tmp_path / "best.keras").write_bytes(b"")
    assert training.resolve_normalization("auto", str(tmp_path / "best.keras")) == "imagenet"


def test_steps_per_execution_divides_the_epoch():
    assert training.effective_steps_per_execution(8, 351) == 3  # 351 = 3^3 * 13
    assert training.effective_steps_per_execution(4, 100) == 4
    assert training.effective_steps_per_execution(10, 7) == 7
    assert training.effective_steps_per_execution(1, 9) == 1


def test_settings_fingerprint_ignores_runtime_settings():
    from app.data import DataConfig

    a = training.settings_fingerprint(training.TrainConfig(model_dir="a"), DataConfig())
    b = training.settings_fingerprint(
        training.TrainConfig(model_dir="b", verbose=0, strategy="mirrored"), DataConfig()
    )
    c = training.settings_fingerprint(training.TrainConfig(model_dir="a", lr=0.2), DataConfig())
    assert a == b
    assert training_state.first_difference(a, c) == "lr: 0.1 -> 0.2"


# --- schedule, optimizer, loss ----------------------------------------------------------


def test_cosine_schedule_with_warmup_runs_from_min_to_max_to_min():
    schedule = training.lr_schedule(0.1, 0.001, total_steps=110, warmup_steps=10)

    def lr(step):
        return float(schedule(step))

    assert lr(0) == pytest.approx(0.001)
    assert lr(5) == pytest.approx(0.001 + 0.5 * 0.099)  # linear warmup
    assert lr(10) == pytest.approx(0.1)
    assert lr(60) == pytest.approx(0.001 + 0.5 * 0.099, rel=1e-4)  # cosine midpoint
    assert lr(110) == pytest.approx(0.001, rel=1e-4)
    assert lr(200) == pytest.approx(0.001, rel=1e-4)


def test_cosine_schedule_without_warmup_starts_at_max():
    schedule = training.lr_schedule(1e-3, 1e-5, total_steps=40)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(20)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-4)
    assert float(schedule(40)) == pytest.approx(1e-5, rel=1e-4)


def _tiny_model():
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(2, 3, use_bias=True, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="predictions")(x))


def test_weight_decay_skips_batch_norm_and_bias():
    model = _tiny_model()
    for v in model.trainable_variables:  # nonzero everywhere, so decay would show
        v.assign(np.full(v.shape, 0.5, dtype="float32"))
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    optimizer = training.make_optimizer(0.1, 0.0, False, 0.5, model.trainable_variables)
    zeros = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    optimizer.apply_gradients(zip(zeros, model.trainable_variables, strict=True))
    for v in model.trainable_variables:
        expected = before[v.path] * (1 - 0.1 * 0.5) if len(v.shape) > 1 else before[v.path]
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, err_msg=v.path)
    decayed = sorted(v.path for v in model.trainable_variables if len(v.shape) > 1)
    assert decayed == ["conv/kernel", "predictions/kernel"]


def test_sgd_has_the_asked_momentum_and_nesterov():
    model = _tiny_model()
    optimizer = training.make_optimizer(0.1, 0.9, True, 0.0, model.trainable_variables)
    assert optimizer.momentum == 0.9 and optimizer.nesterov and optimizer.weight_decay is None


def test_smoothed_sparse_loss_equals_categorical_with_smoothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype("float32") * 3
    labels = np.array([0, 4, 2, 2, 1, 3])
    ours = training.make_loss(0.1)(labels, logits)
    reference = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(
        np.eye(5)[labels], logits
    )
    np.testing.assert_allclose(float(ours), float(reference), rtol=1e-6)
    plain = training.make_loss(0.0)
    assert isinstance(plain, keras.losses.SparseCategoricalCrossentropy)
    restored = keras.losses.deserialize(keras.losses.serialize(training.make_loss(0.2)))
    assert restored.label_smoothing == 0.2


def test_frozen_backbone_trains_only_the_head_with_batch_norm_in_inference_mode():
    from models import resnet

    model = resnet.build("resnet18", num_classes=3, input_shape=(8, 8, 3), stem="cifar")
    training.set_backbone_frozen(model, True)
    assert sorted(v.path for v in model.trainable_variables) == [
        "predictions/bias",
        "predictions/kernel",
    ]
    bn = model.get_layer("conv1_bn")
    mean = bn.moving_mean.numpy().copy()
    model(np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32"), training=True)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)  # statistics not updated
    training.set_backbone_frozen(model, False)
    assert len(model.trainable_variables) > 2


# --- backups, records, checkpoint -------------------------------------------------------


def test_backup_round_trip_restores_every_value(tmp_path):
    model = _tiny_model()
    state = RunState(epoch=2, step=5, history=[{"epoch": 1, "loss": 1.5}], best=0.3, best_epoch=1)
    path = str(tmp_path / "backup" / "state.npz")
    training_state.save_backup(path, state, {"model": model.variables})
    saved = [v.numpy().copy() for v in model.variables]
    for v in model.variables:
        v.assign(np.zeros(v.shape, v.dtype))
    backup = training_state.load_backup(path)
    assert (backup.state.epoch, backup.state.step, backup.state.best) == (2, 5, 0.3)
    assert backup.state.history == state.history
    assert training_state.read_state(path).step == 5
    training_state.assign(model.variables, backup.arrays["model"], "model", path)
    for v, value in zip(model.variables, saved, strict=True):
        np.testing.assert_array_equal(v.numpy(), value)
    assert os.listdir(tmp_path / "backup") == ["state.npz"]  # no temporary files left


def test_backup_that_does_not_fit_is_a_usage_error(tmp_path):
    path = str(tmp_path / "state.npz")
    model = _tiny_model()
    training_state.save_backup(path, RunState(), {"model": model.variables[:-1]})
    backup = training_state.load_backup(path)
    with pytest.raises(UsageError, match="does not fit"):
        training_state.assign(model.variables, backup.arrays["model"], "model", path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable training backup"):
        training_state.load_backup(str(tmp_path / "bad.npz"))
    assert training_state.load_backup(str(tmp_path / "absent.npz")) is None


def test_history_csv_round_trips_exactly(tmp_path):
    rows = [
        {"epoch": 1, "loss": 2.0 / 3.0, "accuracy": 0.1, "val_loss": 1e-8, "val_accuracy": 0.5},
        {"epoch": 2, "loss": 0.1 + 0.2, "accuracy": 0.25, "val_loss": 3.0, "val_accuracy": 0.75},
    ]
    path = tmp_path / "history.csv"
    path.write_text(training_callbacks.history_csv(rows))
    back = training_callbacks.read_history_csv(str(path))
    assert [r["epoch"] for r in back] == [1, 2]
    assert back[0]["loss"] == 2.0 / 3.0 and back[1]["loss"] == 0.1 + 0.2


def test_epoch_line_matches_the_tutorial_format():
    line = training_callbacks.format_epoch_line(3, 40, {"loss": 1.5321, "val_accuracy": 0.3861})
    assert line == "Epoch: [ 3/40], Train Loss: 1.532, Val Accuracy: 0.386"


def test_checkpoint_failure_keeps_the_previous_best(tmp_path):
    model = _tiny_model()
    path = str(tmp_path / "best.keras")
    checkpoint = training_callbacks.AtomicModelCheckpoint(
        path, monitor="val_accuracy", mode="max", save_best_only=True
    )
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_accuracy": 0.2})
    good = pathlib.Path(path).read_bytes()
    keras.saving.load_model(path)  # a complete model file

    def crash(filepath, **kwargs):
        pathlib.Path(filepath).write_bytes(b"half a zip")
        raise OSError("disk full")

    model.save = crash
    with pytest.raises(OSError, match="disk full"):
        checkpoint.on_epoch_end(1, {"val_accuracy": 0.4})
    assert pathlib.Path(path).read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["best.keras"]
    checkpoint.on_epoch_end(2, {"val_accuracy": 0.1})  # not better: nothing written
    assert pathlib.Path(path).read_bytes() == good


# --- the command line -------------------------------------------------------------------


def test_helpfull_documents_every_setting():
    result = subprocess.run(
        [sys.executable, "-m", "app.train", "--helpfull"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    import dataclasses

    names = [f.name for f in dataclasses.fields(training.TrainConfig)]
    names += ["dataset", "data_dir", "validation_split", "train_limit", "eval_limit", "flagfile"]
    missing = [
        n for n in names if f"--{n}" not in result.stdout and f"--[no]{n}" not in result.stdout
    ]
    assert not missing


RECIPES = (
    "cifar10_tutorial",
    "cifar10_finetune",
    "cifar10_scratch",
    "cifar10_cpu_quick",
    "cifar10_qat",
)
# Left to the command line: where the data is, and limits for quick runs.
NOT_IN_RECIPES = {"data_dir", "train_limit", "eval_limit"}


def test_recipes_are_complete_and_valid():
    """Every recipe sets every flag (but data location/limits) to a value the trainer accepts."""
    script = f"""
import dataclasses
import json
from absl import flags
from app import train, training
train.define_flags()
out = {{}}
for name in {list(RECIPES)!r}:
    values = flags.FlagValues()
    path = f"app/configs/{{name}}.flags"
    given = set()
    for line in open(path):
        if line.startswith("--"):
            flag = line.strip()[2:].split("=")[0]
            given.add(flag[2:] if flag.startswith("no") and flag[2:] in train._RECORDED else flag)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train", f"--flagfile={{path}}"])
    config = train.config_from_flags()
    if config.pretrained.endswith(".keras"):  # another recipe's run, not made here
        assert config.pretrained == "runs/cpu_quick/best.keras", config.pretrained
        config = dataclasses.replace(config, pretrained={__file__!r})
    training.check_config(config)
    out[name] = {{"missing": sorted(set(train._RECORDED) - given), "model_dir": config.model_dir}}
print(json.dumps(out))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name in RECIPES:
        assert set(report[name]["missing"]) <= NOT_IN_RECIPES, (name, report[name])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model=resnet9"], "--model"),
        (["--lr=-0.1"], "--lr"),
        (["--strategy=mirrored", "--logical_cpus=2", "--batch_size=33"], "--batch_size=33"),
        (["--strategy=spmd"], "--strategy"),
        (["--data_dir=/nonexistent/cifar10"], "/nonexistent/cifar10"),
    ],
)
def test_bad_flags_fail_with_one_line_before_any_work(tmp_path, flags, message):
    model_dir = tmp_path / "run"
    result = run_train(model_dir, "--model=resnet18", "--verbose=0", *flags, timeout=120)
    assert result.returncode != 0
    # (TensorFlow's C++ start-up notices may precede it: they are not ours to silence.)
    errors = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("error:") or "Flags parsing error" in line
    ]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not model_dir.exists()  # nothing written


# --- real runs --------------------------------------------------------------------------

# Small enough for CI, big enough to learn: ResNet-18 on 1280 real images, 2 epochs.
LEARNING_RUN = (
    "--model=resnet18",
    "--stem=imagenet",
    "--image_size=32",
    "--epochs=2",
    "--batch_size=32",
    "--lr=0.01",
    "--warmup_epochs=0.3",
    "--nesterov",
    "--weight_decay=5e-4",
    "--label_smoothing=0.1",
    "--train_limit=1280",
    "--eval_limit=200",
    "--deterministic",
    "--verbose=0",
)


@pytest.mark.slow
def test_training_writes_every_file_learns_and_flags_txt_reproduces_it(tmp_path, cifar10_dir):
    model_dir = tmp_path / "run"
    result = run_train(model_dir, f"--data_dir={cifar10_dir}", *LEARNING_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "best.keras",
        "flags.txt",
        "labels.txt",
        "preprocessing.json",
        "history.csv",
        "metrics.json",
        "samples.png",
        "curves.png",
    ):
        assert (model_dir / name).is_file(), name
    assert not (model_dir / "backup").exists()  # removed once finished

    # The tutorial-style epoch lines, then the final line naming best accuracy and file.
    lines = result.stdout.strip().splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("Epoch:")] == [
        "Epoch: [1/2]",
        "Epoch: [2/2]",
    ]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    history = history_rows(model_dir)
    assert [row["epoch"] for row in history] == [1, 2]
    best = max(history, key=lambda row: row["val_accuracy"])
    assert metrics["completed"] and metrics["best_val_accuracy"] == best["val_accuracy"]
    assert lines[-1] == (
        f"Best validation accuracy {best['val_accuracy']:.3f} at epoch {best['epoch']}, "
        f"saved to {model_dir / 'best.keras'}"
    )
    # It learns: well above chance (0.1 on 10 classes; 200 images give sd 0.02).
    assert metrics["best_val_accuracy"] >= 0.15
    assert history[1]["loss"] < history[0]["loss"]
    assert (model_dir / "labels.txt").read_text().split() == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    for png in ("samples.png", "curves.png"):
        assert (model_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The reloaded best.keras has the recorded accuracy on the same validation data.
    from app import data
    from models.bundle import load_model_bundle

    bundle = load_model_bundle(str(model_dir / "best.keras"))
    splits = data.load(
        data.DataConfig(data_dir=str(cifar10_dir), train_limit=1280, eval_limit=200, seed=0)
    )
    logits = bundle.model.predict(
        data.eval_dataset(splits.validation, bundle.preprocessing, 64), verbose=0
    )
    accuracy = float(np.mean(np.argmax(logits, axis=1) == splits.validation.labels))
    assert accuracy == pytest.approx(metrics["best_val_accuracy"], abs=1e-6)

    # TensorBoard scalars, one per epoch, for train and validation.
    import tensorflow as tf

    logged = {}
    for split in ("train", "validation"):
        for event_file in (model_dir / "logs" / split).iterdir():
            for event in tf.compat.v1.train.summary_iterator(str(event_file)):
                for value in event.summary.value:
                    scalar = float(tf.make_ndarray(value.tensor))
                    logged[(split, value.tag, event.step)] = scalar
    for row in history:
        assert logged[("validation", "epoch_accuracy", row["epoch"] - 1)] == pytest.approx(
            row["val_accuracy"]
        )
        assert logged[("train", "epoch_loss", row["epoch"] - 1)] == pytest.approx(row["loss"])

    # flags.txt reproduces the run exactly (--deterministic): same history, same weights.
    again = tmp_path / "again"
    result2 = run_train(again, f"--flagfile={model_dir / 'flags.txt'}", f"--model_dir={again}")
    assert result2.returncode == 0, result2.stderr[-3000:]
    assert history_rows(again) == history
    assert final_digest(result2.stdout) == final_digest(result.stdout)

    # Rerunning a finished run does not train it again.
    started = time.monotonic()
    result3 = run_train(model_dir, f"--data_dir={cifar10_dir}", *LEARNING_RUN)
    assert result3.returncode == 0, result3.stderr[-3000:]
    assert "nothing to train" in result3.stdout
    assert result3.stdout.strip().splitlines()[-1] == lines[-1]
    assert time.monotonic() - started < 60

    # Fine-tuning from it: head-only first epoch, then everything (recompiled).
    tuned = tmp_path / "tuned"
    result4 = run_train(
        tuned,
        f"--data_dir={cifar10_dir}",
        *LEARNING_RUN,
        f"--pretrained={model_dir / 'best.keras'}",
        "--freeze_backbone_epochs=1",
        "--train_limit=256",
        "--eval_limit=64",
        "--lr=0.002",
    )
    assert result4.returncode == 0, result4.stderr[-3000:]
    assert "Training the head only for 1 epoch(s)" in result4.stdout
    assert [row["epoch"] for row in history_rows(tuned)] == [1, 2]
    # The learning rate follows one schedule across the two phases.
    assert history_rows(tuned)[1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)


# Tiny and quick: the point is resumption, not learning.
RESUME_RUN = (
    "--model=resnet18",
    "--stem=cifar",
    "--image_size=16",
    "--epochs=3",
    "--batch_size=32",
    "--lr=0.002",
    "--train_limit=128",
    "--eval_limit=64",
    "--backup_every_steps=2",
    "--steps_per_execution=2",  # backups fall between executions
    "--verbose=0",
)


@pytest.mark.slow
def test_sigkilled_run_resumes_mid_epoch(tmp_path, cifar10_dir):
    model_dir = tmp_path / "run"
    flags = (f"--data_dir={cifar10_dir}", *RESUME_RUN)
    proc = start_train(model_dir, *flags)
    try:
        position = wait_for_backup(model_dir, (0, 0), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert (model_dir / "flags.txt").is_file()

    result = run_train(model_dir, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [line for line in result.stdout.splitlines() if line.startswith("Resuming from")]
    assert len(resumed) == 1, result.stdout
    epoch, step = (
        int(part.split("/")[0]) for part in resumed[0].split("epoch ")[1].split(", step ")
    )
    assert (epoch - 1, step) >= position  # no more than one backup interval redone
    assert [row["epoch"] for row in history_rows(model_dir)] == [1, 2, 3]
    keras.saving.load_model(str(model_dir / "best.keras"))
