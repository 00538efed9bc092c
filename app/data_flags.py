"""The data flags the programs share, and their read-back from a training run's flags.txt.

A program calls `define_data_flags()` in its `define_flags()`, then
`flags.adopt_module_key_flags(data_flags)` so that its `--help` lists them (absl lists only
the main module's key flags), and, inside `main`, `data_config_from_flags(seed)` (each
program owns its seed flag). `app.train` writes its
flags to `flags.txt` beside the model; `training_run_flags` reads them back, so
`app.evaluate` and `app.export` read the training run's data with its seed and validation
fraction (the same held-out images) unless told otherwise.

Example (inside a program's `main`, flags parsed):

    from app import data_flags
    trained = data_flags.training_run_flags("runs/cpu_quick/best.keras")
    config = data_flags.data_config_from_flags(trained.get("seed", 0), inherit=trained)
"""

from __future__ import annotations

from collections.abc import Mapping

from absl import flags

from app.data import DataConfig, DataError
from common import files
from common.errors import UsageError
from common.pixel_limits import MAX_PIXELS

FLAGS = flags.FLAGS
# Data flags that, when not given, default to the training run's values.
INHERITED_DATA_FLAGS = ("dataset", "data_dir", "validation_split", "label_offset")


def define_max_pixels_flag(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines --max_pixels, the limit on decoded image size (idempotent)."""
    if "max_pixels" in flag_values:
        return
    flags.DEFINE_integer(
        "max_pixels",
        MAX_PIXELS,
        "Refuse images over this many pixels (width x height), read from the file header "
        "before decoding, so a small file declaring a huge image cannot exhaust memory.",
        lower_bound=1,
        flag_values=flag_values,
    )


def max_pixels_from_flags(flag_values: flags.FlagValues = FLAGS) -> int:
    """The parsed --max_pixels."""
    return flag_values["max_pixels"].value


def define_data_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines --dataset, --data_dir, --validation_split, --train_limit, --eval_limit,
    --max_pixels, --label_offset and --memory_budget_mb.

    Idempotent, so programs that share a process (tests) can each call it.
    """
    define_max_pixels_flag(flag_values)
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
        "The data, local or in a bucket (gs://...), recognised by content: "
        "cifar-10-batches-py (the CIFAR-10 python batches), an image-folder tree "
        "(<class>/*.jpg|png, or train/<class>/... and test/<class>/...), TFRecord shards "
        "(train-00000-of-00064, ... with image/encoded and image/class/label, as "
        "python -m app.make_shards and TF Model Garden write them), or a TFDS data "
        "directory holding --dataset.",
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
    flags.DEFINE_integer(
        "label_offset",
        None,
        "Subtracted from the labels of TFRecord shards: 1 for TF Model Garden's ImageNet "
        "shards (labels 1..1000); unset: as the shards' shards.json says, else 0.",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "memory_budget_mb",
        None,
        "The most one split may keep in memory, in MiB (decoded images, or the encoded "
        "bytes of images of mixed sizes); a larger TFDS dataset or TFRecord shard set is "
        "streamed from its files, shuffled in windows of a quarter of this. Unset: "
        "min(1900, a quarter of the machine's RAM); set it on clusters of unlike machines. "
        "0 streams every split that can stream.",
        lower_bound=0,
        flag_values=flag_values,
    )


def data_config_from_flags(
    seed: int,
    flag_values: flags.FlagValues = FLAGS,
    inherit: Mapping[str, object] | None = None,
) -> DataConfig:
    """A `DataConfig` from the parsed data flags and the program's seed.

    Args:
        seed: the program's seed.
        flag_values: the parsed flags.
        inherit: a training run's flags (`training_run_flags`): the `INHERITED_DATA_FLAGS`
            not given on the command line take their values from it.
    """
    dataset = flag_values["dataset"].value.strip()
    if not dataset:
        raise DataError("--dataset is empty; pass a TFDS name such as cifar10")
    values = {
        "dataset": dataset,
        "data_dir": flag_values["data_dir"].value or None,
        "validation_split": flag_values["validation_split"].value,
        "label_offset": flag_values["label_offset"].value,
    }
    for name in INHERITED_DATA_FLAGS:
        if inherit and inherit.get(name, "") != "" and not flag_values[name].present:
            values[name] = inherit[name]
    return DataConfig(
        **values,
        train_limit=flag_values["train_limit"].value,
        eval_limit=flag_values["eval_limit"].value,
        seed=seed,
        max_pixels=max_pixels_from_flags(flag_values),
        memory_budget_mb=flag_values["memory_budget_mb"].value,
    )


def read_flagfile(path: str) -> dict[str, str]:
    """`--name=value` lines of a flagfile (as app.train writes `flags.txt`); {} if absent.

    Comments, blank lines and boolean `--name` / `--noname` lines are skipped.
    """
    if not files.isfile(path):
        return {}
    values = {}
    for line in files.read_text(path).splitlines():
        line = line.strip()
        if line.startswith("--") and "=" in line:
            name, value = line[2:].split("=", 1)
            values[name] = value
    return values


def training_run_flags(model_path: str) -> dict[str, object]:
    """The flags of the run that trained `model_path` (its `flags.txt`); {} when absent.

    Values are strings as written, except `seed` and `label_offset` (int) and
    `validation_split` (float).

    Raises:
        UsageError: a seed, label offset or validation fraction in flags.txt that is not a
            number.
    """
    # Imported here: the training library loads TensorFlow, which --help should not wait for.
    from app.training.config import FLAGS_FILE

    path = files.join(files.dirname(model_path), FLAGS_FILE)
    trained: dict[str, object] = dict(read_flagfile(path))
    try:
        for name in ("seed", "label_offset"):
            if name in trained:
                trained[name] = int(trained[name])
        if "validation_split" in trained:
            trained["validation_split"] = float(trained["validation_split"])
    except ValueError as e:
        raise UsageError(
            f"bad --seed or --validation_split in the model's flags.txt, or its --label_offset "
            f"({e})"
        ) from e
    return trained


def training_data_config(model_path: str, data_dir: str | None = None) -> DataConfig | None:
    """The data to read real images from: `data_dir`, else the training run's data.

    Read with the training run's dataset name, seed and validation fraction (so a held-out
    validation split is the run's own); None when neither `data_dir` nor the training run's
    flags.txt is there.
    """
    trained = training_run_flags(model_path)
    if data_dir is None and not trained:
        return None
    return DataConfig(
        dataset=trained.get("dataset") or "cifar10",
        data_dir=data_dir or trained.get("data_dir") or None,
        validation_split=trained.get("validation_split", 0.1),
        seed=trained.get("seed", 0),
        label_offset=trained.get("label_offset"),
    )
