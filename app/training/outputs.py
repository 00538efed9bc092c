"""The files a training run leaves in --model_dir besides the callbacks' records and the
backup: flags.txt, labels.txt, preprocessing.json and samples.png before the first step;
metrics.json's document; and the finished run's result.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from app import data, plots
from app.training.backup import RunState, backup_path
from app.training.config import BEST_FILE, FLAGS_FILE, NUM_SAMPLES, SAMPLES_FILE, TrainResult
from app.training.plan import RunPlan
from app.training.runtime import is_chief, worker_name
from common import files
from common.errors import UsageError
from models.bundle import write_labels

if TYPE_CHECKING:
    import tensorflow as tf

    from app.training.callbacks import RunRecords


def weights_digest(model: keras.Model) -> str:
    """sha256 of every model variable's bytes, in order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for variable in model.variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def write_start_files(
    out_dir: str, flags_text: str, plan: RunPlan, splits: data.Splits, sample_seed: int
) -> None:
    """flags.txt, labels.txt, preprocessing.json and samples.png, before training."""
    files.makedirs(out_dir)
    if flags_text:
        files.write_text(files.join(out_dir, FLAGS_FILE), flags_text)
    write_labels(out_dir, splits.class_names)
    plan.preprocessing.save(out_dir)
    images, labels = data.sample_images(splits.train, NUM_SAMPLES, sample_seed)
    plots.save_samples_grid(images, labels, splits.class_names, files.join(out_dir, SAMPLES_FILE))


def summary(
    plan: RunPlan,
    splits: data.Splits,
    strategy: tf.distribute.Strategy,
    state: RunState,
    completed: bool,
) -> dict[str, Any]:
    """metrics.json: the run's figures so far (or final, when `completed`)."""
    c = plan.config
    images = len(state.history) * plan.steps_per_epoch * c.batch_size
    return {
        "completed": completed,
        "best_val_accuracy": state.best,
        "best_epoch": state.best_epoch,
        "best_path": files.join(c.model_dir, BEST_FILE),
        "epochs_done": len(state.history),
        "epochs": c.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "global_batch_size": c.batch_size,
        "replicas": strategy.num_replicas_in_sync,
        "train_examples": splits.train.num_examples,
        "validation_examples": splits.validation.num_examples,
        "class_names": splits.class_names,
        "normalization": plan.preprocessing.name,
        # Wall time inside model.fit over all restarts (validation included).
        "train_seconds": round(state.train_seconds, 3),
        "train_images_per_second": (
            round(images / state.train_seconds, 1) if state.train_seconds > 0 else None
        ),
        "final": state.history[-1] if state.history else None,
        "final_weights_sha256": state.final_weights_sha256 if completed else None,
        "history": state.history,
        "settings": state.settings,
    }


def finish(
    plan: RunPlan,
    out_dir: str,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    records: RunRecords,
    **fitted: Any,
) -> TrainResult:
    """Records the finished run, drops its backup (unless kept) and returns the result.

    Args:
        plan: the run.
        out_dir: where this worker wrote.
        strategy: the run's strategy.
        model: the model `best.keras` holds.
        records: the run records, written once more.
        **fitted: `TrainResult.fit_model` and `train_dataset`.

    Raises:
        UsageError: no epoch reached a finite validation accuracy (training diverged).
    """
    c, state = plan.config, plan.state
    if state.best is None or not math.isfinite(state.best):
        raise UsageError(
            "training diverged: no epoch reached a finite validation accuracy; lower --lr"
        )
    state.final_weights_sha256 = weights_digest(model)
    records.write(completed=True)
    if not c.keep_backup:
        files.rmtree(files.dirname(backup_path(out_dir)))
    return TrainResult(
        best_val_accuracy=state.best,
        best_epoch=state.best_epoch,
        best_path=files.join(c.model_dir, BEST_FILE),
        history=state.history,
        model_dir=c.model_dir,
        final_weights_sha256=state.final_weights_sha256,
        is_chief=is_chief(strategy),
        worker=worker_name(strategy),
        resumed_from=plan.resumed_from,
        **fitted,
    )
