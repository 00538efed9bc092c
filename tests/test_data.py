"""The data pipeline (app/data.py): every source, bad input, and the determinism contract."""

from __future__ import annotations

import os
import pickle
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

from app import data, data_flags
from app.data import DataConfig, DataError, Examples
from models import preprocessing
from models.preprocessing import Preprocessing
from tests.helpers import run_program

IDENTITY = Preprocessing(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def make_examples(n: int = 40, size: int = 8) -> Examples:
    """Example i: label i; pixels encode (i, row, column) so crops and flips are traceable."""
    i, r, c = np.meshgrid(np.arange(n), np.arange(size), np.arange(size), indexing="ij")
    images = np.stack([i % 256, 100 + r, 100 + c], axis=-1).astype(np.uint8) + 1
    return Examples(np.arange(n, dtype=np.int64), images=images, origin="memory")


def take(ds, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds.take(k)]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


# --- the pipeline contract --------------------------------------------------------------


def test_train_batches_have_the_model_input_shape_and_normalisation():
    ex = make_examples()
    prep = preprocessing.cifar(8)
    x, y = next(iter(data.train_dataset(ex, prep, 16, seed=0, augment=False)))
    assert x.dtype == tf.float32 and x.shape == (16, 8, 8, 3)
    assert y.dtype == tf.int32 and y.shape == (16,)
    expected = prep(ex.images[y.numpy()].astype(np.float32))
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_steps_per_epoch_drops_the_partial_batch():
    assert data.steps_per_epoch(make_examples(40), 16) == 2
    assert data.steps_per_epoch(make_examples(40), 8) == 5


def test_each_epoch_is_a_seeded_permutation_and_epochs_differ():
    ex = make_examples(40)
    batches = take(data.train_dataset(ex, IDENTITY, 8, seed=3, augment=False), 15)
    epochs = [np.concatenate([y for _, y in batches[i * 5 : (i + 1) * 5]]) for i in range(3)]
    for labels in epochs:
        assert sorted(labels) == list(range(40))  # every example exactly once per epoch
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    other_seed = take(data.train_dataset(ex, IDENTITY, 8, seed=4, augment=False), 5)
    assert not np.array_equal(epochs[0], np.concatenate([y for _, y in other_seed]))


def test_two_calls_give_identical_augmented_batches():
    ex = make_examples(40)
    a = take(data.train_dataset(ex, IDENTITY, 8, seed=1), 12)
    b = take(data.train_dataset(ex, IDENTITY, 8, seed=1), 12)
    assert_same_batches(a, b)


@pytest.mark.parametrize("start_epoch,start_step", [(0, 3), (1, 0), (2, 4)])
def test_start_epoch_and_step_equal_skipping(start_epoch, start_step):
    ex = make_examples(40)
    steps = data.steps_per_epoch(ex, 8)
    full = take(data.train_dataset(ex, IDENTITY, 8, seed=5), start_epoch * steps + start_step + 7)
    resumed = take(
        data.train_dataset(ex, IDENTITY, 8, seed=5, start_epoch=start_epoch, start_step=start_step),
        7,
    )
    assert_same_batches(resumed, full[start_epoch * steps + start_step :])


def crops_of(image: np.ndarray, pad: int) -> list[np.ndarray]:
    """Every zero-padded shift of `image` by up to `pad` pixels, flipped or not."""
    h, w = image.shape[:2]
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)])
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            out += [crop, crop[:, ::-1]]
    return out


def test_augmentation_is_a_padded_random_crop_and_flip_of_the_example():
    ex = make_examples(40, size=8)
    x, y = next(iter(data.train_dataset(ex, IDENTITY, 40, seed=0)))
    flips = shifted = 0
    for image, label in zip(x.numpy(), y.numpy(), strict=True):
        original = ex.images[label].astype(np.float32)
        candidates = crops_of(original, pad=1)  # 4 pixels per 32 -> 1 pixel at 8x8
        assert any(np.array_equal(image, c) for c in candidates)
        flips += int(image[4, 4, 2] < original[4, 4, 2])  # column code decreases: flipped
        shifted += int(
            not np.array_equal(image, original) and not np.array_equal(image, original[:, ::-1])
        )
    assert 5 < flips < 35 and shifted > 5  # both actually happen, neither always


def test_upsampling_uses_random_resized_crop_and_stays_deterministic():
    ex = make_examples(24, size=8)
    prep = Preprocessing(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    a = take(data.train_dataset(ex, prep, 8, seed=2), 4)
    b = take(data.train_dataset(ex, prep, 8, seed=2), 4)
    assert a[0][0].shape == (8, 16, 16, 3)
    assert_same_batches(a, b)
    plain = tf.image.resize(ex.images[a[0][1]].astype(np.float32), [16, 16]).numpy()
    assert not np.allclose(a[0][0], plain)  # cropped, not just resized
    # Each crop stays inside its own example: the example-id channel is constant.
    ids = a[0][0][..., 0]
    np.testing.assert_allclose(ids, (a[0][1] % 256 + 1)[:, None, None] * np.ones_like(ids))


@pytest.mark.parametrize("replicas,image_size", [(2, 8), (4, 8), (2, 12)])
def test_worker_slices_union_to_the_single_pipeline_global_batch(replicas, image_size):
    """2 input pipelines (workers) with `replicas` replicas in all: the per-replica batches of
    both, in order, make up exactly the single pipeline's global batches, pixels included."""
    ex = make_examples(48)
    prep = Preprocessing(image_size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    g, steps = 16, 5
    single = take(data.train_dataset(ex, prep, g, seed=7, start_epoch=1), steps)
    per_worker = []
    for i in range(2):
        ctx = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=i, num_replicas_in_sync=replicas
        )
        ds = data.train_dataset(ex, prep, g, seed=7, start_epoch=1, input_context=ctx)
        per_worker.append(take(ds, steps * replicas // 2))
    local = replicas // 2
    for k in range(steps):
        parts = [b for w in per_worker for b in w[k * local : (k + 1) * local]]
        assert all(len(y) == g // replicas for _, y in parts)
        np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), single[k][1])
        np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), single[k][0])


