"""Loading data (app/data/loading.py and the sources): CIFAR python batches, image folders,
TFDS, every kind of bad input, and the seeded, stratified hold-out and limits."""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from app import data
from app.data import DataConfig, DataError
from app.data.types import pipeline_error
from models import preprocessing
from tests.helpers import write_folder, write_png

# --- CIFAR python batches ---------------------------------------------------------------

CLASSES = ["airplane", "automobile", "bird"]


def write_batch(path, images: np.ndarray, labels) -> None:
    """An official-format batch: a dict with bytes keys, channel-planar uint8 rows."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {
        b"batch_label": b"training batch",
        b"labels": [int(v) for v in labels],
        b"data": rows,
        b"filenames": [f"{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=4)


def write_cifar_batches(root, n_per_batch: int = 12, batches: int = 2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, f, 4)
    written = {}
    for name in [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]:
        images = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        labels = np.arange(n_per_batch) % len(CLASSES)
        write_batch(folder / name, images, labels)
        written[name] = (images, labels)
    return folder, written


def test_cifar_python_batches_load_with_images_labels_and_class_names(tmp_path):
    folder, written = write_cifar_batches(tmp_path)
    splits = data.load(DataConfig(data_dir=str(tmp_path), validation_split=0.25))
    assert splits.source == data.SOURCE_CIFAR_BATCHES
    assert splits.class_names == CLASSES
    np.testing.assert_array_equal(splits.test.images, written["test_batch"][0])
    np.testing.assert_array_equal(splits.test.labels, written["test_batch"][1])
    train_images = np.concatenate([written["data_batch_1"][0], written["data_batch_2"][0]])
    assert splits.train.num_examples == 18 and splits.validation.num_examples == 6
    # Train and the hold-out partition the batches' images.
    together = np.concatenate([splits.train.images, splits.validation.images])
    assert sorted(map(bytes, together)) == sorted(map(bytes, train_images))
    # The folder itself works too.
    assert data.load(DataConfig(data_dir=str(folder))).train.num_examples == 22


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_a_command_is_refused_and_runs_nothing(tmp_path):
    folder, _ = write_cifar_batches(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": []}, f, protocol=4)
    with pytest.raises(DataError, match=r"data_batch_1 .*refusing to load .*system"):
        data.load(DataConfig(data_dir=str(tmp_path)))
    assert not marker.exists()


def test_a_truncated_pickle_is_named(tmp_path):
    folder, _ = write_cifar_batches(tmp_path)
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_2 is truncated or corrupt"):
        data.load(DataConfig(data_dir=str(tmp_path)))


def test_pickle_labels_out_of_range_are_an_error(tmp_path):
    folder, written = write_cifar_batches(tmp_path)
    images, labels = written["test_batch"]
    write_batch(folder / "test_batch", images, np.where(labels == 2, 3, labels))
    with pytest.raises(DataError, match=r"test_batch: label 3 .* out of range \[0, 3\)"):
        data.load(DataConfig(data_dir=str(tmp_path)))


# --- image folders ----------------------------------------------------------------------


def test_flat_image_folder_with_grayscale_and_rgba_pngs_becomes_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgba = np.random.default_rng(2).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    write_png(tmp_path / "b_gray" / "g.png", gray, "L")
    write_png(tmp_path / "a_rgba" / "r.png", rgba, "RGBA")
    write_png(tmp_path / "a_rgba" / "s.jpeg", rgba[..., :3])
    splits = data.load(DataConfig(data_dir=str(tmp_path), validation_split=0.34))
    assert splits.source == data.SOURCE_IMAGE_FOLDER
    assert splits.class_names == ["a_rgba", "b_gray"] and splits.test is None
    examples = [splits.train, splits.validation]
    images = np.concatenate([e.images for e in examples])
    labels = np.concatenate([e.labels for e in examples])
    assert images.shape == (3, 8, 8, 3)
    gray_image = images[labels == 1][0]
    np.testing.assert_array_equal(gray_image, np.repeat(gray[..., None], 3, axis=-1))
    assert any(np.array_equal(im, rgba[..., :3]) for im in images[labels == 0])


def test_train_and_test_folders_give_a_test_split(tmp_path):
    write_folder(tmp_path / "train", per_class=6)
    write_folder(tmp_path / "test", per_class=2)
    splits = data.load(DataConfig(data_dir=str(tmp_path), validation_split=0.5))
    assert splits.test.num_examples == 4
    assert splits.train.num_examples == 6 and splits.validation.num_examples == 6
    assert sorted(np.bincount(splits.validation.labels)) == [3, 3]  # stratified


def test_images_of_different_sizes_stay_files_and_are_decoded_in_the_pipeline(tmp_path):
    write_folder(tmp_path, per_class=4, size=8)
    write_png(tmp_path / "cat" / "big.png", np.full((12, 10, 3), 200, np.uint8))
    splits = data.load(DataConfig(data_dir=str(tmp_path), validation_split=0.2))
    assert splits.train.images is None and splits.train.files is not None
    ds = data.train_dataset(splits.train, preprocessing.cifar(8), 4, seed=0)
    x, y = next(iter(ds))
    assert x.shape == (4, 8, 8, 3) and y.shape == (4,)
    x, _ = next(iter(data.eval_dataset(splits.validation, preprocessing.cifar(16), 2)))
    assert x.shape[1:] == (16, 16, 3)
    images, labels = data.sample_images(splits.train, 7, seed=0)
    assert len(images) == len(labels) == 7 and all(im.dtype == np.uint8 for im in images)
    assert {im.shape for im in images} == {(8, 8, 3), (12, 10, 3)}


def test_an_image_over_the_pixel_limit_decoded_in_the_pipeline_is_named(tmp_path):
    write_folder(tmp_path, per_class=4, size=8)
    write_png(tmp_path / "cat" / "big.png", np.full((12, 10, 3), 200, np.uint8))
    splits = data.load(DataConfig(data_dir=str(tmp_path), validation_split=0.2))
    # As when start-up read only a sample of the headers: the limit is met mid-run.
    train = dataclasses.replace(splits.train, max_pixels=63)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        for _ in data.train_dataset(train, preprocessing.cifar(8), 4, seed=0):
            pass
    line = pipeline_error(raised.value)
    assert line is not None and line.startswith(str(tmp_path)), raised.value
    assert "pixels is over the limit of 63 pixels" in line


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load(DataConfig(data_dir=str(tmp_path / "nope")))


def test_empty_folder_lists_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match=r"found: nothing\).*cifar-10-batches-py.*TFDS.*image"):
        data.load(DataConfig(data_dir=str(tmp_path)))


def test_unrecognised_folder_lists_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"found: notes.txt\). Looked for: cifar-10-batches-py"):
        data.load(DataConfig(data_dir=str(tmp_path)))


def test_class_folder_without_images_is_named(tmp_path):
    write_folder(tmp_path / "train")
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "train" / "emu" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"class folder .*train/emu has no .jpg/.jpeg/.png"):
        data.load(DataConfig(data_dir=str(tmp_path)))


@pytest.mark.parametrize("content", [b"not an image at all", b"\xff\xd8\xff\xe0 truncated"])
def test_corrupt_image_file_is_named(tmp_path, content):
    write_folder(tmp_path)
    (tmp_path / "dog" / "3.png").write_bytes(content)
    with pytest.raises(DataError, match=r"dog/3.png is not a readable JPEG/PNG"):
        data.load(DataConfig(data_dir=str(tmp_path)))


def test_image_that_fails_to_decode_after_a_valid_header_is_named(tmp_path):
    write_folder(tmp_path)
    good = (tmp_path / "cat" / "2.png").read_bytes()
    (tmp_path / "cat" / "2.png").write_bytes(good[: len(good) // 2])  # cut inside the pixels
    with Image.open(tmp_path / "cat" / "2.png") as im:
        assert im.size == (8, 8)  # the header still reads: only decoding finds it
    with pytest.raises(DataError, match=r"cat/2.png could not be decoded"):
        data.load(DataConfig(data_dir=str(tmp_path)))


def test_validation_split_of_1_is_an_error(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(DataError, match=r"--validation_split=1\.0"):
        data.load(DataConfig(data_dir=str(tmp_path), validation_split=1.0))


def test_validation_split_of_0_needs_a_validation_split_when_there_is_a_test_split(tmp_path):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "test")
    with pytest.raises(DataError, match=r"--validation_split=0\.0"):
        data.load(DataConfig(data_dir=str(tmp_path), validation_split=0.0))


@pytest.mark.parametrize("layout", ["test_only", "classes_at_split_0"])
def test_evaluation_folders_are_all_test(tmp_path, layout):
    """Only test/<class>/, or only <class>/ with nothing held out: every image is test."""
    root = tmp_path / "test" if layout == "test_only" else tmp_path
    write_folder(root, per_class=3)
    split = 0.1 if layout == "test_only" else 0.0
    splits = data.load(DataConfig(data_dir=str(tmp_path), validation_split=split, train_limit=1))
    assert splits.evaluation_only and "evaluation only" in splits.summary()
    assert splits.test.num_examples == 6 and list(np.bincount(splits.test.labels)) == [3, 3]
    assert splits.train.num_examples == 0 and splits.validation.num_examples == 0
    assert splits.class_names == ["cat", "dog"]


def test_size_note_when_images_are_far_from_image_size(tmp_path):
    for i, shape in enumerate([(8, 8), (8, 11), (9, 12)]):
        write_png(tmp_path / f"{i}.png", np.zeros((*shape, 3), np.uint8))
    files = data.Examples(np.zeros(3, np.int64), files=np.array(sorted(tmp_path.iterdir())))
    in_memory = data.Examples(np.zeros(2, np.int64), images=np.zeros((2, 8, 8, 3), np.uint8))
    for examples in (files, in_memory):
        assert data.size_note(examples, 8) is None
        assert data.size_note(examples, 40) is None  # 5x: close enough
        note = data.size_note(examples, 224)
        assert "about 8 px" in note and "upsamples them 28x" in note
        assert "shrinks them 8x" in data.size_note(examples, 1)


def test_holdout_and_limits_are_deterministic_stratified_and_disjoint(tmp_path):
    write_folder(tmp_path, classes=("a", "b", "c", "d"), per_class=10)
    config = DataConfig(data_dir=str(tmp_path), validation_split=0.2, train_limit=16, seed=3)
    first, second = data.load(config), data.load(config)
    for split in ("train", "validation"):
        a, b = getattr(first, split), getattr(second, split)
        np.testing.assert_array_equal(a.images, b.images)
    assert first.train.num_examples == 16 and first.validation.num_examples == 8
    assert list(np.bincount(first.train.labels)) == [4, 4, 4, 4]
    assert list(np.bincount(first.validation.labels)) == [2, 2, 2, 2]
    train_set = {bytes(im) for im in first.train.images}
    assert not train_set & {bytes(im) for im in first.validation.images}
    # The hold-out does not depend on train_limit; it does on the seed.
    unlimited = data.load(DataConfig(data_dir=str(tmp_path), validation_split=0.2, seed=3))
    np.testing.assert_array_equal(unlimited.validation.images, first.validation.images)
    reseeded = data.load(DataConfig(data_dir=str(tmp_path), validation_split=0.2, seed=4))
    assert not np.array_equal(reseeded.validation.images, first.validation.images)
    limited = data.load(DataConfig(data_dir=str(tmp_path), validation_split=0.2, eval_limit=4))
    assert limited.validation.num_examples == 4


# --- TFDS -------------------------------------------------------------------------------


def build_tfds(data_dir, name: str = "tiny_images"):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(16) % 2
    split = {"image": images, "label": labels}
    builder = tfds.dataset_builders.TfDataBuilder(
        name=name,
        version="1.0.0",
        split_datasets={
            "train": tf.data.Dataset.from_tensor_slices(split),
            "test": tf.data.Dataset.from_tensor_slices({k: v[:6] for k, v in split.items()}),
        },
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(names=["left", "right"]),
            }
        ),
        data_dir=str(data_dir),
        disable_shuffling=True,
    )
    builder.download_and_prepare()
    return images, labels


def test_tfds_data_dir_loads_offline_by_name(tmp_path):
    images, labels = build_tfds(tmp_path)
    splits = data.load(DataConfig(dataset="tiny_images", data_dir=str(tmp_path)))
    assert splits.source == data.SOURCE_TFDS
    assert splits.class_names == ["left", "right"]
    np.testing.assert_array_equal(splits.test.images, images[:6])
    np.testing.assert_array_equal(splits.test.labels, labels[:6])
    assert splits.train.num_examples + splits.validation.num_examples == 16
    with pytest.raises(DataError, match=r"--dataset=cifar10 not found .*it holds: tiny_images"):
        data.load(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)  # TFDS's own retries would take minutes
def test_tfds_download_without_network_fails_at_once_in_one_line(tmp_path, monkeypatch):
    """Nothing prepared, downloads enabled, every connection refused (a proxy that is down)."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as raised:
        data.load(DataConfig(dataset="cifar10"))
    message = str(raised.value)
    assert "\n" not in message
    assert "TFDS dataset cifar10" in message and "unreachable" in message
    assert "--data_dir" in message and "DATA_DIR" in message
    assert not any(tmp_path.iterdir())  # nothing half-downloaded


# --- real CIFAR-10 images ---------------------------------------------------------------


def test_real_cifar10_folder(cifar10_dir):
    config = DataConfig(data_dir=str(cifar10_dir), train_limit=400, eval_limit=100)
    splits = data.load(config)
    assert splits.class_names == sorted(os.listdir(cifar10_dir / "train"))
    assert splits.train.images.shape == (400, 32, 32, 3)
    assert splits.validation.num_examples == 100
    assert list(np.bincount(splits.train.labels)) == [40] * 10
    x, _y = next(iter(data.train_dataset(splits.train, preprocessing.cifar(32), 64, seed=0)))
    # Normalised real photos: roughly zero mean, unit spread (padding adds some black).
    assert -0.6 < float(tf.reduce_mean(x)) < 0.3 and 0.7 < float(tf.math.reduce_std(x)) < 1.5
