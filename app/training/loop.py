"""`train()`: the whole training run on one screen, in the order of a keras.io example.

Load the data, build the model in the strategy's scope, compile, `fit` with callbacks,
return the result. The rest sits behind named helpers: `resume` (a finished run, or a
backup to resume from), `run` (sizes, datasets, callbacks, files), `runtime` (strategy and
workers), `recipe` (model, loss, optimizer), `workarounds` (Keras/TF bugs).
"""

from __future__ import annotations

import keras

from app import data
from app.data import DataConfig
from app.training import resume
from app.training.config import (
    PRETRAINED_IMAGENET,
    TrainConfig,
    TrainResult,
    check_config,
    settings_fingerprint,
)
from app.training.guards import training_lock, write_errors_reported
from app.training.recipe import (
    build_model,
    compile_model,
    fetch_imagenet_weights,
    set_phase_trainable,
    training_model,
)
from app.training.run import Run
from app.training.runtime import (
    check_batch_divides,
    configure_runtime,
    is_multi_worker,
    lost_workers_reported,
    make_strategy,
    output_dir,
)
from app.training.workarounds import work_around_keras_multi_worker


def train(config: TrainConfig, data_config: DataConfig, flags_text: str = "") -> TrainResult:
    """Trains (or resumes, or reports a finished run) and returns the best result.

    Must be called before TensorFlow has executed anything in the process (the runtime
    and the strategy are configured here).

    Args:
        config: the training settings.
        data_config: where the data comes from.
        flags_text: the flagfile that reproduces the run, written to flags.txt.

    Returns:
        The best validation accuracy, its epoch and checkpoint, the history.

    Raises:
        UsageError, DataError, WeightsError: bad settings or input (before any training).
        WorkerLostError: another worker of a multi-worker job died.
    """
    check_config(config)
    configure_runtime(config)
    strategy = make_strategy(config)
    check_batch_divides(config, strategy)
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
        run = Run.plan(config, strategy, splits, out_dir, settings, backup)
        run.describe(backup)

        # The model, in the strategy's scope, before anything is written (weights may not load).
        if config.pretrained == PRETRAINED_IMAGENET:
            fetch_imagenet_weights(config.model, run.num_classes)
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            model = build_model(config, run.num_classes)
            trained = training_model(model, config)  # `model`, or with --qat its int8 twin too
        if run.distributed:
            work_around_keras_multi_worker(trained, run.element_spec, is_multi_worker(strategy))
        run.write_files(flags_text, data_config.seed)

        # Compile and fit: one fit per phase (frozen backbone, then full) and per half-done
        # epoch; the first compile restores the backup, if any.
        callbacks, records = run.callbacks(saved_model=model)
        validation = run.validation_data()
        for call in run.fit_calls():
            if call.new_phase:
                with strategy.scope():
                    set_phase_trainable(model, call.frozen_backbone, config)
                    compile_model(
                        trained, config, run.schedule, run.steps_per_execution, run.element_spec
                    )
                resume.restore_phase(trained, backup, call.phase, run.state, run.steps_per_epoch)
            restore_epoch_metrics = resume.epoch_metrics_restorer(backup, run.state)
            backup = None  # restored
            trained.fit(
                run.train_data(),
                initial_epoch=run.state.epoch,
                epochs=call.end_epoch,
                steps_per_epoch=run.steps_per_epoch - run.state.step,
                validation_data=validation,
                callbacks=[restore_epoch_metrics, *callbacks],
                verbose=config.verbose if run.chief else 0,
                shuffle=False,  # the pipeline orders each epoch itself
            )

        # The result.
        return run.finish(model, records)
