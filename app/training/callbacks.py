"""The callbacks of a training run: best checkpoint, run records, mid-epoch backups.

All of them share one `RunState` (where training stands, the history so far, the best
accuracy) so that a run cut into several `model.fit` calls by resumption and by the
frozen-backbone phase reads as one run in `history.csv`, `metrics.json` and the backup.
Order matters at the end of an epoch: checkpoint, then records, then the backup, so a
kill between any two leaves files that the resumed run rewrites consistently.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from app import plots
from app.training.backup import RunState, backup_path, save_backup
from app.training.config import BEST_FILE, LOGS_DIR
from app.training.plan import RunPlan
from app.training.workarounds import AtomicModelCheckpoint
from common import files

HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
# Written too when the logs have them (quantization-aware training, `--qat`).
QAT_COLUMNS = ("int8_accuracy", "agreement", "val_int8_accuracy", "val_agreement")


def format_epoch_line(epoch: int, epochs: int, logs: Mapping[str, float]) -> str:
    """The reference tutorial's per-epoch line, e.g. `Epoch: [ 3/40], Train Loss: ...`."""
    width = len(str(epochs))
    line = (
        f"Epoch: [{epoch:>{width}}/{epochs}], Train Loss: {logs.get('loss', math.nan):.3f}, "
        f"Val Accuracy: {logs.get('val_accuracy', math.nan):.3f}"
    )
    if "val_agreement" in logs:
        line += f", Val int8 Agreement: {logs['val_agreement']:.4f}"
    return line


def history_csv(history: Sequence[Mapping[str, float]]) -> str:
    """The history as CSV text, one row per epoch: fixed columns, then the QAT ones it has."""
    extra = tuple(k for k in QAT_COLUMNS if any(k in row for row in history))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS + extra, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return out.getvalue()


