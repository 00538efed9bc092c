"""Input pipeline speed next to the ResNet-50 training step it feeds.

Usage (from the repository root; about a minute on 2 CPU cores):

    python -m bench.bench_data

Prints one row per image size: the training pipeline's images/s alone (app.data.train_dataset
over CIFAR-sized uint8 images held in memory, as `load` keeps CIFAR-10, with augmentation:
pad-crop-flip at 32x32, random-resized-crop when upsampling to 224x224), the images/s of a
ResNet-50 training step (SGD with momentum, `train_on_batch` on synthetic data) at the same
size, and their ratio. The pipeline should be >= 20x the step at 32x32, so that it takes at
most ~5% of the CPU the step needs and never makes the model wait.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench import common

PIPELINE_SECONDS = 4.0  # timed iteration per pipeline row, after warm-up
TARGET_RATIO_32 = 20.0
# (image size, pipeline batch, train batch, timed train steps)
ROWS = ((32, 128, 128, 4), (224, 32, 8, 2))


def _examples(n: int = 50_000, size: int = 32):
    from app.data import Examples

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Examples(rng.integers(0, 10, n).astype(np.int64), images=images, origin="synthetic")


def pipeline_rate(image_size: int, batch: int, seconds: float = PIPELINE_SECONDS) -> float:
    """Images/s of `train_dataset` (augmented, normalised, batched) consumed as fast as it can."""
    from app import data
    from models import preprocessing

    prep = preprocessing.cifar(32) if image_size == 32 else preprocessing.imagenet(image_size)
    it = iter(data.train_dataset(_examples(), prep, batch, seed=0, augment=True))
    for _ in range(5):  # warm-up: tracing, autotuning, prefetch buffers
        next(it)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, _ = next(it)
        images += int(x.shape[0])
    return images / (time.perf_counter() - start)


def train_step_rate(image_size: int, batch: int, steps: int, stem: str = "imagenet") -> float:
    """Images/s of ResNet-50 `train_on_batch` (SGD momentum 0.9) at `image_size`: the
    median over `steps` timed steps, after two untimed ones (tracing, first steps)."""
    import keras

    from models import resnet

    keras.backend.clear_session()
    model = resnet.resnet50(num_classes=10, input_shape=(image_size, image_size, 3), stem=stem)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    stats = common.time_calls(lambda: model.train_on_batch(x, y), repeats=steps, warmup=2)
    return batch / stats.median


def main() -> list[dict]:
    """Measures and prints the table; returns its rows (for bench.run_all)."""
    started = time.perf_counter()
    print(common.environment())
    rows = []
    for size, pipe_batch, train_batch, steps in ROWS:
        pipe = pipeline_rate(size, pipe_batch)
        step = train_step_rate(size, train_batch, steps)
        rows.append(
            {
                "size": size,
                "pipeline_images_per_s": pipe,
                "train_step_images_per_s": step,
                "ratio": pipe / step,
                "pipeline_batch": pipe_batch,
                "train_batch": train_batch,
            }
        )
    print("\nInput pipeline (app.data.train_dataset, augmented) vs ResNet-50 training step")
    print(report(rows))
    ratio_32 = rows[0]["ratio"]
    verdict = "meets" if ratio_32 >= TARGET_RATIO_32 else "MISSES"
    print(
        f"32x32: the pipeline is {ratio_32:,.0f}x the train step ({verdict} the >= "
        f"{TARGET_RATIO_32:.0f}x target); load average {common.load_average()} at the end; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    return rows


def report(rows: list[dict]) -> str:
    """The Markdown table of `main`'s rows."""
    return common.table(
        ["size", "pipeline images/s", "ResNet-50 train step images/s", "ratio"],
        [
            (
                f"{r['size']}x{r['size']}",
                f"{r['pipeline_images_per_s']:,.0f} (batch {r['pipeline_batch']})",
                f"{r['train_step_images_per_s']:,.1f} (batch {r['train_batch']})",
                f"{r['ratio']:,.0f}x",
            )
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
