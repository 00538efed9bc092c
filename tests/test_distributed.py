"""Multi-replica and multi-worker training, and exact resumption after kills.

All slow: each test runs `python -m app.train` processes (two workers talk over
127.0.0.1 only). A tiny deterministic recipe (ResNet-18, 16x16 real CIFAR-10 images)
keeps each run to seconds of training; the reference is the same recipe on the default
strategy with the same global batch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time

import keras
import numpy as np
import pytest

from app.training import TrainConfig
from app.training.backup import backup_path, load_backup, read_state
from app.training.recipe import build_model
from tests.helpers import (
    REPO,
    final_digest,
    history_rows,
    require_cifar10,
    run_train,
    start_train,
    train_command,
    wait_for_backup,
)

pytestmark = pytest.mark.slow

# 3 epochs of 4 steps, a backup every 2 steps; the final state is kept for comparison.
RECIPE = (
    "--model=resnet18",
    "--stem=cifar",
    "--image_size=16",
    "--batch_size=32",
    "--lr=0.002",
    "--epochs=3",
    "--train_limit=128",
    "--eval_limit=64",
    "--backup_every_steps=2",
    "--keep_backup",
    "--deterministic",
    "--synchronized_bn",
    "--verbose=0",
)
SEED_CONFIG = TrainConfig(
    model_dir="", model="resnet18", stem="cifar", image_size=16, synchronized_bn=True
)


@pytest.fixture(scope="module")
def data_flag() -> str:
    return f"--data_dir={require_cifar10()}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_flag):
    """The recipe on the default strategy, never killed: (model_dir, stdout)."""
    model_dir = tmp_path_factory.mktemp("reference")
    result = run_train(model_dir, data_flag, *RECIPE)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir, result.stdout


def final_weights(model_dir) -> list[np.ndarray]:
    """The weights at the end of training (from the kept final backup)."""
    backup = load_backup(backup_path(str(model_dir)))
    assert backup is not None and backup.state.epoch == 3
    return backup.arrays["model"]


def initial_weights() -> list[np.ndarray]:
    """What app.train starts from with --seed=0 (the same seeded build)."""
    keras.utils.set_random_seed(0)
    return [v.numpy() for v in build_model(SEED_CONFIG, 10).variables]


def assert_same_training(model_dir, reference_dir) -> None:
    """Same history within float tolerance, and the same weight update.

    Summing a gradient in two halves rounds differently and a dozen steps amplify that,
    so histories match to ~1e-3, not bit for bit. A real difference (unsynchronised
    batch norm, a wrong batch split or gradient scale) moves the weights by a sizeable
    part of the whole update, which the second check measures.
    """
    history, ref_history = history_rows(model_dir), history_rows(reference_dir)
    assert [r["epoch"] for r in history] == [r["epoch"] for r in ref_history] == [1, 2, 3]
    for row, ref in zip(history, ref_history, strict=True):
        for key in ("loss", "val_loss", "learning_rate"):
            assert row[key] == pytest.approx(ref[key], rel=2e-2), (key, row, ref)
        for key in ("accuracy", "val_accuracy"):  # an example or two may flip
            assert row[key] == pytest.approx(ref[key], abs=2.5 / 64), (key, row, ref)
    start, ref_final, final = (
        initial_weights(),
        final_weights(reference_dir),
        final_weights(model_dir),
    )
    update = sum(float(np.sum((b - a) ** 2)) for a, b in zip(start, ref_final, strict=True))
    error = sum(float(np.sum((c - b) ** 2)) for b, c in zip(ref_final, final, strict=True))
    assert update > 0
    assert np.sqrt(error / update) < 0.05, np.sqrt(error / update)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_env(ports: list[int], index: int, tmpdir=None) -> dict[str, str]:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
    }
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def start_workers(model_dirs, flags, logs, tmpdirs=(None, None)) -> list[subprocess.Popen]:
    ports = free_ports(2)
    procs = []
    for i in range(2):
        procs.append(
            subprocess.Popen(
                train_command(model_dirs[i], "--strategy=multi_worker_mirrored", *flags),
                cwd=REPO,
                env=worker_env(ports, i, tmpdirs[i]),
                stdout=open(logs[i], "w"),  # noqa: SIM115 - closed with the process
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=60)


def finish_workers(procs, logs) -> list[str]:
    """Waits for `start_workers`' processes to succeed; returns their logs."""
    try:
        for p in procs:
            p.wait(timeout=400)
    finally:
        stop(procs)
    out = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], out
    return out


def resumed_position(log_text: str) -> tuple[int, int] | None:
    """(epoch 0-based, step) from the `Resuming from ...` line, if any."""
    for line in log_text.splitlines():
        if line.startswith("Resuming from"):
            epoch, step = line.split("epoch ")[1].split(", step ")
            return int(epoch.split("/")[0]) - 1, int(step.split("/")[0])
    return None


# --- one machine, two replicas ----------------------------------------------------------


