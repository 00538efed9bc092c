"""Training as a library: `train(TrainConfig, DataConfig)` runs `model.fit` end to end.

What `python -m app.train` does, without flags: picks a `tf.distribute` strategy, loads
the data (`app.data`), builds the ResNet (`models.resnet`) with its optimizer (SGD +
momentum, decoupled weight decay that skips batch-norm and bias parameters, cosine
learning rate with linear warmup) and loss (sparse cross-entropy on logits with optional
label smoothing) inside the strategy's scope, trains with validation every epoch, keeps
the best model in `best.keras`, and writes the run records. Killed at any point, the same
call resumes exactly where the last backup left it; a finished run is not trained again.

Example (from the repository root, in a fresh process: `train` configures TensorFlow):

    from app import data, training
    result = training.train(
        training.TrainConfig(model_dir="runs/x", model="resnet18", epochs=2, batch_size=64,
                             lr=0.05),
        data.DataConfig(data_dir="~/data/cifar10", train_limit=2000),
    )
    print(result.best_val_accuracy, result.best_path)

Modules, one job each:
    config       TrainConfig (every setting, documented), TrainResult, check_config.
    runtime      TF runtime settings, the strategy, the workers of a multi-worker job.
    recipe       the model, loss, learning-rate schedule and optimizer, compiled.
    callbacks    best checkpoint, history/metrics records, TensorBoard, mid-epoch backups.
    backup       where a run stands (RunState) and its backup file, for exact resumption.
    resume       a finished run to report, or an unfinished one to resume.
    plan         one run's sizes, schedule and `fit` calls (`RunPlan`).
    inputs       the datasets `fit` is fed.
    outputs      the files a run writes besides the records, and its result.
    workarounds  every use of private Keras/TF API, each with its reason and upstream issue.
    loop         `train()`: the outline, on one screen.
"""

from app.training.config import (
    PRECISIONS,
    STRATEGIES,
    TrainConfig,
    TrainResult,
    check_config,
    resolve_normalization,
    settings_fingerprint,
)
from app.training.loop import train
from app.training.runtime import WorkerLostError

__all__ = (
    "PRECISIONS",
    "STRATEGIES",
    "TrainConfig",
    "TrainResult",
    "WorkerLostError",
    "check_config",
    "resolve_normalization",
    "settings_fingerprint",
    "train",
)
