"""Every place training reaches past the public Keras / TensorFlow API, and why.

Each function names the version it was written against (Keras 3.15, TensorFlow 2.21), the
private API it uses, and the upstream issue when one was found. Remove one when its
upstream fix lands (the slow tests of tests/test_distributed.py and tests/test_qat.py say
whether they are still needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras

from common.errors import UsageError
from common.files import atomic_path

if TYPE_CHECKING:
    import tensorflow as tf

    ElementSpec = tuple[tf.TensorSpec, tf.TensorSpec]


def configure_coordination_service(heartbeat_timeout: float, register_timeout: float) -> None:
    """Bounds how long a multi-worker job waits for a dead or missing worker.

    MultiWorkerMirroredStrategy starts TF's coordination service with its defaults when
    none is configured; configuring it first (the same jobs, the same leader) sets the
    heartbeat timeout (a worker that stops answering fails the job after it) and the
    time the workers wait for each other at start. TF 2.21 has no public API for this:
    private `context.configure_coordination_service` and `_coordination_service_config`.
    Upstream: no upstream issue found (searched 2026-11-30).

    Args:
        heartbeat_timeout: seconds without a heartbeat before a worker counts as dead.
        register_timeout: seconds the workers wait for each other at start.

    Raises:
        UsageError: TF_CONFIG does not describe a cluster of chief/worker tasks.
    """
    import tensorflow as tf
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    try:
        cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"TF_CONFIG is not a valid cluster description ({e}); see docs/training.md, "
            "Several machines"
        ) from e
    jobs = [j for j in ("chief", "worker") if j in cluster.jobs]
    if not jobs:
        raise UsageError(
            "TF_CONFIG names no chief or worker tasks; see docs/training.md, Several machines"
        )
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=j, num_tasks=cluster.num_tasks(j))
            for j in jobs
        ],
        heartbeat_timeout_in_ms=int(heartbeat_timeout * 1000),
        cluster_register_timeout_in_ms=int(register_timeout * 1000),
    )
    # Without a registration barrier a worker whose peers never start waits forever,
    # whatever the timeout; with it, start-up fails after cluster_register_timeout.
    context.context()._coordination_service_config.cluster_register_with_barrier = True


def build_metrics(model: keras.Model, element_spec: ElementSpec) -> None:
    """Creates the compiled loss and metric variables of `model` now, from `element_spec`.

    Keras creates them lazily, while tracing the first step; a resumed run must assign the
    backed-up epoch metrics before that. Keras 3.15 has no public way to build them without
    a batch of data, so this calls the private `Model._symbolic_build` that `fit` itself
    calls under a distribution strategy. Call it in the strategy's scope, after `compile`.
    Upstream: the request for a way to build only the compiled metrics,
    https://github.com/keras-team/keras/issues/19203 (open).
    """
    model._symbolic_build(data_batch=element_spec)


def work_around_keras_multi_worker(
    model: keras.Model, element_spec: ElementSpec, multi_worker: bool
) -> None:
    """Two Keras 3.15 bugs with distributed datasets / MultiWorkerMirroredStrategy.

    1. `fit`/`evaluate` call `_maybe_symbolic_build`, which averages the first distributed
       batch with `strategy.reduce(..., axis=None)` over the (images, labels) tuple; under
       MultiWorkerMirroredStrategy that raises "Attempt to convert a value (PerReplica...)".
       The model is built already: `_maybe_symbolic_build` is replaced by a build of the
       compiled metrics/loss from the element spec.
       Upstream: no issue for this exact error found (searched 2026-11-30); the open
       https://github.com/keras-team/keras/issues/20585 reports that Keras 3 `fit` under
       MultiWorkerMirroredStrategy fails (TensorFlow's own multi-worker tutorial).
    2. Under MultiWorkerMirroredStrategy, step outputs (scalar metric values) are reduced
       with `strategy.reduce("MEAN", v, axis=0)`, which fails on scalars ("Invalid
       reduction dimension 0 for input with 0 dimensions"). Returning them as [1]-vectors
       makes that reduction valid; the values are identical on every replica (the metric
       variables are synchronised), so their mean is exactly the value.
       Upstream: https://github.com/tensorflow/tensorflow/issues/72388 (closed as stale;
       TensorFlow pointed it to Keras 3).

    Args:
        model: the compiled model `fit` trains (more than one replica, or several workers).
        element_spec: the (images, labels) specs of one batch.
        multi_worker: whether the strategy spans several workers (bug 2 needs it).
    """
    import tensorflow as tf

    def symbolic_build(iterator=None, data_batch=None):
        with model.distribute_strategy.scope():
            build_metrics(model, element_spec)

    model._maybe_symbolic_build = symbolic_build
    if not multi_worker:
        return
    train_step, test_step = model.train_step, model.test_step

    def as_vectors(logs):
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    model.train_step = lambda data: as_vectors(train_step(data))
    model.test_step = lambda data: as_vectors(test_step(data))


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Whether a `MultiWorkerMirroredStrategy` spans several worker processes.

    TF 2.21 says so only through the private `extended._in_multi_worker_mode()` (a one-worker
    TF_CONFIG makes the same class run locally). Upstream: no issue found (searched
    2026-12-07).
    """
    return strategy.extended._in_multi_worker_mode()


def optimizer_slot(optimizer: keras.optimizers.Optimizer, slots: list, variable) -> Any:
    """The slot variable (momentum, ...) of `variable` among an optimizer's `slots`.

    Keras 3.15's optimizers find it with the private `_get_variable_index`, which an
    optimizer subclass with its own update (`recipe.FusedSGD`) has to call too. Upstream: no
    issue found (searched 2026-12-07).
    """
    return slots[optimizer._get_variable_index(variable)]


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` that never leaves a half-written file behind.

    Keras 3.15 writes straight to `filepath`, so a kill during the save leaves a broken
    `best.keras`. This overrides the private `_save_model` to write a temporary file beside
    it and move it into place; Keras still decides *whether* to save (the private
    `_should_save_model`). Upstream: no issue found (searched 2026-12-07); the closest,
    keras-team/keras#17012, is about resuming `save_best_only` after an interruption.
    """

    def __init__(self, filepath: str, saved_model: keras.Model | None = None, **kwargs):
        """`saved_model`: the model to write when `fit` trains a wrapper around it (`--qat`)."""
        super().__init__(filepath, **kwargs)
        self.saved_model = saved_model

    def _save_model(self, epoch, batch, logs):
        if self._should_save_model(epoch, batch, logs, self.filepath):
            with atomic_path(self.filepath, suffix=".keras") as tmp:
                (self.saved_model or self.model).save(tmp, overwrite=True)
