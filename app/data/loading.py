"""`load`: checks the config, recognises what `data_dir` holds (TFDS data dir, CIFAR python
batches, TFRecord shards, image folders; local or on any TensorFlow file system) and hands
it to that source's reader, then to `splits.finish`."""

from __future__ import annotations

from absl import logging

from app.data import splits
from app.data.cifar_batches import is_cifar_batches, load_cifar_batches
from app.data.decode import memory_budget
from app.data.image_folder import load_image_folder, looks_like_image_folder
from app.data.shards import load_shards, shard_files
from app.data.tfds_source import load_tfds, tfds_names
from app.data.types import DataConfig, DataError, RawSplits, Splits
from common import files
from common.errors import first_line


def load(config: DataConfig) -> Splits:
    """Reads the dataset `config` names; see the `app.data` docstring.

    Raises:
        DataError: missing or malformed data, or a bad split/limit value.
    """
    return splits.finish(load_raw(config), config)


def load_raw(config: DataConfig) -> RawSplits:
    """The splits `config` names as the source holds them (`load` before `splits.finish`).

    Raises:
        DataError: missing or malformed data, or a bad setting.
    """
    _check_config(config)
    budget = memory_budget(config.memory_budget_mb)
    if config.data_dir is None:  # TFDS by name, downloaded on first use
        return load_tfds(config.dataset, None, budget)
    root = config.data_dir
    try:
        root = files.resolve(root)
        return _load_data_dir(config, root, budget)
    except (PermissionError, files.StorageError) as e:
        raise DataError(
            f"--data_dir {root} cannot be read ({first_line(e)}); check the path and its "
            "permissions (or the bucket's credentials)"
        ) from e


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
    for name in ("label_offset", "memory_budget_mb"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise DataError(f"--{name}={value} must be a non-negative integer (or unset)")


def _load_data_dir(config: DataConfig, root: str, budget: int) -> RawSplits:
    if not files.exists(root):
        raise DataError(f"--data_dir {root} does not exist; pass the folder that holds the data")
    if not files.isdir(root):
        raise DataError(f"--data_dir {root} is a file, not a folder; pass the folder holding it")
    entries = files.listdir(root)
    if shard_files(entries):
        return load_shards(root, config)
    if tfds_names(root):
        return load_tfds(config.dataset, root, budget)
    if config.dataset != DataConfig.dataset:
        logging.warning("--dataset=%s ignored: %s is not a TFDS data dir", config.dataset, root)
    for candidate in (root, files.join(root, "cifar-10-batches-py")):
        if is_cifar_batches(candidate):
            return load_cifar_batches(candidate)
    if looks_like_image_folder(root):
        return load_image_folder(root)
    found = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
    hint = ""
    if any(e.endswith((".tar.gz", ".tgz", ".zip")) for e in entries):
        hint = "; extract the archive first"
    raise DataError(
        f"--data_dir {root} holds no recognised dataset (found: {found}). Looked for: "
        "cifar-10-batches-py (batches.meta + data_batch_*), a TFDS data dir "
        "(<name>/<version>/dataset_info.json), TFRecord shards (train-00000-of-00008, ...), "
        f"or image folders (<class>/*.jpg|png or train/<class>/* + test/<class>/*){hint}"
    )
