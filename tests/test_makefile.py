"""The Makefile's commands, read with `make -n` (printed, not run)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def planned(target: str, *assignments: str) -> list[str]:
    """The command lines `make -n target VAR=value ...` prints, one string per command."""
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", target, *assignments],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.replace("\\\n", " ").splitlines()


def train_command(*assignments: str) -> list[str]:
    lines = [line for line in planned("train", *assignments) if "-m app.train" in line]
    assert len(lines) == 1, lines
    return lines[0].split()


@pytest.mark.parametrize(
    "recipe", ["app/configs/cifar10_tutorial.flags", "app/configs/folder_finetune.flags"]
)
def test_train_leaves_the_recipes_model_dir_alone(recipe):
    args = train_command(f"RECIPE={recipe}")
    assert f"--flagfile={recipe}" in args
    assert not any(a.startswith(("--model_dir", "--data_dir")) for a in args), args


def test_train_passes_model_dir_and_data_dir_when_given():
    args = train_command(
        "RECIPE=app/configs/cifar10_tutorial.flags", "MODEL_DIR=runs/t", "DATA_DIR=~/data/c"
    )
    # After the flagfile, so they override the recipe's values.
    assert args[-3:] == [
        "--flagfile=app/configs/cifar10_tutorial.flags",
        "--model_dir=runs/t",
        "--data_dir=~/data/c",
    ]


@pytest.mark.parametrize(
    ("assignments", "logdir"),
    [((), "runs"), (("RUN=runs/cpu_quick",), "runs/cpu_quick"), (("MODEL_DIR=runs/t",), "runs/t")],
)
def test_tensorboard_shows_the_run(assignments, logdir):
    lines = [line for line in planned("tensorboard", *assignments) if "tensorboard " in line]
    assert lines and lines[-1].split()[-1] == f"--logdir={logdir}"


def test_the_suite_runs_on_test_workers_processes():
    (suite,) = [line for line in planned("test") if "-m pytest" in line]
    assert "-n 2 --dist loadfile" in suite, suite
    (serial,) = [line for line in planned("test", "TEST_WORKERS=0") if "-m pytest" in line]
    assert "-n" not in serial.split(), serial
    (fast,) = [line for line in planned("test-fast", "TEST_WORKERS=3") if "-m pytest" in line]
    assert "-n 3 --dist loadfile" in fast and '-m "not slow"' in fast, fast
