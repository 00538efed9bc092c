"""Every data source's training pipeline against the default recipe's step, listing a large
image folder, and how long a resumed run waits for its first batch.

Usage (from the repository root; a few minutes on 2 CPU cores):

    python -m bench.bench_sources [--data_dir=~/data/cifar10] [--shards_dir=DIR]

Rows, on 10,000 real CIFAR-10 images at 32x32 with the default recipe's augmentation and
batch 128 (`app.data.train_dataset` consumed as fast as it can): decoded once in memory (as
`load` keeps CIFAR-10), an image folder decoded in the pipeline, TFRecord shards written by
`app.make_shards` and streamed, and a TFDS dataset streamed from its files. Each against
the default recipe's step (`app/configs/cifar10_cpu_quick.flags`: ResNet-18, ImageNet
stem, batch 128, its precision on this machine; `train_on_batch`): the pipeline should
make at least 20x the images the step takes, so that it takes at most ~5% of the CPU.

Listing: 100,000 generated 1x1 PNGs in 100 class folders, listed and loaded (`data.load`:
a sample of headers, not all, when the data is over the memory budget), and the memory
each file costs. Resume: the first batch of a streamed epoch at step 0 and mid-epoch, from
`--shards_dir` (default: the 10,000-image shards).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from bench import common

PIPELINE_SECONDS = 4.0
TARGET_RATIO = 20.0
IMAGES = 10_000
LISTED_FILES = 100_000
RECIPE_BATCH = 128


def _rate(examples, seconds: float = PIPELINE_SECONDS) -> float:
    from app import data
    from models import preprocessing

    it = iter(data.train_dataset(examples, preprocessing.cifar(32), RECIPE_BATCH, seed=0))
    for _ in range(5):  # warm-up: tracing, autotuning, prefetch buffers
        next(it)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += int(next(it)[0].shape[0])
    return images / (time.perf_counter() - start)


def recipe_step_rate(steps: int = 4) -> tuple[float, str]:
    """Images/s of the default recipe's training step, and its precision."""
    import keras
    import numpy as np

    from app.training import TrainConfig
    from app.training.runtime import resolve_precision
    from models import resnet

    precision, _ = resolve_precision(TrainConfig(model_dir="", mixed_precision="auto"))
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    try:
        model = resnet.build("resnet18", num_classes=10, input_shape=(32, 32, 3), stem="imagenet")
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        rng = np.random.default_rng(0)
        x = rng.standard_normal((RECIPE_BATCH, 32, 32, 3)).astype(np.float32)
        y = rng.integers(0, 10, RECIPE_BATCH)
        stats = common.time_calls(lambda: model.train_on_batch(x, y), repeats=steps, warmup=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return RECIPE_BATCH / stats.median, precision


def _tfds_dir(images, labels, class_names, where: str) -> str:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.dataset_builders.TfDataBuilder(
        name="cifar_subset",
        version="1.0.0",
        split_datasets={
            "train": tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        },
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=class_names),
            }
        ),
        data_dir=where,
    )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=8))
    return where


def source_rows(data_dir: str, scratch: str) -> tuple[list[dict], str]:
    """(one row per source, the shards folder written)."""
    from app import data, make_shards_lib
    from app.data import DataConfig

    limited = DataConfig(data_dir=data_dir, train_limit=IMAGES, eval_limit=100)
    in_memory = data.load(limited)
    folder = data.load(dataclasses.replace(limited, memory_budget_mb=0))
    shards_dir = os.path.join(scratch, "shards")
    make_shards_lib.make_shards(make_shards_lib.ShardsConfig(limited, shards_dir, 8, verbose=0))
    shards = data.load(DataConfig(data_dir=shards_dir, memory_budget_mb=0))
    tfds_root = _tfds_dir(
        in_memory.train.images, in_memory.train.labels, in_memory.class_names,
        os.path.join(scratch, "tfds"),
    )  # fmt: skip
    tfds = data.load(
        DataConfig(dataset="cifar_subset", data_dir=tfds_root, memory_budget_mb=0)
    ).train
    rows = []
    for name, examples in (
        ("in memory (decoded once, as load keeps CIFAR-10)", in_memory.train),
        ("image folder (JPEG files decoded in the pipeline)", folder.train),
        ("TFRecord shards (app.make_shards, streamed)", shards.train),
        ("TFDS (JPEG, streamed from its files)", tfds),
    ):
        rows.append({"source": name, "images_per_s": _rate(examples)})
    return rows, shards_dir


