"""`load`: checks the config, recognises what `data_dir` holds (TFDS data dir, CIFAR python
batches, image folders) and hands it to that source's reader, then to `splits.finish`."""

from __future__ import annotations

import os

from absl import logging

from app.data import splits
from app.data.cifar_batches import is_cifar_batches, load_cifar_batches
from app.data.image_folder import load_image_folder, looks_like_image_folder
from app.data.tfds_source import load_tfds, tfds_names
from app.data.types import DataConfig, DataError, RawSplits, Splits


def load(config: DataConfig) -> Splits:
    """Reads the dataset `config` names; see the `app.data` docstring.

    Raises:
        DataError: missing or malformed data, or a bad split/limit value.
    """
    _check_config(config)
    if config.data_dir is None:  # TFDS by name, downloaded on first use
        return splits.finish(load_tfds(config.dataset, None), config)
    return splits.finish(_load_data_dir(config), config)


def _check_config(config: DataConfig) -> None:
    for name in ("train_limit", "eval_limit"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"--{name}={value} must be a positive integer (or unset for all)")
    if not 0.0 <= config.validation_split < 1.0:
        raise DataError(
            f"--validation_split={config.validation_split} must be a fraction in (0, 1) of "
            "train to hold out as validation, e.g. 0.1"
        )
    if not isinstance(config.seed, int) or config.seed < 0:
        raise DataError(f"--seed={config.seed} must be a non-negative integer")


def _load_data_dir(config: DataConfig) -> RawSplits:
    root = os.path.abspath(os.path.expanduser(config.data_dir))
    if not os.path.exists(root):
        raise DataError(f"--data_dir {root} does not exist; pass the folder that holds the data")
    if not os.path.isdir(root):
        raise DataError(f"--data_dir {root} is a file, not a folder; pass the folder holding it")
    if tfds_names(root):
        return load_tfds(config.dataset, root)
    if config.dataset != DataConfig.dataset:
        logging.warning("--dataset=%s ignored: %s is not a TFDS data dir", config.dataset, root)
    for candidate in (root, os.path.join(root, "cifar-10-batches-py")):
        if is_cifar_batches(candidate):
            return load_cifar_batches(candidate)
    if looks_like_image_folder(root):
        return load_image_folder(root)
    entries = sorted(os.listdir(root))
    found = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
    hint = ""
    if any(e.endswith((".tar.gz", ".tgz", ".zip")) for e in entries):
        hint = "; extract the archive first"
    raise DataError(
        f"--data_dir {root} holds no recognised dataset (found: {found}). Looked for: "
        "cifar-10-batches-py (batches.meta + data_batch_*), a TFDS data dir "
        "(<name>/<version>/dataset_info.json), or image folders (<class>/*.jpg|png or "
        f"train/<class>/* + test/<class>/*){hint}"
    )
