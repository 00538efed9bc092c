"""The data flags shared by app.train and app.evaluate (DESIGN.md, "Data flags").

A program calls `define_data_flags()` in its `define_flags()` and, inside `main`,
`data_config_from_flags(seed)` (the seed flag belongs to the trainer).
"""

from __future__ import annotations

from absl import flags

from app.data import DataConfig, DataError

FLAGS = flags.FLAGS


def define_data_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines --dataset, --data_dir, --validation_split, --train_limit, --eval_limit.

    Idempotent, so programs that share a process (tests) can each call it.
    """
    if "dataset" in flag_values:
        return
    flags.DEFINE_string(
        "dataset",
        "cifar10",
        "TFDS dataset name (downloaded on first use), used when --data_dir is unset or is a "
        "TFDS data directory.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "data_dir",
        None,
        "Local data, recognised by content: cifar-10-batches-py (the CIFAR-10 python "
        "batches), an image-folder tree (<class>/*.jpg|png, or train/<class>/... and "
        "test/<class>/...), or a TFDS data directory holding --dataset.",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "validation_split",
        0.1,
        "Fraction of train held out (stratified, fixed by the seed) as validation when the "
        "data has no validation split; must be in (0, 1) when a hold-out is needed.",
        lower_bound=0.0,
        upper_bound=0.999999,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "train_limit",
        None,
        "Use at most this many training examples (a seeded, stratified subset); unset: all.",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "eval_limit",
        None,
        "Use at most this many validation and test examples each; unset: all.",
        lower_bound=1,
        flag_values=flag_values,
    )


def data_config_from_flags(seed: int, flag_values: flags.FlagValues = FLAGS) -> DataConfig:
    """A `DataConfig` from the parsed data flags and the program's seed."""
    dataset = flag_values["dataset"].value.strip()
    if not dataset:
        raise DataError("--dataset is empty; pass a TFDS name such as cifar10")
    return DataConfig(
        dataset=dataset,
        data_dir=flag_values["data_dir"].value or None,
        validation_split=flag_values["validation_split"].value,
        train_limit=flag_values["train_limit"].value,
        eval_limit=flag_values["eval_limit"].value,
        seed=seed,
    )
