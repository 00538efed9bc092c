"""A picture of a dataset: a grid of images titled with their class names, as stored.

What `python -m app.visualize` runs. Images are drawn before augmentation and normalisation,
as in the reference tutorial's first figure; any data `app.data.load` reads will do.

Example:

    from app import data, visualize_lib
    config = data.DataConfig(data_dir="~/data/cifar10")
    visualize_lib.draw_samples(config, "train", num=6, output="samples.png", seed=0)
"""

from __future__ import annotations

import dataclasses

from app.data import SPLITS, DataConfig
from common.errors import UsageError

# Examples decoded from the drawn split: enough to pick from, few enough to be quick.
MAX_DECODED = 1000


def draw_samples(
    config: DataConfig, split: str, num: int, output: str, seed: int, cols: int = 3
) -> str:
    """Loads the data `config` names and writes a grid of `num` images of `split` to `output`.

    Returns:
        The path written.

    Raises:
        UsageError: an unknown split, or one the data does not have.
        app.data.DataError: the data cannot be read.
    """
    from app import data
    from app.plots import save_samples_grid

    if split not in SPLITS:
        raise UsageError(f"--split={split} is not one of {', '.join(SPLITS)}")
    # Only the drawn split needs decoding, and only a part of it: cap the splits first
    # (the hold-out is chosen before the limits, so it stays the training run's).
    limit = max(num, MAX_DECODED)
    if split == "train":
        train_limit = min(config.train_limit or limit, limit)
        config = dataclasses.replace(config, train_limit=train_limit, eval_limit=1)
    else:
        eval_limit = min(config.eval_limit or limit, limit)
        config = dataclasses.replace(config, train_limit=1, eval_limit=eval_limit)
    splits = data.load(config)
    examples = getattr(splits, split)
    if examples is None:
        raise UsageError(f"--split={split}: {splits.train.origin} has no {split} split")
    images, labels = data.sample_images(examples, num, seed)
    return save_samples_grid(images, labels, splits.class_names, output, cols=cols)