def listing_row(scratch: str, n: int = LISTED_FILES) -> dict:
    """Lists and loads a folder of `n` tiny PNGs; seconds, and bytes per file."""
    import tracemalloc

    from app import data
    from app.data import DataConfig, image_folder

    png = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944"
        "4154789c63f8ffff3f0005fe02fe0dc7d4f70000000049454e44ae426082"
    )
    root = os.path.join(scratch, "listing")
    for c in range(100):
        folder = os.path.join(root, f"class{c:03d}")
        os.makedirs(folder)
        for i in range(n // 100):
            with open(os.path.join(folder, f"{i:05d}.png"), "wb") as f:
                f.write(png)
    tracemalloc.start()
    start = time.perf_counter()
    raw = image_folder.load_image_folder(root)
    listed = time.perf_counter() - start
    per_file = tracemalloc.get_traced_memory()[0] / n
    tracemalloc.stop()
    start = time.perf_counter()
    splits = data.load(DataConfig(data_dir=root, memory_budget_mb=0))
    loaded = time.perf_counter() - start
    assert raw.train.num_examples == n and splits.train.files is not None
    return {"files": n, "list_s": listed, "load_s": loaded, "bytes_per_file": per_file}


def resume_row(shards_dir: str) -> dict:
    """Seconds to the first batch of epoch 3 at step 0 and mid-epoch (streamed)."""
    from app import data
    from app.data import DataConfig
    from models import preprocessing

    train = data.load(DataConfig(data_dir=shards_dir, memory_budget_mb=0)).train
    steps = data.steps_per_epoch(train, RECIPE_BATCH)
    times = {}
    for step in (0, steps // 2):
        start = time.perf_counter()
        ds = data.train_dataset(
            train, preprocessing.cifar(32), RECIPE_BATCH, seed=0, start_epoch=2, start_step=step
        )
        next(iter(ds))
        times[step] = time.perf_counter() - start
    return {"examples": train.num_examples, "steps": steps, "times": times}


def define_flags() -> None:
    flags.DEFINE_string(
        "data_dir", None, "Real CIFAR-10 images; default: CIFAR10_DIR or ~/data/cifar10."
    )
    flags.DEFINE_string("shards_dir", None, "Shards to time a resume on; default: the 10,000.")


def main(data_dir: str | None = None, shards_dir: str | None = None) -> dict:
    """Measures and prints the tables; returns the results (for bench.run_all)."""
    started = time.perf_counter()
    print(common.environment())
    data_dir = data_dir or common.default_data_dir()
    with tempfile.TemporaryDirectory(prefix="bench_sources-") as scratch:
        rows, made = source_rows(data_dir, scratch)
        step, precision = recipe_step_rate()
        listing = listing_row(scratch)
        resume = resume_row(shards_dir or made)
    result = {"rows": rows, "step": step, "precision": precision, "listing": listing,
              "resume": resume}  # fmt: skip
    print(report(result))
    print(f"{time.perf_counter() - started:.0f} s in all; load average {common.load_average()}")
    return result


def report(result: dict) -> str:
    """The Markdown of `main`'s results."""
    step = result["step"]
    table = common.table(
        ["source (32x32, augmented, batch 128)", "images/s", "x the default recipe's step"],
        [
            (r["source"], f"{r['images_per_s']:,.0f}", f"{r['images_per_s'] / step:,.1f}x")
            for r in result["rows"]
        ],
    )
    misses = [r["source"] for r in result["rows"] if r["images_per_s"] < TARGET_RATIO * step]
    listing, resume = result["listing"], result["resume"]
    mid = max(resume["times"])
    return "\n".join(
        [
            table,
            "",
            f"The default recipe's step (ResNet-18, ImageNet stem, 32x32, batch 128, "
            f"{result['precision']}, train_on_batch): {step:,.0f} images/s. Under the "
            f"{TARGET_RATIO:.0f}x target: {', '.join(misses) or 'none'}.",
            "",
            f"Listing {listing['files']:,} files (100 class folders): {listing['list_s']:.2f} s; "
            f"`data.load` of them (a sample of headers, over the budget): "
            f"{listing['load_s']:.2f} s; {listing['bytes_per_file']:.0f} bytes of Python "
            "objects per file while listed.",
            "",
            f"Resume, streamed ({resume['examples']:,} examples, {resume['steps']} steps an "
            f"epoch): first batch of epoch 3 at step 0 in {resume['times'][0]:.2f} s, at step "
            f"{mid} in {resume['times'][mid]:.2f} s.",
        ]
    )


if __name__ == "__main__":
    from app import cli

    define_flags()
    cli.run(lambda argv: main(flags.FLAGS.data_dir, flags.FLAGS.shards_dir))