def read_history_csv(path: str) -> list[dict[str, float]]:
    """Reads `history.csv` back (epoch as int, the rest as float; empty cells left out)."""
    rows = csv.DictReader(io.StringIO(files.read_text(path), newline=""))
    return [
        {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
        for row in rows
    ]


def history_columns(history: Sequence[Mapping[str, float]]) -> dict[str, list[float]]:
    """{"loss": [...], "val_accuracy": [...], ...} as Keras' History has it."""
    return {k: [row[k] for row in history if k in row] for k in HISTORY_COLUMNS[1:]}


class RunRecords(keras.callbacks.Callback):
    """Keeps `RunState.history`/best up to date and writes the run records every epoch.

    Writes `history.csv`, `metrics.json` and `curves.png` into `directory` at the end of
    every epoch (always the whole history, so a resumed run never duplicates a row), and
    prints the tutorial-style line when `print_lines`.
    """

    def __init__(
        self,
        state: RunState,
        directory: str,
        epochs: int,
        summary: Callable[[RunState, bool], dict[str, Any]],
        print_lines: bool = True,
        prefix: str = "",
    ):
        super().__init__()
        self.state = state
        self.directory = directory
        self.epochs = epochs
        self.summary = summary
        self.print_lines = print_lines
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        row: dict[str, float] = {"epoch": epoch + 1}
        for key in HISTORY_COLUMNS[1:-1] + QAT_COLUMNS:
            if key in logs:
                row[key] = float(logs[key])
        row["learning_rate"] = current_learning_rate(self.model.optimizer)
        self.state.history = [r for r in self.state.history if r["epoch"] < epoch + 1] + [row]
        accuracy = row.get("val_accuracy", math.nan)
        if self.state.best is None or accuracy > self.state.best:
            self.state.best, self.state.best_epoch = accuracy, epoch + 1
        self.state.epoch, self.state.step = epoch + 1, 0
        self.write(completed=False)
        if self.print_lines:
            print(self.prefix + format_epoch_line(epoch + 1, self.epochs, row), flush=True)

    def write(self, completed: bool) -> None:
        """(Re)writes history.csv, metrics.json and curves.png from the state."""
        files.write_text(files.join(self.directory, HISTORY_FILE), history_csv(self.state.history))
        files.write_json(
            files.join(self.directory, METRICS_FILE),
            self.summary(self.state, completed),
            sort_keys=True,
        )
        if self.state.history:
            plots.save_curves(
                history_columns(self.state.history), files.join(self.directory, CURVES_FILE)
            )


def current_learning_rate(optimizer) -> float:
    """The learning rate the optimizer applies at its current iteration."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    return float(np.asarray(inner.learning_rate))


class EpochSummaries(keras.callbacks.Callback):
    """Per-epoch TensorBoard scalars: logs/train and logs/validation, Keras' tag names.

    Keras' TensorBoard callback needs the `tensorboard` package at training time; the epoch
    scalars (all this program logs) need only TF's own `tf.summary.write` with the scalars
    plugin's metadata, as TensorBoard itself does. View them with
    `make tensorboard RUN=<model_dir>` (requirements.txt pins `tensorboard`).
    """

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self._writers: dict[str, Any] = {}

    def _writer(self, name: str):
        import tensorflow as tf

        if name not in self._writers:
            # TF's own writer: any file system TensorFlow has, buckets included.
            self._writers[name] = tf.summary.create_file_writer(files.join(self.log_dir, name))
        return self._writers[name]

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )
        values = {("train", k): v for k, v in (logs or {}).items() if not k.startswith("val_")}
        values.update(
            {("validation", k[4:]): v for k, v in (logs or {}).items() if k.startswith("val_")}
        )
        values[("train", "learning_rate")] = current_learning_rate(self.model.optimizer)
        for (split, name), value in sorted(values.items()):
            with self._writer(split).as_default():
                tf.summary.write(
                    f"epoch_{name}",
                    tf.constant(float(value), tf.float32),
                    step=epoch,
                    metadata=metadata,
                )
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


class TrainingClock(keras.callbacks.Callback):
    """Adds the wall time spent in `fit` to `RunState.train_seconds`."""

    def __init__(self, state: RunState):
        super().__init__()
        self.state = state
        self._since: float | None = None

    def on_train_begin(self, logs=None):
        self._since = time.monotonic()

    def tick(self) -> None:
        """Banks the time since the last tick (called before every backup/record)."""
        now = time.monotonic()
        if self._since is not None:
            self.state.train_seconds += now - self._since
        self._since = now

    def on_epoch_end(self, epoch, logs=None):
        self.tick()

    def on_train_end(self, logs=None):
        self.tick()
        self._since = None


class RestoreEpochMetrics(keras.callbacks.Callback):
    """Puts back the running train metrics of a resumed, half-done epoch.

    `fit` resets the metrics before `on_epoch_begin`; assigning the backed-up sums here
    makes the epoch's logged train loss/accuracy those of an uninterrupted epoch.
    """

    def __init__(self, epoch: int, values: Sequence[np.ndarray] | None, assign: Callable):
        super().__init__()
        self.epoch = epoch
        self.values = values
        self.assign = assign

    def on_epoch_begin(self, epoch, logs=None):
        if self.values is not None and epoch == self.epoch:
            self.assign(self.model.metrics_variables, self.values)
            self.values = None


class MidEpochBackup(keras.callbacks.Callback):
    """Writes the full training state every `every_steps` batches and at every epoch end.

    Args:
        state: the shared `RunState`; its `epoch`/`step` say where this `fit` started.
        path: the backup file (`backup/state.npz`).
        every_steps: batches between mid-epoch backups (0: only at epoch ends).
        steps_per_epoch: batches in a full epoch.
        clock: banks the elapsed time into the state before each write.
    """

    def __init__(
        self,
        state: RunState,
        path: str,
        every_steps: int,
        steps_per_epoch: int,
        clock: TrainingClock,
    ):
        super().__init__()
        self.state = state
        self.path = path
        self.every_steps = every_steps
        self.steps_per_epoch = steps_per_epoch
        self.clock = clock
        self._first_step = 0

    def on_epoch_begin(self, epoch, logs=None):
        # The first epoch of a resumed fit starts at state.step; later ones at 0.
        self._first_step = self.state.step if epoch == self.state.epoch else 0
        self.state.epoch, self.state.step = epoch, self._first_step

    def on_train_batch_end(self, batch, logs=None):
        done = self._first_step + batch + 1  # `batch` is the last step index of the execution
        self.state.step = done
        if self.every_steps and done % self.every_steps == 0 and done < self.steps_per_epoch:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        # RunRecords (earlier in the list) has moved the state to (epoch + 1, 0).
        self.save()

    def save(self) -> None:
        self.clock.tick()
        model = self.model
        save_backup(
            self.path,
            self.state,
            {
                "model": model.variables,
                "optimizer": model.optimizer.variables,
                "metrics": model.metrics_variables,
            },
        )


def run_callbacks(
    plan: RunPlan,
    out_dir: str,
    saved_model: keras.Model,
    summary: Callable[[RunState, bool], dict[str, Any]],
    prefix: str = "",
) -> tuple[list[keras.callbacks.Callback], RunRecords]:
    """The callbacks of every `fit` of a run, in the order they must run at an epoch end
    (checkpoint, records, backup), and the records (written once more at the end).

    Args:
        plan: the run; its `state` is shared by every callback.
        out_dir: where this worker writes.
        saved_model: what `best.keras` holds (`fit` may train a wrapper around it).
        summary: metrics.json's document from the state (`outputs.summary`).
        prefix: put before printed lines (a non-chief worker's name).
    """
    c, state = plan.config, plan.state
    clock = TrainingClock(state)
    checkpoint = AtomicModelCheckpoint(
        files.join(out_dir, BEST_FILE),
        saved_model=saved_model,
        monitor="val_accuracy",
        mode="max",
        save_best_only=True,
        initial_value_threshold=state.best,
    )
    records = RunRecords(
        state, out_dir, c.epochs, summary, print_lines=c.verbose == 0, prefix=prefix
    )
    backups = MidEpochBackup(
        state, backup_path(out_dir), plan.backup_every, plan.steps_per_epoch, clock
    )
    summaries = EpochSummaries(files.join(out_dir, LOGS_DIR))
    records.write(completed=False)  # a resumed run drops rows of epochs it redoes
    return [clock, checkpoint, records, backups, summaries], records
