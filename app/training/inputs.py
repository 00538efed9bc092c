"""What `fit` is fed: the run's training and validation datasets, one per input pipeline
when the strategy distributes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app import data
from app.training.plan import RunPlan
from app.training.runtime import is_distributed, is_multi_worker

if TYPE_CHECKING:
    import tensorflow as tf


def _dataset(strategy: tf.distribute.Strategy, make: Callable[[Any], tf.data.Dataset]):
    """`make(input_context)` as one dataset, or one per input pipeline when distributed."""
    if is_distributed(strategy):
        return strategy.distribute_datasets_from_function(make)
    return make(None)


def input_pipelines(strategy: tf.distribute.Strategy) -> int:
    """The input pipelines `fit` reads through: one per worker of a multi-worker job."""
    if not is_multi_worker(strategy):
        return 1
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)


def train_input(strategy: tf.distribute.Strategy, splits: data.Splits, plan: RunPlan):
    """The endless training batches from where the run stands."""
    c, epoch, step = plan.config, plan.state.epoch, plan.state.step
    return _dataset(
        strategy,
        lambda ctx: data.train_dataset(
            splits.train,
            plan.preprocessing,
            c.batch_size,
            seed=c.seed,
            augment=c.augment,
            start_epoch=epoch,
            start_step=step,
            input_context=ctx,
        ),
    )


def validation_input(strategy: tf.distribute.Strategy, splits: data.Splits, plan: RunPlan):
    """The validation batches, evaluated at every epoch end."""
    return _dataset(
        strategy,
        lambda ctx: data.eval_dataset(
            splits.validation, plan.preprocessing, plan.config.batch_size, ctx
        ),
    )
