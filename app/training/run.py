"""One training run: what it works out before its first step, what it feeds `fit`, what it writes.

`Run.plan` sizes the run (steps per epoch and per execution, backup interval, learning-rate
schedule, normalisation) and `Run.fit_calls` cuts it into `fit` calls; the rest are the
datasets, callbacks and files that `loop.train` hands to Keras or leaves in --model_dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from app import data, plots
from app.training import callbacks as callbacks_lib
from app.training.backup import Backup, RunState, backup_path
from app.training.config import (
    BEST_FILE,
    FLAGS_FILE,
    LOGS_DIR,
    NUM_SAMPLES,
    SAMPLES_FILE,
    TrainConfig,
    TrainResult,
    resolve_normalization,
)
from app.training.recipe import lr_schedule
from app.training.runtime import is_chief, is_distributed, worker_name
from common.errors import UsageError
from common.files import write_text_atomic
from models.bundle import write_labels
from models.preprocessing import Preprocessing, by_name

if TYPE_CHECKING:
    import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class FitCall:
    """One `fit` of a run: from where the run stands to `end_epoch`, in `phase`.

    `phase` is "frozen" (head only, backbone frozen) or "full"; `new_phase`: compile first.
    """

    phase: str
    new_phase: bool
    end_epoch: int

    @property
    def frozen_backbone(self) -> bool:
        return self.phase == "frozen"


def effective_steps_per_execution(requested: int, steps_per_epoch: int) -> int:
    """The largest divisor of the epoch's steps that is <= `requested`.

    Keras runs whole executions of `steps_per_execution` batches, so an epoch whose
    length it does not divide would eat into the next epoch's batches and break the
    exact (epoch, step) bookkeeping of resumption.
    """
    return max(d for d in range(1, min(requested, steps_per_epoch) + 1) if steps_per_epoch % d == 0)


def weights_digest(model: keras.Model) -> str:
    """sha256 of every model variable's bytes, in order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for variable in model.variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class Run:
    """What one training run works out before its first step, and its helpers."""

    config: TrainConfig
    strategy: Any  # tf.distribute.Strategy
    out_dir: str  # --model_dir on the chief, a scratch directory on other workers
    splits: data.Splits
    preprocessing: Preprocessing
    steps_per_epoch: int
    steps_per_execution: int
    backup_every: int
    schedule: keras.optimizers.schedules.LearningRateSchedule
    state: RunState
    resumed_from: tuple[int, int] | None  # (epoch, step) of the backup resumed from

    @classmethod
    def plan(
        cls,
        config: TrainConfig,
        strategy: tf.distribute.Strategy,
        splits: data.Splits,
        out_dir: str,
        settings: dict[str, Any],
        backup: Backup | None,
    ) -> Run:
        """Sizes the run on `splits`, from the start or from `backup`.

        Raises:
            UsageError: the training split makes no full batch.
        """
        steps_per_epoch = data.steps_per_epoch(splits.train, config.batch_size)
        if steps_per_epoch < 1:
            raise UsageError(
                f"{splits.train.num_examples} training examples make no full batch of "
                f"--batch_size={config.batch_size}; lower it or use more data"
            )
        spe = effective_steps_per_execution(config.steps_per_execution, steps_per_epoch)
        backup_every = config.backup_every_steps
        if backup_every and backup_every % spe:
            backup_every += spe - backup_every % spe  # backups fall between executions
        warmup_steps = round(config.warmup_epochs * steps_per_epoch)
        state = backup.state if backup is not None else RunState()
        state.settings = settings
        return cls(
            config=config,
            strategy=strategy,
            out_dir=out_dir,
            splits=splits,
            preprocessing=by_name(
                resolve_normalization(config.normalization, config.pretrained), config.image_size
            ),
            steps_per_epoch=steps_per_epoch,
            steps_per_execution=spe,
            backup_every=backup_every,
            schedule=lr_schedule(
                config.lr, config.min_lr, config.epochs * steps_per_epoch, warmup_steps
            ),
            state=state,
            resumed_from=(state.epoch, state.step) if backup is not None else None,
        )

    @property
    def chief(self) -> bool:
        return is_chief(self.strategy)

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    @property
    def distributed(self) -> bool:
        return is_distributed(self.strategy)

    @property
    def element_spec(self) -> tuple[tf.TensorSpec, tf.TensorSpec]:
        """The (images, labels) specs of one batch."""
        import tensorflow as tf

        size = self.config.image_size
        return tf.TensorSpec([None, size, size, 3], tf.float32), tf.TensorSpec([None], tf.int32)

    def say(self, *args) -> None:
        """Prints on the chief only."""
        if self.chief:
            print(*args, flush=True)

    def describe(self, backup: Backup | None) -> None:
        """Says what will be trained, on what, and from where."""
        import tensorflow as tf

        c, spe = self.config, self.steps_per_execution
        self.say(self.splits.summary())
        self.say(
            f"{c.model} ({c.stem} stem, {self.preprocessing.name} normalisation, "
            f"{c.image_size}px), {c.epochs} epochs x {self.steps_per_epoch} steps of "
            f"{c.batch_size} images, {self.strategy.num_replicas_in_sync} replica(s) "
            f"({type(self.strategy).__name__})"
            + (f", steps_per_execution {spe}" if spe > 1 else "")
        )
        size_note = data.size_note(self.splits.train, c.image_size)
        if size_note:
            self.say(f"note: {size_note}")
        if c.mixed_precision == "fp16" and not tf.config.list_logical_devices("GPU"):
            self.say(
                "note: --mixed_precision=fp16 is emulated on CPUs and very slow; use bf16 or none"
            )
        if spe != c.steps_per_execution:
            self.say(
                f"note: --steps_per_execution={c.steps_per_execution} does not divide the "
                f"{self.steps_per_epoch} steps of an epoch; using {spe}"
            )
        if backup is not None:
            self.say(
                f"Resuming from {backup.path}: epoch {self.state.epoch + 1}/{c.epochs}, "
                f"step {self.state.step}/{self.steps_per_epoch}"
            )

    def fit_calls(self) -> Iterator[FitCall]:
        """The `fit` calls from where the run stands to its end.

        One per phase (frozen backbone, then full), and one more for a half-done epoch of a
        resumed run. Lazy: each reads the state the previous `fit` left.
        """
        c, state = self.config, self.state
        frozen_epochs, phase = c.freeze_backbone_epochs, None
        while state.epoch < c.epochs:
            current = "frozen" if state.epoch < frozen_epochs else "full"
            if state.step:  # a half-done epoch is a fit of its own
                end_epoch = state.epoch + 1
            else:
                end_epoch = frozen_epochs if current == "frozen" else c.epochs
            if current == "frozen" and current != phase:
                self.say(f"Training the head only for {frozen_epochs} epoch(s) (backbone frozen)")
            yield FitCall(current, current != phase, end_epoch)
            phase = current

    def _dataset(self, make: Callable[[Any], tf.data.Dataset]):
        """`make(input_context)` as one dataset, or one per input pipeline when distributed."""
        if self.distributed:
            return self.strategy.distribute_datasets_from_function(make)
        return make(None)

    def train_data(self):
        """The endless training batches from where the run stands."""
        c, epoch, step = self.config, self.state.epoch, self.state.step
        return self._dataset(
            lambda ctx: data.train_dataset(
                self.splits.train,
                self.preprocessing,
                c.batch_size,
                seed=c.seed,
                augment=c.augment,
                start_epoch=epoch,
                start_step=step,
                input_context=ctx,
            )
        )

    def validation_data(self):
        """The validation batches, evaluated at every epoch end."""
        return self._dataset(
            lambda ctx: data.eval_dataset(
                self.splits.validation, self.preprocessing, self.config.batch_size, ctx
            )
        )

    def write_files(self, flags_text: str, sample_seed: int) -> None:
        """flags.txt, labels.txt, preprocessing.json and samples.png, before training."""
        os.makedirs(self.out_dir, exist_ok=True)
        if flags_text:
            write_text_atomic(os.path.join(self.out_dir, FLAGS_FILE), flags_text)
        write_labels(self.out_dir, self.splits.class_names)
        self.preprocessing.save(self.out_dir)
        images, labels = data.sample_images(self.splits.train, NUM_SAMPLES, sample_seed)
        plots.save_samples_grid(
            images, labels, self.splits.class_names, os.path.join(self.out_dir, SAMPLES_FILE)
        )

    def callbacks(
        self, saved_model: keras.Model
    ) -> tuple[list[keras.callbacks.Callback], callbacks_lib.RunRecords]:
        """The callbacks of every `fit`, in the order they must run at an epoch end
        (checkpoint, records, backup), and the records (written once more at the end).

        `saved_model` is what `best.keras` holds (`fit` may train a wrapper around it).
        """
        c, state, out_dir = self.config, self.state, self.out_dir
        clock = callbacks_lib.TrainingClock(state)
        checkpoint = callbacks_lib.AtomicModelCheckpoint(
            os.path.join(out_dir, BEST_FILE),
            saved_model=saved_model,
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            initial_value_threshold=state.best,
        )
        records = callbacks_lib.RunRecords(
            state,
            out_dir,
            c.epochs,
            self.summary,
            print_lines=c.verbose == 0,
            prefix="" if self.chief else f"[{worker_name(self.strategy)}] ",
        )
        backups = callbacks_lib.MidEpochBackup(
            state, backup_path(out_dir), self.backup_every, self.steps_per_epoch, clock
        )
        summaries = callbacks_lib.EpochSummaries(os.path.join(out_dir, LOGS_DIR))
        records.write(completed=False)  # a resumed run drops rows of epochs it redoes
        return [clock, checkpoint, records, backups, summaries], records

    def summary(self, state: RunState, completed: bool) -> dict[str, Any]:
        """metrics.json."""
        c = self.config
        images = len(state.history) * self.steps_per_epoch * c.batch_size
        return {
            "completed": completed,
            "best_val_accuracy": state.best,
            "best_epoch": state.best_epoch,
            "best_path": os.path.join(c.model_dir, BEST_FILE),
            "epochs_done": len(state.history),
            "epochs": c.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch_size": c.batch_size,
            "replicas": self.strategy.num_replicas_in_sync,
            "train_examples": self.splits.train.num_examples,
            "validation_examples": self.splits.validation.num_examples,
            "class_names": self.splits.class_names,
            "normalization": self.preprocessing.name,
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

    def finish(self, model: keras.Model, records: callbacks_lib.RunRecords) -> TrainResult:
        """Records the finished run, drops its backup (unless kept) and returns the result.

        Raises:
            UsageError: no epoch reached a finite validation accuracy (training diverged).
        """
        c, state = self.config, self.state
        if state.best is None or not math.isfinite(state.best):
            raise UsageError(
                "training diverged: no epoch reached a finite validation accuracy; lower --lr"
            )
        state.final_weights_sha256 = weights_digest(model)
        records.write(completed=True)
        if not c.keep_backup:
            shutil.rmtree(os.path.dirname(backup_path(self.out_dir)), ignore_errors=True)
        return TrainResult(
            best_val_accuracy=state.best,
            best_epoch=state.best_epoch,
            best_path=os.path.join(c.model_dir, BEST_FILE),
            history=state.history,
            model_dir=c.model_dir,
            final_weights_sha256=state.final_weights_sha256,
            is_chief=self.chief,
            worker=worker_name(self.strategy),
            resumed_from=self.resumed_from,
        )
