"""The data pipelines (app/data/pipeline.py, augment.py, samples.py): batch shapes, the
determinism contract (seeded epochs, resume, worker slices), augmentation, evaluation order."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from app import data
from app.data import DataError, Examples
from models import preprocessing
from models.preprocessing import Preprocessing

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
