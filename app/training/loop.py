"""`train()`: the whole training run on one screen, in the order of a keras.io example.

Load the data, build the model in the strategy's scope, compile, `fit` with callbacks,
return the result. The rest sits behind named helpers: `resume` (a finished run, or a
backup to resume from), `plan` (sizes, schedule, `fit` calls), `inputs` (datasets),
`callbacks`, `outputs` (files and the result), `runtime` (strategy and workers), `recipe`
(model, loss, optimizer), `workarounds` (Keras/TF bugs).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import keras

from app import data
from app.data import DataConfig
from app.training import inputs, outputs, resume
from app.training.callbacks import run_callbacks
from app.training.config import (
    PRETRAINED_IMAGENET,
    TrainConfig,
    TrainResult,
    check_config,
    settings_fingerprint,
)
from app.training.guards import training_lock, write_errors_reported
from app.training.plan import RunPlan, describe
from app.training.recipe import (
    build_model,
    compile_model,
    fetch_imagenet_weights,
    set_phase_trainable,
    training_model,
)
from app.training.runtime import (
    check_batch_divides,
    configure_runtime,
    is_chief,
    is_distributed,
    is_multi_worker,
    lost_workers_reported,
    make_strategy,
    output_dir,
    worker_name,
)
from app.training.workarounds import work_around_keras_multi_worker


def train(
    config: TrainConfig,
    data_config: DataConfig,
    flags_text: str = "",
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainResult:
    """Trains (or resumes, or reports a finished run) and returns the best result.

    Must be called before TensorFlow has executed anything in the process (the runtime
    and the strategy are configured here).

    Args:
        config: the training settings.
        data_config: where the data comes from.
        flags_text: the flagfile that reproduces the run, written to flags.txt.
        callbacks: more Keras callbacks for every `fit` call, after the run's own (a
            profiler's, say); they see the model `fit` trains as `self.model`.

    Returns:
        The best validation accuracy, its epoch and checkpoint, the history; and what `fit`
        trained (`fit_model`, `train_dataset`) for callers that measure it.

    Raises:
        UsageError, DataError, WeightsError: bad settings or input (before any training).
        WorkerLostError: another worker of a multi-worker job died.
    """
    check_config(config)
    configure_runtime(config)
    strategy = make_strategy(config)
    check_batch_divides(config, strategy)
    chief = is_chief(strategy)
    with (
        lost_workers_reported(strategy, config.model_dir),
        write_errors_reported(config.model_dir),
        training_lock(config.model_dir, strategy),
        output_dir(config.model_dir, strategy) as out_dir,
    ):
        settings = settings_fingerprint(config, data_config)
        finished, backup = resume.find_previous_run(config.model_dir, settings)
        if finished is not None:
            return resume.finished_result(config.model_dir, finished, strategy)

        # Data.
        splits = data.load(data_config)
        plan = RunPlan.make(config, splits, settings, backup, inputs.input_pipelines(strategy))
        if chief:
            print("\n".join(describe(plan, splits, strategy, backup)), flush=True)

        # The model, in the strategy's scope, before anything is written (weights may not load).
        if config.pretrained == PRETRAINED_IMAGENET:
            fetch_imagenet_weights(config.model, plan.num_classes)
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            model = build_model(config, plan.num_classes)
            trained = training_model(model, config)  # `model`, or with --qat its int8 twin too
        if is_distributed(strategy):
            work_around_keras_multi_worker(trained, plan.element_spec, is_multi_worker(strategy))
        outputs.write_start_files(out_dir, flags_text, plan, splits, data_config.seed)

        # Compile and fit: one fit per phase (frozen backbone, then full) and per half-done
        # epoch; the first compile restores the backup, if any.
        summary = partial(outputs.summary, plan, splits, strategy)
        prefix = "" if chief else f"[{worker_name(strategy)}] "
        own_callbacks, records = run_callbacks(plan, out_dir, model, summary, prefix)
        validation = inputs.validation_input(strategy, splits, plan)
        train_data = None
        for call in plan.fit_calls():
            if call.new_phase:
                if call.frozen_backbone and chief:
                    print(
                        f"Training the head only for {config.freeze_backbone_epochs} epoch(s) "
                        "(backbone frozen)",
                        flush=True,
                    )
                with strategy.scope():
                    set_phase_trainable(model, call.frozen_backbone, config)
                    compile_model(
                        trained, config, plan.schedule, plan.steps_per_execution, plan.element_spec
                    )
                resume.restore_phase(trained, backup, call.phase, plan.state, plan.steps_per_epoch)
            restore_epoch_metrics = resume.epoch_metrics_restorer(backup, plan.state)
            backup = None  # restored
            train_data = inputs.train_input(strategy, splits, plan)
            trained.fit(
                train_data,
                initial_epoch=plan.state.epoch,
                epochs=call.end_epoch,
                steps_per_epoch=plan.steps_per_epoch - plan.state.step,
                validation_data=validation,
                callbacks=[restore_epoch_metrics, *own_callbacks, *callbacks],
                verbose=config.verbose if chief else 0,
                shuffle=False,  # the pipeline orders each epoch itself
            )

        if backup is not None:  # killed after its last epoch's backup: nothing left to fit
            resume.restore_weights(trained, backup)

        # The result.
        return outputs.finish(
            plan, out_dir, strategy, model, records, fit_model=trained, train_dataset=train_data
        )
