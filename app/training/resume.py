"""Rerunning into a model directory: report a finished run, or resume an unfinished one.

A finished run (its metrics.json says `completed`) is reported, not trained again; an
unfinished one resumes from its backup (`backup.py`). Either must have been made with the
same settings; a run with other settings is refused, the first difference named.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import keras

from app.training import callbacks
from app.training.backup import Backup, RunState, assign, backup_path, first_difference, load_backup
from app.training.config import BEST_FILE, TrainResult
from app.training.runtime import is_chief, worker_name
from common import files
from common.errors import UsageError

if TYPE_CHECKING:
    import tensorflow as tf


def find_previous_run(
    model_dir: str, settings: dict[str, Any]
) -> tuple[dict[str, Any] | None, Backup | None]:
    """(metrics.json of a finished run, the backup of an unfinished one) in `model_dir`.

    Raises:
        UsageError: `model_dir` holds a run with other settings.
    """
    finished = _finished_run(model_dir, settings)
    if finished is not None:
        return finished, None
    backup = load_backup(backup_path(model_dir))
    if backup is not None:
        diff = first_difference(backup.state.settings, settings)
        if diff:
            raise UsageError(
                f"--model_dir {model_dir} holds an unfinished run with other settings "
                f"({diff}); rerun with its flags (flags.txt) to resume it, or pass a new "
                "--model_dir"
            )
    return None, backup


def _finished_run(model_dir: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """metrics.json of a finished run in `model_dir` (None if there is none)."""
    path = files.join(model_dir, callbacks.METRICS_FILE)
    if not files.isfile(path):
        return None
    try:
        metrics = json.loads(files.read_text(path))
    except (OSError, ValueError):
        return None
    if not metrics.get("completed"):
        return None
    diff = first_difference(metrics.get("settings", {}), settings)
    if diff:
        raise UsageError(
            f"--model_dir {model_dir} already holds a finished run with other settings "
            f"({diff}); pass a new --model_dir"
        )
    return metrics


def finished_result(
    model_dir: str, metrics: dict[str, Any], strategy: tf.distribute.Strategy
) -> TrainResult:
    """The result of the finished run whose metrics.json is `metrics`, said once."""
    chief = is_chief(strategy)
    if chief:
        print(f"{model_dir} holds this run, finished; nothing to train.", flush=True)
    return TrainResult(
        best_val_accuracy=metrics["best_val_accuracy"],
        best_epoch=metrics["best_epoch"],
        best_path=files.join(model_dir, BEST_FILE),
        history=metrics["history"],
        model_dir=model_dir,
        final_weights_sha256=metrics["final_weights_sha256"],
        is_chief=chief,
        worker=worker_name(strategy),
    )


def restore_phase(
    model: keras.Model, backup: Backup | None, phase: str, state: RunState, steps_per_epoch: int
) -> None:
    """Puts a just-compiled phase where the run stands.

    From a backup: every model variable, and the optimizer's when the backup was taken in
    the same phase (the frozen-backbone phase has its own optimizer, over the head only).
    Otherwise the new optimizer continues the schedule where the last one stopped.
    """
    if backup is not None:
        assign(model.variables, backup.arrays["model"], "model", backup.path)
    if backup is not None and backup.state.optimizer_phase == phase:
        assign(model.optimizer.variables, backup.arrays["optimizer"], "optimizer", backup.path)
    else:
        model.optimizer.iterations.assign(state.epoch * steps_per_epoch + state.step)
    state.optimizer_phase = phase


def restore_weights(model: keras.Model, backup: Backup) -> None:
    """Every model variable from `backup` (a run killed after the backup of its last epoch,
    before its final records: nothing is left to fit, but the final weights are the
    backup's)."""
    assign(model.variables, backup.arrays["model"], "model", backup.path)


def epoch_metrics_restorer(backup: Backup | None, state: RunState) -> callbacks.RestoreEpochMetrics:
    """The callback that puts back a half-done epoch's metric sums (a no-op otherwise)."""
    values = backup.arrays.get("metrics") if backup is not None and state.step else None
    path = backup.path if backup is not None else ""
    return callbacks.RestoreEpochMetrics(
        state.epoch, values, lambda variables, saved: assign(variables, saved, "metric", path)
    )
