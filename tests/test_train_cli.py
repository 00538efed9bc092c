"""The training program, `python -m app.train`, run in a subprocess.

Fast tests check the command line: every setting is a documented flag derived from
`TrainConfig`, every recipe sets every flag, bad flags fail with one line before any work.
Slow tests train on real CIFAR-10 images: a short run writes every file and learns,
flags.txt reproduces it exactly, a finished run is not retrained, and a SIGKILLed run
resumes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from app.training import TrainConfig
from tests.helpers import (
    CIFAR10_CLASSES,
    REPO,
    RUN_FILES,
    error_lines,
    final_digest,
    history_rows,
    run_train,
    start_train,
    wait_for_backup,
)

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

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    names += ["dataset", "data_dir", "validation_split", "train_limit", "eval_limit", "flagfile"]
    missing = [
        n for n in names if f"--{n}" not in result.stdout and f"--[no]{n}" not in result.stdout
    ]
    assert not missing


def test_flags_are_derived_from_the_documented_config_fields():
    """One flag per TrainConfig field, in field order, with the field's help, default,
    choices and bounds: a setting's help lives in one place."""
    script = """
import dataclasses
import json
from absl import flags
from app import train
from app.training import TrainConfig
train.define_flags()
rows = []
for field in dataclasses.fields(TrainConfig):
    flag, parser = flags.FLAGS[field.name], flags.FLAGS[field.name].parser
    rows.append({
        "name": field.name,
        "meta": {k: list(v) if k == "choices" else v for k, v in field.metadata.items()},
        "field_default": None if field.default is dataclasses.MISSING else field.default,
        "flag": {"help": flag.help, "default": flag.default,
                 "choices": getattr(parser, "enum_values", None),
                 "lower_bound": getattr(parser, "lower_bound", None),
                 "upper_bound": getattr(parser, "upper_bound", None)},
    })
print(json.dumps({"recorded": train._RECORDED, "rows": rows}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = report["rows"]
    assert report["recorded"][: len(rows)] == [row["name"] for row in rows]
    for row in rows:
        meta, flag = row["meta"], row["flag"]
        assert meta["help"], row["name"]
        choices = meta.get("choices")
        prefix = f"<{'|'.join(choices)}>: " if choices else ""
        assert flag["help"] == prefix + meta["help"], row
        assert flag["choices"] == choices, row
        expected_default = "runs/train" if row["name"] == "model_dir" else row["field_default"]
        assert flag["default"] == expected_default, row
        for bound in ("lower_bound", "upper_bound"):
            assert flag[bound] == meta.get(bound), (bound, row)


RECIPES = sorted(p.stem for p in (REPO / "app" / "configs").glob("*.flags"))
# Left to the command line: where the data is and how it is stored (shards' label offset),
# limits for quick runs and image sizes, and the machine's memory budget.
NOT_IN_RECIPES = {
    "data_dir",
    "label_offset",
    "memory_budget_mb",
    "train_limit",
    "eval_limit",
    "max_pixels",
}


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


@pytest.mark.slow  # five processes, each importing TensorFlow
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
    for name in RUN_FILES:
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
    assert (model_dir / "labels.txt").read_text().split() == CIFAR10_CLASSES
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
    # ... read as TensorBoard (`make tensorboard`) reads them: its scalars, per epoch.
    from tensorboard.backend.event_processing import event_accumulator

    for split, tags in (
        ("train", ("epoch_loss", "epoch_accuracy", "epoch_learning_rate")),
        ("validation", ("epoch_loss", "epoch_accuracy")),
    ):
        events = event_accumulator.EventAccumulator(str(model_dir / "logs" / split))
        events.Reload()
        for tag in tags:
            assert events.SummaryMetadata(tag).plugin_data.plugin_name == "scalars", tag
            shown = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}
            assert shown == {k[2]: v for k, v in logged.items() if k[:2] == (split, tag)}
            assert sorted(shown) == [0, 1], tag

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
        # One training per model_dir: a second one exits at once, naming the holder.
        second = run_train(model_dir, *flags)
        assert proc.poll() is None, "the first run stopped"
        assert second.returncode == 2, second.stderr[-3000:]
        errors = error_lines(second.stderr)
        assert len(errors) == 1, second.stderr[-3000:]
        assert f"is in use by app.train pid {proc.pid} on host " in errors[0]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert (model_dir / "flags.txt").is_file()
    assert (model_dir / "train.lock").is_file()  # left by the killed run

    result = run_train(model_dir, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"taking over train.lock left by app.train pid {proc.pid} " in result.stdout
    assert not (model_dir / "train.lock").exists()  # released at the end
    resumed = [line for line in result.stdout.splitlines() if line.startswith("Resuming from")]
    assert len(resumed) == 1, result.stdout
    epoch, step = (
        int(part.split("/")[0]) for part in resumed[0].split("epoch ")[1].split(", step ")
    )
    assert (epoch - 1, step) >= position  # no more than one backup interval redone
    assert [row["epoch"] for row in history_rows(model_dir)] == [1, 2, 3]
    keras.saving.load_model(str(model_dir / "best.keras"))


DATA_FLAGS = ("data_dir", "dataset", "train_limit", "eval_limit", "max_pixels")


@pytest.mark.parametrize(
    ("program", "listed"),
    [
        ("app.train", ("model_dir", "mixed_precision", *DATA_FLAGS)),
        ("app.evaluate", ("model", "split", "flip", *DATA_FLAGS)),
        ("app.visualize", ("output", "split", *DATA_FLAGS)),
        ("app.predict", ("model", "top_k", "json", "max_pixels")),
        ("app.export", ("model", "export_dir", "formats", "representative_data", "max_pixels")),
    ],
)
def test_help_lists_the_flags_a_user_sets(program, listed):
    """--help shows the program's own flags and the data flags, not absl's/TensorFlow's;
    --model of the programs that read exports names every format, .onnx included."""
    result = subprocess.run(
        [sys.executable, "-m", program, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Try --helpfull" in result.stdout, result.stderr[-3000:]  # (absl exits 1 here)
    listed_now = {line.split(":")[0].strip() for line in result.stdout.splitlines()}
    for name in listed:
        assert {f"--{name}", f"--[no]{name}"} & listed_now, name
    assert "--verbosity" not in listed_now  # absl's own, behind --helpfull
    if program in ("app.predict", "app.evaluate"):
        model_help = result.stdout.split("  --model:")[1].split("\n  --")[0]
        missing = [f for f in (".keras", "SavedModel", ".tflite", ".onnx") if f not in model_help]
        assert not missing, model_help
