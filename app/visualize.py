"""Draws a grid of training images titled with their class names, for any data source.

Usage (from the repository root):

    python -m app.visualize --data_dir=../shared/data/cifar10 --output=samples.png --num=6

Images are shown as stored (before augmentation and normalisation), as in the reference
tutorial's first figure.
"""

from __future__ import annotations

from absl import flags

from app import cli
from app.data_flags import data_config_from_flags, define_data_flags
from common.errors import UsageError

FLAGS = flags.FLAGS
SPLITS = ("train", "validation", "test")


def define_flags() -> None:
    define_data_flags()
    flags.DEFINE_string("output", "samples.png", "PNG file to write.")
    flags.DEFINE_integer("num", 6, "Number of images to draw.", lower_bound=1, upper_bound=100)
    flags.DEFINE_enum("split", "train", SPLITS, "Which split to draw from.")
    flags.DEFINE_integer("cols", 3, "Images per row.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Picks the images (and the validation hold-out).")


def draw_samples(config, split: str, num: int, output: str, seed: int, cols: int = 3) -> str:
    """Loads the data `config` names and writes a samples grid of `split` to `output`."""
    from app import data
    from app.plots import save_samples_grid

    # Only the drawn split needs decoding, and only a part of it: cap the splits first
    # (the hold-out is chosen before the limits, so it stays the training run's).
    limit = max(num, 1000)
    if split == "train":
        config = _replace(config, train_limit=min(config.train_limit or limit, limit), eval_limit=1)
    else:
        config = _replace(config, train_limit=1, eval_limit=min(config.eval_limit or limit, limit))
    splits = data.load(config)
    examples = getattr(splits, split)
    if examples is None:
        raise UsageError(f"--split={split}: {splits.train.origin} has no {split} split")
    images, labels = data.sample_images(examples, num, seed)
    return save_samples_grid(images, labels, splits.class_names, output, cols=cols)


def _replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    path = draw_samples(
        data_config_from_flags(FLAGS.seed),
        FLAGS.split,
        FLAGS.num,
        FLAGS.output,
        FLAGS.seed,
        FLAGS.cols,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
