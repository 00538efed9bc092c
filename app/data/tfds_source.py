"""Reads a TensorFlow Datasets dataset, by name (downloaded on first use) or from a TFDS
data directory (local or in a bucket), keeping the images encoded: in memory when the
dataset fits the memory budget, else streamed from its TFRecord files;
`tensorflow_datasets` is imported only here.

Streaming reads TFDS's files itself, from each split's `file_instructions` (path, skip,
take): the files `tfds.ReadConfig(input_context=...)` would give each worker, in an
order of our own. TFDS's shuffle is the k-th draw of a seed generator (not a function
of the epoch, so not resumable), and its sharding raises with fewer files than workers.
"""

from __future__ import annotations

import re

import numpy as np

from app.data.image_folder import subdirs
from app.data.types import (
    SOURCE_TFDS,
    SPLITS,
    DataError,
    Examples,
    RawSplits,
    RecordFile,
    RecordSet,
)
from common import files
from common.errors import first_line

# Probed before TFDS downloads (its mirror of most datasets is there): offline or behind a
# proxy that refuses, TFDS would retry each URL ten times with backoff, minutes in all.
PROBE_URL = "https://storage.googleapis.com"
PROBE_TIMEOUT_S = 10.0


def tfds_names(root: str) -> list[str]:
    """Datasets prepared in a TFDS data dir: `<name>/<version>/dataset_info.json` or
    `<name>/<config>/<version>/dataset_info.json` (looks no deeper, so big image trees
    are not walked)."""

    def has_version(path: str) -> bool:
        return any(
            re.fullmatch(r"\d+\.\d+\.\d+", v)
            and files.isfile(files.join(path, v, "dataset_info.json"))
            for v in subdirs(path)
        )

    names = []
    for name in subdirs(root):
        path = files.join(root, name)
        if has_version(path):
            names.append(name)
            continue
        names += [f"{name}/{c}" for c in subdirs(path) if has_version(files.join(path, c))]
    return names


def check_network(name: str) -> None:
    """Raises DataError at once when TFDS could not download `name` (no route, proxy down).

    Honours the proxy variables TFDS's own downloads honour (HTTPS_PROXY, NO_PROXY, ...).
    """
    import urllib.error
    import urllib.request

    # A fresh opener: urlopen's global one keeps the proxy settings of its first use.
    opener = urllib.request.build_opener()
    try:
        opener.open(
            urllib.request.Request(PROBE_URL, method="HEAD"), timeout=PROBE_TIMEOUT_S
        ).close()
    except urllib.error.HTTPError:
        return  # the server answered: the network is there
    except OSError as e:  # URLError, timeouts, refused connections
        raise DataError(
            f"cannot download TFDS dataset {name}: {PROBE_URL} is unreachable "
            f"({type(e).__name__}; offline, or a proxy refused); pass a local copy with "
            "--data_dir=DIR (make train DATA_DIR=DIR), e.g. CIFAR-10's python batches or "
            "an image folder"
        ) from e


