"""Does a speed setting cost accuracy? Same steps, same data, same seed, with and without it.

Trains our ResNet-50 from scratch on the real CIFAR-10 images for `--steps` steps (batch 128,
`app.data` pipeline with augmentation, SGD momentum 0.9, cosine learning rate with warmup,
the order of batches a pure function of the seed) once per case, then reports the accuracy
on the held-out validation images. Cases are `bench.bench_train` case names; the first is the
reference. Each case runs in this process one after the other, from the same initial weights
(those of the plain float32 model built with `--seed`), so separate runs compare too.

Usage (about 5 minutes per case per 300 steps on the 2-core machine):
    python -m bench.bench_accuracy --data_dir=~/data/cifar10 --steps=300 \\
        --cases=ours-imagenet-f32,ours-imagenet-f32+mm+fbn,ours-imagenet-bf16+mm+fbn
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import flags

from app import cli
from bench import common

DEFAULT_CASES = ("ours-imagenet-f32", "ours-imagenet-f32+mm+fbn", "ours-imagenet-bf16+mm+fbn")
DEFAULT_DATA_DIR = common.default_data_dir()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one case reached after the same training."""

    case: str
    train_loss: float
    val_loss: float
    val_accuracy: float
    images_per_s: float


def run(
    cases: tuple[str, ...],
    data_dir: str,
    steps: int = 300,
    batch_size: int = 128,
    learning_rate: float = 0.1,
    validation_images: int = 5000,
    seed: int = 0,
    log=print,
) -> list[Outcome]:
    """Trains each case for `steps` steps from the same start; evaluates on validation."""
    import keras

    from app import data
    from bench import bench_train, train_cases
    from models import preprocessing

    parsed = [train_cases.Case.parse(name) for name in cases]
    splits = data.load(
        data.DataConfig(data_dir=data_dir, validation_split=0.1, eval_limit=validation_images)
    )
    if log:
        log(f"  {splits.summary()}")
    prep = preprocessing.cifar(train_cases.IMAGE_SIZE)
    # Every case starts from the weights of the plain float32 model built with `seed`, so
    # runs with different case lists stay comparable and only the setting differs.
    keras.utils.set_random_seed(seed)
    first = parsed[0]
    plain = bench_train.build_model(
        train_cases.Case.parse(f"{first.model}-{first.stem}-f32"),
    )
    initial = plain.get_weights()
    del plain
    outcomes = []
    for case in parsed:
        keras.utils.set_random_seed(seed)
        model = bench_train.build_model(case)
        model.set_weights(initial)
        warmup = max(1, steps // 10)
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=steps - warmup,
            warmup_target=learning_rate,
            warmup_steps=warmup,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=schedule, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=case.jit_compile,
            steps_per_execution=case.steps_per_execution,
        )
        train = data.train_dataset(splits.train, prep, batch_size, seed=seed, augment=True)
        start = time.perf_counter()
        spe = case.steps_per_execution
        history = model.fit(train, steps_per_epoch=-(-steps // spe) * spe, epochs=1, verbose=0)
        seconds = time.perf_counter() - start
        val_loss, val_acc = model.evaluate(
            data.eval_dataset(splits.validation, prep, 256), verbose=0
        )
        outcome = Outcome(
            case.name,
            float(history.history["loss"][-1]),
            float(val_loss),
            float(val_acc),
            steps * batch_size / seconds,
        )
        outcomes.append(outcome)
        if log:
            log(
                f"  {case.name}: validation accuracy {val_acc:.4f}, loss {val_loss:.3f} "
                f"({outcome.images_per_s:.0f} images/s incl. tracing)"
            )
        del model
        keras.backend.clear_session()
    return outcomes


def report(outcomes: list[Outcome], steps: int, validation: int) -> str:
    """Markdown table; differences are against the first case."""
    ref = outcomes[0]
    return common.table(
        ["case", "final train loss", "val loss", "val accuracy", "Δ accuracy vs first", "images/s"],
        [
            (
                o.case,
                f"{o.train_loss:.3f}",
                f"{o.val_loss:.3f}",
                f"{100 * o.val_accuracy:.2f}%",
                f"{100 * (o.val_accuracy - ref.val_accuracy):+.2f} pt",
                f"{o.images_per_s:.0f}",
            )
            for o in outcomes
        ],
    ) + (f"\n\n{steps} steps of batch 128 each; {validation} validation images.")


def define_flags() -> None:
    flags.DEFINE_list("cases", list(DEFAULT_CASES), "bench.bench_train case names; first = ref.")
    flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Real CIFAR-10 (any app.data layout).")
    flags.DEFINE_integer("steps", 300, "Training steps per case.", lower_bound=2)
    flags.DEFINE_integer("batch_size", 128, "Images per step.", lower_bound=1)
    flags.DEFINE_float("learning_rate", 0.1, "Peak learning rate (after 10% warmup).")
    flags.DEFINE_integer("validation_images", 5000, "Validation images evaluated.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Initial weights and batch order.")


def main(argv: list[str]) -> None:
    del argv

    def flag(name: str):
        return flags.FLAGS[name].value

    from common.errors import UsageError

    if not os.path.isdir(flag("data_dir")):
        raise UsageError(f"--data_dir={flag('data_dir')} is not a folder; point it at CIFAR-10")
    print(common.environment())
    outcomes = run(
        tuple(flag("cases")),
        flag("data_dir"),
        steps=flag("steps"),
        batch_size=flag("batch_size"),
        learning_rate=flag("learning_rate"),
        validation_images=flag("validation_images"),
        seed=flag("seed"),
    )
    print(report(outcomes, flag("steps"), flag("validation_images")))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
