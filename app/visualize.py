"""Draws a grid of training images titled with their class names, for any data source.

Usage (from the repository root):

    python -m app.visualize --data_dir=~/data/cifar10 --output=samples.png --num=6

Images are shown as stored (before augmentation and normalisation), as in the reference
tutorial's first figure.
"""

from __future__ import annotations

from absl import flags

from app import cli, data, data_flags, visualize_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    data_flags.define_data_flags()
    flags.adopt_module_key_flags(data_flags)  # listed by --help
    flags.DEFINE_string("output", "samples.png", "PNG file to write.")
    flags.DEFINE_integer("num", 6, "Number of images to draw.", lower_bound=1, upper_bound=100)
    flags.DEFINE_enum("split", "train", data.SPLITS, "Which split to draw from.")
    flags.DEFINE_integer("cols", 3, "Images per row.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Picks the images (and the validation hold-out).")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    path = visualize_lib.draw_samples(
        data_flags.data_config_from_flags(FLAGS.seed),
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