def load_tfds(name: str, data_dir: str | None, budget: int) -> RawSplits:
    """Splits train/validation/test of TFDS dataset `name` as encoded images: in memory
    when the dataset takes at most `budget` bytes, else streamed (`RecordSet`s).

    `data_dir` None: the default TFDS directory, downloading and preparing on first use;
    otherwise a TFDS data dir, never downloaded into.

    Raises:
        DataError: unknown or unprepared dataset, failed download, not an
            image-classification dataset, or too big for memory and not in TFRecord files.
    """
    import tensorflow_datasets as tfds

    where = f"TFDS data dir {data_dir}" if data_dir else "TFDS"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends, whatever their base class
        found = tfds_names(data_dir) if data_dir else []
        extra = f" (it holds: {', '.join(found)})" if found else ""
        raise DataError(f"--dataset={name} not found in {where}{extra}: {first_line(e)}") from e
    if data_dir is None and not builder.is_prepared():
        check_network(name)
        try:
            builder.download_and_prepare()
        except ModuleNotFoundError as e:  # tensorflow/datasets#11212 on Python >= 3.9
            raise DataError(
                f"TFDS cannot prepare {name}: {e}; install it (pip install {e.name}) or pass "
                "--data_dir with a local copy"
            ) from e
        except Exception as e:
            raise DataError(
                f"could not download TFDS dataset {name} ({type(e).__name__}: "
                f"{first_line(e) if str(e) else ''}); check the network or pass a local copy "
                "with --data_dir (make train DATA_DIR=...)"
            ) from e
    elif not builder.is_prepared():
        found = tfds_names(data_dir)
        raise DataError(
            f"--dataset={name} not found in {where} (it holds: {', '.join(found) or 'nothing'}); "
            f"pass one of those as --dataset, or prepare it there with "
            f"`tfds build {name} --data_dir={data_dir}`"
        )
    info = builder.info
    features = info.features
    image_key, label_key = info.supervised_keys or ("image", "label")
    if image_key not in features or label_key not in features:
        raise DataError(f"TFDS {name} is not an image-classification dataset (no image/label)")
    label_feature = features[label_key]
    class_names = list(getattr(label_feature, "names", None) or [])
    if not class_names:
        raise DataError(f"TFDS {name}: label feature {label_key} has no class names")
    if info.dataset_size and int(info.dataset_size) > budget:
        return _streamed(builder, name, where, image_key, label_key, class_names)
    splits = {}
    for split in SPLITS:
        if split not in info.splits:
            continue
        ds = builder.as_dataset(
            split=split, decoders={image_key: tfds.decode.SkipDecoding()}, shuffle_files=False
        )
        ds = ds.map(lambda x: (x[image_key], x[label_key])).batch(4096)
        encoded, labels = [], []
        for e, lab in ds.as_numpy_iterator():
            encoded.append(e)
            labels.append(lab)
        examples = Examples(
            np.concatenate(labels).astype(np.int64),
            encoded=np.concatenate(encoded).astype(object),
            origin=f"{where}: {name}[{split}]",
        )
        splits[split] = examples
    return _raw_splits(splits, name, info, class_names, None not in features[image_key].shape)


def _streamed(builder, name: str, where: str, image_key: str, label_key: str, class_names):
    """The splits as `RecordSet`s over the dataset's own TFRecord files."""
    info = builder.info
    file_format = str(getattr(info, "file_format", "tfrecord") or "tfrecord")
    if "tfrecord" not in file_format.lower():
        raise DataError(
            f"TFDS {name} is {int(info.dataset_size) >> 20} MiB, more than fits in memory, and "
            f"stored as {file_format}: only TFRecord files are streamed; prepare it again "
            f"with file_format=tfrecord, or convert it (python -m app.make_shards)"
        )
    splits = {}
    for split in SPLITS:
        if split not in info.splits:
            continue
        s = info.splits[split]
        per_record = int(s.num_bytes) / max(1, int(s.num_examples))
        ranges = tuple(
            RecordFile(str(fi.filename), int(fi.skip), int(fi.take), round(per_record * fi.take))
            for fi in s.file_instructions
        )
        splits[split] = Examples(
            None,
            records=RecordSet(ranges, len(class_names), image_key, label_key),
            origin=f"{where}: {name}[{split}]",
        )
    return _raw_splits(splits, name, info, class_names, fixed_shape=False)


def _raw_splits(splits: dict, name: str, info, class_names, fixed_shape: bool) -> RawSplits:
    """The splits found; a dataset without a train split is refused."""
    if "train" not in splits:
        raise DataError(f"TFDS {name} has no 'train' split (it has {', '.join(info.splits)})")
    return RawSplits(
        splits["train"],
        splits.get("validation"),
        splits.get("test"),
        class_names,
        SOURCE_TFDS,
        fixed_shape=fixed_shape,
    )