def test_mirrored_over_two_logical_cpus_matches_the_default_strategy(
    tmp_path, data_flag, reference
):
    result = run_train(tmp_path, data_flag, *RECIPE, "--strategy=mirrored", "--logical_cpus=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["replicas"] == 2
    assert_same_training(tmp_path, reference[0])


# --- two worker processes ---------------------------------------------------------------


def test_two_workers_train_together_fail_fast_when_one_dies_and_resume(
    tmp_path, data_flag, reference
):
    model_dir = tmp_path / "run"
    worker_tmp = tmp_path / "worker1_tmp"  # worker 1's TMPDIR, to watch its scratch files
    worker_tmp.mkdir()
    flags = (data_flag, *RECIPE, "--heartbeat_timeout=10")
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    procs = start_workers([model_dir, model_dir], flags, logs, (None, worker_tmp))
    try:
        position = wait_for_backup(model_dir, (0, 0), procs[0])
        # The non-chief writes its copies of every file to a throw-away directory.
        scratch = list(worker_tmp.glob("app-train-worker-*"))
        assert len(scratch) == 1 and (scratch[0] / "flags.txt").is_file()
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        stop(procs)
    chief_log = logs[0].read_text()
    assert procs[0].returncode not in (0, None), chief_log
    assert elapsed < 60, f"the chief took {elapsed:.0f} s to notice"
    errors = [line for line in chief_log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, chief_log
    assert "lost contact with another worker" in errors[0]
    assert "restart every worker" in errors[0]
    assert "Traceback" not in chief_log

    logs = [tmp_path / "w0b.log", tmp_path / "w1b.log"]
    procs = start_workers([model_dir, model_dir], flags, logs, (None, worker_tmp))
    out = finish_workers(procs, logs)
    assert resumed_position(out[0]) >= position  # from the last backup, not from scratch
    # Gradients were all-reduced: both workers end with bit-identical weights.
    assert final_digest(out[0]) == final_digest(out[1])
    # Only the chief reports and writes; the non-chief's scratch directory is gone.
    assert "Best validation accuracy" in out[0] and "Best validation accuracy" not in out[1]
    assert list(worker_tmp.glob("app-train-worker-*")) == []  # also the killed one's
    for name in ("best.keras", "history.csv", "metrics.json", "curves.png", "samples.png"):
        assert (model_dir / name).is_file()
    assert json.loads((model_dir / "metrics.json").read_text())["replicas"] == 2
    # Each worker read its half of every global batch: the same training as one process.
    assert_same_training(model_dir, reference[0])


# --- kills ------------------------------------------------------------------------------


def test_killed_three_times_then_finished_equals_never_killed(tmp_path, data_flag, reference):
    flags = (data_flag, *RECIPE)
    model_dir = tmp_path / "killed"
    seed = int(time.time())
    rng = random.Random(seed)
    # Backups fall every 2 of the 4 steps of an epoch; kill once in each epoch, a random
    # moment (up to 0.4 s: a few steps) after a randomly chosen backup has appeared.
    targets = [(0, 2), rng.choice([(1, 0), (1, 2)]), rng.choice([(2, 0), (2, 2)])]
    previous = (-1, 0)
    for kill, target in enumerate(targets):
        log = tmp_path / f"run{kill}.log"
        proc = start_train(model_dir, *flags, log=open(log, "w"))  # noqa: SIM115
        try:
            reached = wait_for_backup(model_dir, (target[0], target[1] - 1), proc)
            time.sleep(rng.uniform(0.0, 0.4))
            last = read_state(backup_path(str(model_dir)))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (seed, "finished before the kill")
        resumed = resumed_position(log.read_text())
        if kill:
            # Resumed from the last backup before the kill: at most one interval redone.
            assert resumed is not None and resumed >= previous, (seed, resumed, previous)
        previous = max(reached, (last.epoch, last.step)) if last else reached
        rows = [row["epoch"] for row in history_rows(model_dir)]
        assert rows == list(range(1, len(rows) + 1)), (seed, rows)  # none lost or doubled
        if (model_dir / "best.keras").exists():
            keras.saving.load_model(str(model_dir / "best.keras"))  # always loadable

    result = run_train(model_dir, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_position(result.stdout) >= previous
    reference_dir, reference_stdout = reference
    assert history_rows(model_dir) == history_rows(reference_dir), seed
    assert final_digest(result.stdout) == final_digest(reference_stdout), seed
    for a, b in zip(final_weights(model_dir), final_weights(reference_dir), strict=True):
        np.testing.assert_array_equal(a, b)


def test_killed_after_the_last_backup_finishes_with_the_trained_weights(
    tmp_path, data_flag, reference
):
    """A kill between the last epoch's backup and the final records: the rerun has nothing
    left to fit and reports the final weights of the backup, not freshly built ones."""
    model_dir = tmp_path / "run"
    shutil.copytree(reference[0], model_dir)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    metrics["completed"] = False
    (model_dir / "metrics.json").write_text(json.dumps(metrics))
    result = run_train(model_dir, data_flag, *RECIPE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds this run, finished" not in result.stdout
    assert final_digest(result.stdout) == final_digest(reference[1])
    assert json.loads((model_dir / "metrics.json").read_text())["completed"]
