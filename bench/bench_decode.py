"""Cost of the pixel limit: decoding real image files with and without the header check.

`export.image_header.decode_image` (what image folders, `app.predict` and `serving_bytes` run)
reads the image size from the header and refuses an image over `--max_pixels` before
decoding; `tf.io.decode_image` is the same decode without the check. Both run in a
`tf.data` map over the same encoded files held in memory, as the image-folder pipeline does.

Usage (from the repository root; under a minute on 2 CPU cores):

    python -m bench.bench_decode --data_dir=~/data/cifar10 --images=5000 --repeats=3
"""

from __future__ import annotations

import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from app import cli
from bench import common
from common.errors import UsageError

SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def read_files(data_dir: str, limit: int) -> list[bytes]:
    """The bytes of the first `limit` image files under `data_dir` (sorted paths)."""
    root = pathlib.Path(os.path.expanduser(data_dir))
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)[:limit]
    if not paths:
        raise UsageError(f"no image files under {root}: pass --data_dir=an image folder")
    return [p.read_bytes() for p in paths]


def seconds_to_decode(encoded: list[bytes], checked: bool) -> float:
    """Wall seconds of one pass of a tf.data map decoding every file."""
    import tensorflow as tf

    from export import image_header

    def plain(data):
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    decode = image_header.decode_image if checked else plain
    dataset = tf.data.Dataset.from_tensor_slices(encoded).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    start = time.perf_counter()
    for _ in dataset:
        pass
    return time.perf_counter() - start


def define_flags() -> None:
    flags.DEFINE_string(
        "data_dir", None, "An image folder; default: $CIFAR10_DIR or ~/data/cifar10."
    )
    flags.DEFINE_integer("images", 5000, "Files decoded per pass.", lower_bound=1)
    flags.DEFINE_integer("repeats", 3, "Passes per case (the best is shown).", lower_bound=1)


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    data_dir = flags.FLAGS["data_dir"].value or common.default_data_dir()
    encoded = read_files(data_dir, flags.FLAGS["images"].value)
    best = {}
    for checked in (False, True):
        seconds_to_decode(encoded[:64], checked)  # traces the map function
    for _ in range(flags.FLAGS["repeats"].value):  # in turns: a neighbour's burst hits both
        for checked in (False, True):
            seconds = seconds_to_decode(encoded, checked)
            best[checked] = min(best.get(checked, seconds), seconds)
    print(f"{len(encoded)} files from {data_dir}, best of {flags.FLAGS['repeats'].value}")
    print("| decode | seconds | images/s |")
    print("| --- | ---: | ---: |")
    for checked, label in (
        (False, "tf.io.decode_image"),
        (True, "image_header.decode_image (checked)"),
    ):
        print(f"| {label} | {best[checked]:.3f} | {len(encoded) / best[checked]:,.0f} |")
    print(f"ratio: {best[True] / best[False]:.2f}x")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