def test_eval_dataset_is_in_order_unaugmented_and_keeps_the_last_batch():
    ex = make_examples(21)
    batches = list(data.eval_dataset(ex, IDENTITY, 8))
    assert [len(y) for _, y in batches] == [8, 8, 5]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.arange(21))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), ex.images)
    prep = Preprocessing(image_size=12, mean=(1.0, 2.0, 3.0), std=(2.0, 2.0, 2.0))
    x, _ = next(iter(data.eval_dataset(ex, prep, 4)))
    expected = prep(tf.image.resize(ex.images[:4].astype(np.float32), [12, 12]).numpy())
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-4)


def test_eval_worker_slices_cover_every_example_once():
    ex = make_examples(21)
    labels = []
    for i in range(2):
        ctx = tf.distribute.InputContext(2, i, 2)
        labels.append(np.concatenate([y for _, y in data.eval_dataset(ex, IDENTITY, 8, ctx)]))
    assert sorted(np.concatenate(labels)) == list(range(21))


def test_sample_images_are_seeded_and_as_stored():
    ex = make_examples(30)
    images, labels = data.sample_images(ex, 6, seed=1)
    again, labels2 = data.sample_images(ex, 6, seed=1)
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(labels, labels2)
    np.testing.assert_array_equal(images, ex.images[labels])
    np.testing.assert_array_equal(images, again)


def test_too_few_examples_for_one_batch_is_a_data_error():
    with pytest.raises(DataError, match="fewer than one batch"):
        data.train_dataset(make_examples(10), IDENTITY, 16, seed=0)


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


def write_png(path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def write_folder(root, classes=("cat", "dog"), per_class: int = 5, size: int = 8, ext="png"):
    rng = np.random.default_rng(1)
    for c in classes:
        for i in range(per_class):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            write_png(root / c / f"{i}.{ext}", image)


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


def test_encoded_images_of_different_sizes_are_decoded_in_the_pipeline():
    """TFDS datasets whose images differ in size keep encoded bytes in memory."""
    sizes = [(8, 8), (12, 10), (6, 9), (8, 8)]
    encoded = [
        tf.io.encode_png(np.full((h, w, 3), 10 * i, np.uint8)).numpy()
        for i, (h, w) in enumerate(sizes)
    ]
    ex = Examples(np.arange(4, dtype=np.int64), encoded=np.array(encoded, dtype=object))
    x, y = next(iter(data.train_dataset(ex, IDENTITY, 4, seed=0)))
    assert x.shape == (4, 8, 8, 3)
    for image, label in zip(x.numpy(), y.numpy(), strict=True):
        # Pixels come from the example itself (or the zero padding of the 8x8 ones).
        assert set(np.unique(image)) <= {0.0, 10.0 * label}
    x, y = next(iter(data.eval_dataset(ex, IDENTITY, 4)))
    np.testing.assert_array_equal(y, np.arange(4))
    np.testing.assert_allclose(x[2], np.full((8, 8, 3), 20.0))  # resized, uniform stays uniform


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


@pytest.mark.parametrize("split", [0.0, 1.0])
def test_validation_split_of_0_or_1_is_an_error_when_a_holdout_is_needed(tmp_path, split):
    write_folder(tmp_path)
    with pytest.raises(DataError, match=f"--validation_split={split}"):
        data.load(DataConfig(data_dir=str(tmp_path), validation_split=split))


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


# --- flags and the samples picture ------------------------------------------------------


def test_data_flags_make_a_config():
    fv = flags.FlagValues()
    data_flags.define_data_flags(fv)
    data_flags.define_data_flags(fv)  # idempotent: train and evaluate may share a process
    fv(["prog", "--data_dir=/some/where", "--train_limit=10", "--validation_split=0.2"])
    config = data_flags.data_config_from_flags(seed=9, flag_values=fv)
    assert config == DataConfig("cifar10", "/some/where", 0.2, 10, None, 9)
    fv2 = flags.FlagValues()
    data_flags.define_data_flags(fv2)
    with pytest.raises(flags.IllegalFlagValueError):
        fv2(["prog", "--validation_split=1.0"])


def run_visualize(*args: str) -> subprocess.CompletedProcess:
    return run_program("app.visualize", *args, timeout=120)


@pytest.mark.slow
def test_visualize_draws_samples_and_reports_bad_data_in_one_line(tmp_path):
    write_folder(tmp_path / "data")
    out = tmp_path / "samples.png"
    ok = run_visualize(f"--data_dir={tmp_path / 'data'}", f"--output={out}", "--num=4")
    assert ok.returncode == 0, ok.stderr
    assert Image.open(out).size[0] > 100
    bad = run_visualize(f"--data_dir={tmp_path / 'missing'}", f"--output={tmp_path / 'x.png'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --data_dir ")
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.png").exists()
