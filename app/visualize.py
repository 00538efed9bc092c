"""Draws a grid of training images titled with their class names, for any data source.

Usage (from the repository root):

    python -m app.visualize --data_dir=~/data/cifar10 --output=samples.png --num=6

Images are shown as stored (before augmentation and normalisation), as in the reference
tutorial's first figure.
"""

from __future__ import annotations

from absl import flags

from app import cli, data, data_flags, visualize_lib

_OUTPUT: flags.FlagHolder[str]
_NUM: flags.FlagHolder[int]
_SPLIT: flags.FlagHolder[str]
_COLS: flags.FlagHolder[int]
_SEED: flags.FlagHolder[int]


def define_flags() -> None:
    """Defines this program's flags plus the shared data flags."""
    global _OUTPUT, _NUM, _SPLIT, _COLS, _SEED
    _OUTPUT = flags.DEFINE_string("output", "samples.png", "PNG file to write.")
    _NUM = flags.DEFINE_integer(
        "num", 6, "Number of images to draw.", lower_bound=1, upper_bound=100
    )
    _SPLIT = flags.DEFINE_enum("split", "train", list(data.SPLITS), "Which split to draw from.")
    _COLS = flags.DEFINE_integer("cols", 3, "Images per row.", lower_bound=1)
    _SEED = flags.DEFINE_integer("seed", 0, "Picks the images (and the validation hold-out).")
    data_flags.define_data_flags()
    flags.adopt_module_key_flags(data_flags)  # listed by --help


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    path = visualize_lib.draw_samples(
        data_flags.data_config_from_flags(_SEED.value),
        _SPLIT.value,
        _NUM.value,
        _OUTPUT.value,
        _SEED.value,
        _COLS.value,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
