"""What a training run works out before its first step: sizes, schedule, where it stands.

`RunPlan.make` sizes the run on its data (steps per epoch and per execution, backup interval,
learning-rate schedule, normalisation) from the start or from a backup; `fit_calls` cuts what
is left into `model.fit` calls; `describe` says it all in a few lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import keras

from app import data
from app.training.backup import Backup, RunState
from app.training.config import TrainConfig, resolve_normalization
from app.training.recipe import lr_schedule
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


@dataclasses.dataclass
class RunPlan:
    """The sizes of one run and where it stands (`state`, shared with the callbacks)."""

    config: TrainConfig
    num_classes: int
    preprocessing: Preprocessing
    steps_per_epoch: int
    steps_per_execution: int
    backup_every: int
    schedule: keras.optimizers.schedules.LearningRateSchedule
    state: RunState
    resumed_from: tuple[int, int] | None  # (epoch, step) of the backup resumed from
    input_pipelines: int = 1  # workers, each reading its own files of streamed data

    @classmethod
    def make(
        cls,
        config: TrainConfig,
        splits: data.Splits,
        settings: dict[str, Any],
        backup: Backup | None,
        input_pipelines: int = 1,
    ) -> RunPlan:
        """Sizes the run on `splits`, from the start or from `backup`; `input_pipelines`
        (the workers) matter to streamed data, where each reads its own files.

        Raises:
            app.data.DataError: the training split makes no full batch.
        """
        steps_per_epoch = data.steps_per_epoch(splits.train, config.batch_size, input_pipelines)
        spe = effective_steps_per_execution(config.steps_per_execution, steps_per_epoch)
        backup_every = config.backup_every_steps
        if backup_every and backup_every % spe:
            backup_every += spe - backup_every % spe  # backups fall between executions
        warmup_steps = round(config.warmup_epochs * steps_per_epoch)
        state = backup.state if backup is not None else RunState()
        state.settings = settings
        return cls(
            config=config,
            num_classes=len(splits.class_names),
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
            input_pipelines=input_pipelines,
        )

    @property
    def element_spec(self) -> tuple[tf.TensorSpec, tf.TensorSpec]:
        """The (images, labels) specs of one batch."""
        import tensorflow as tf

        size = self.config.image_size
        return tf.TensorSpec([None, size, size, 3], tf.float32), tf.TensorSpec([None], tf.int32)

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
            yield FitCall(current, current != phase, end_epoch)
            phase = current


def describe(
    plan: RunPlan, splits: data.Splits, strategy: tf.distribute.Strategy, backup: Backup | None
) -> list[str]:
    """The lines that say what will be trained, on what, and from where."""
    import tensorflow as tf

    c, spe = plan.config, plan.steps_per_execution
    lines = [
        splits.summary(),
        f"{c.model} ({c.stem} stem, {plan.preprocessing.name} normalisation, "
        f"{c.image_size}px), {c.epochs} epochs x {plan.steps_per_epoch} steps of "
        f"{c.batch_size} images, {strategy.num_replicas_in_sync} replica(s) "
        f"({type(strategy).__name__})" + (f", steps_per_execution {spe}" if spe > 1 else ""),
    ]
    if splits.train.streamed:
        used = plan.steps_per_epoch * c.batch_size
        lines.append(
            f"streamed: {plan.input_pipelines} worker(s), each reading its own TFRecord files; "
            f"an epoch trains on {used} of the {splits.train.num_examples} examples (the "
            "others, at the end of some worker's seeded order, wait for the next epoch)"
        )
    size_note = data.size_note(splits.train, c.image_size)
    if size_note:
        lines.append(f"note: {size_note}")
    if c.mixed_precision == "fp16" and not tf.config.list_logical_devices("GPU"):
        lines.append(
            "note: --mixed_precision=fp16 is emulated on CPUs and very slow; use bf16 or none"
        )
    if spe != c.steps_per_execution:
        lines.append(
            f"note: --steps_per_execution={c.steps_per_execution} does not divide the "
            f"{plan.steps_per_epoch} steps of an epoch; using {spe}"
        )
    if backup is not None:
        lines.append(
            f"Resuming from {backup.path}: epoch {plan.state.epoch + 1}/{c.epochs}, "
            f"step {plan.state.step}/{plan.steps_per_epoch}"
        )
    return lines
