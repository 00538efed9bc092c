"""TFRecord shards and streaming (app/data/shards.py, stream.py, app/make_shards*.py): the
converter, the shard source and its refusals, per-worker files on uneven shards, exact and
cheap resumption, TFDS over the memory budget, and every source through ram://."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import tensorflow as tf

from app import data, make_shards_lib
from app.data import DataConfig, DataError, stream
from app.data.types import pipeline_error
from common import files
from models.preprocessing import Preprocessing
from tests.helpers import (
    corrupt_record,
    image_number,
    numbered_image,
    shard_record,
    write_folder,
    write_shards,
)

IDENTITY = Preprocessing(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def streamed(root, **kwargs) -> data.Splits:
    return data.load(DataConfig(data_dir=str(root), memory_budget_mb=0, **kwargs))


def numbers_of(batches) -> list[np.ndarray]:
    return [image_number(x.numpy()) for x, _ in batches]


def context(pipelines: int, i: int) -> tf.distribute.InputContext:
    return tf.distribute.InputContext(pipelines, i, pipelines)


# --- the converter ------------------------------------------------------------------------


def test_converter_writes_model_gardens_layout_with_trainings_held_out_split(tmp_path):
    write_folder(tmp_path / "src" / "train", classes=("cat", "dog", "emu"), per_class=8)
    write_folder(tmp_path / "src" / "test", classes=("cat", "dog", "emu"), per_class=2)
    config = DataConfig(data_dir=str(tmp_path / "src"), validation_split=0.25, seed=4)
    out = tmp_path / "shards"
    index = make_shards_lib.make_shards(make_shards_lib.ShardsConfig(config, str(out), 2, 0))
    assert sorted(p.name for p in out.iterdir()) == [
        "labels.txt",
        "shards.json",
        "test-00000-of-00001",
        "train-00000-of-00002",
        "train-00001-of-00002",
        "validation-00000-of-00001",
    ]
    assert json.loads((out / "shards.json").read_text()) == index
    assert index["splits"]["train"]["num_examples"] == [9, 9]
    # Model Garden's classification decoder reads these records as they are.
    record = next(iter(tf.data.TFRecordDataset(str(out / "train-00000-of-00002"))))
    spec = {
        "image/encoded": tf.io.FixedLenFeature((), tf.string, ""),
        "image/class/label": tf.io.FixedLenFeature((), tf.int64, -1),
    }
    parsed = tf.io.parse_single_example(record, spec)
    assert int(parsed["image/class/label"]) in (0, 1, 2)
    assert tf.io.decode_png(parsed["image/encoded"]).shape == (8, 8, 3)
    # The same split as training from the folder: same images, same labels (PNG: lossless).
    folder = data.load(config)
    shards = data.load(DataConfig(data_dir=str(out)))
    assert shards.source == data.SOURCE_TFRECORD and shards.class_names == ["cat", "dog", "emu"]
    for split in ("train", "validation", "test"):
        a, b = getattr(folder, split), getattr(shards, split)
        key = sorted(zip(map(bytes, a.images), a.labels, strict=True))
        assert key == sorted(zip(map(bytes, b.images), b.labels, strict=True)), split


def test_cifar_batches_become_png_shards_pixel_for_pixel(tmp_path):
    from tests.test_data_sources import write_cifar_batches

    _, written = write_cifar_batches(tmp_path / "src", n_per_batch=6, batches=1)
    config = DataConfig(data_dir=str(tmp_path / "src"), validation_split=0.5)
    make_shards_lib.make_shards(make_shards_lib.ShardsConfig(config, str(tmp_path / "out"), 1, 0))
    splits = data.load(DataConfig(data_dir=str(tmp_path / "out")))
    assert splits.class_names == ["airplane", "automobile", "bird"]
    np.testing.assert_array_equal(
        sorted(map(bytes, splits.test.images)), sorted(map(bytes, written["test_batch"][0]))
    )


def test_a_killed_conversion_loads_as_nothing_and_the_same_command_finishes_it(
    tmp_path, monkeypatch
):
    write_folder(tmp_path / "src", per_class=6)
    config = make_shards_lib.ShardsConfig(
        DataConfig(data_dir=str(tmp_path / "src")), str(tmp_path / "out"), 3, 0
    )
    real = make_shards_lib._example
    calls = []

    def dying(*args):
        calls.append(1)
        if len(calls) > 7:  # in the third train shard
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(make_shards_lib, "_example", dying)
    with pytest.raises(KeyboardInterrupt):
        make_shards_lib.make_shards(config)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == [".make_shards.json", "train-00000-of-00003", "train-00001-of-00003"]
    with pytest.raises(DataError, match=r"unfinished conversion.*rerun the same"):
        data.load(DataConfig(data_dir=str(tmp_path / "out")))
    kept = (tmp_path / "out" / "train-00000-of-00003").stat().st_mtime_ns
    monkeypatch.setattr(make_shards_lib, "_example", real)
    make_shards_lib.make_shards(config)
    assert (tmp_path / "out" / "train-00000-of-00003").stat().st_mtime_ns == kept
    assert data.load(DataConfig(data_dir=str(tmp_path / "out"))).train.num_examples == 11
    with pytest.raises(make_shards_lib.UsageError, match="already holds a converted dataset"):
        make_shards_lib.make_shards(config)


def test_the_converter_refuses_a_bad_image_by_its_path(tmp_path):
    write_folder(tmp_path / "src")
    (tmp_path / "src" / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    config = DataConfig(data_dir=str(tmp_path / "src"), validation_split=0.2)
    with pytest.raises(DataError, match=r"dog/2.png"):
        make_shards_lib.make_shards(make_shards_lib.ShardsConfig(config, str(tmp_path / "o"), 1, 0))
    assert not (tmp_path / "o" / "labels.txt").exists()


# --- the shard source ---------------------------------------------------------------------


def test_shards_are_refused_when_one_is_missing_or_the_keys_differ(tmp_path):
    write_shards(tmp_path, [3, 3, 3])
    (tmp_path / "train-00001-of-00003").unlink()
    with pytest.raises(DataError, match=r"train-00001-of-00003 is missing \(2 of 3 found\)"):
        data.load(DataConfig(data_dir=str(tmp_path)))
    other = tmp_path / "other"
    other.mkdir()
    with tf.io.TFRecordWriter(str(other / "train-00000-of-00001")) as writer:
        example = tf.train.Example()
        example.features.feature["image"].bytes_list.value.append(b"x")
        example.features.feature["label"].int64_list.value.append(1)
        writer.write(example.SerializeToString())
    with pytest.raises(DataError) as raised:
        data.load(DataConfig(data_dir=str(other)))
    message = str(raised.value)
    assert "image (bytes_list), label (int64_list)" in message
    assert "expected image/encoded" in message and "image/class/label" in message


def test_model_garden_shards_count_from_1_and_name_classes_in_their_records(tmp_path):
    """No labels.txt, no shards.json, labels 1..3 with image/class/text: --label_offset=1."""
    for split, first in (("train", 0), ("validation", 100)):
        with tf.io.TFRecordWriter(str(tmp_path / f"{split}-00000-of-00001")) as writer:
            for i in range(6):
                encoded = tf.io.encode_png(numbered_image(first + i)).numpy()
                text = ["ant", "bee", "cow"][i % 3].encode()
                writer.write(shard_record(encoded, i % 3 + 1, **{"image/class/text": text}))
    splits = data.load(DataConfig(data_dir=str(tmp_path), label_offset=1))
    assert splits.class_names == ["ant", "bee", "cow"]
    assert list(splits.validation.labels) == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DataError, match=r"no class for label 0 .*--label_offset=1"):
        data.load(DataConfig(data_dir=str(tmp_path)))
    # With labels.txt and no offset, label 3 is out of range: named when read into memory,
    # and by the pipeline when streamed.
    (tmp_path / "labels.txt").write_text("ant\nbee\ncow\n")
    with pytest.raises(DataError, match=r"train-00000-of-00001: record 2 has label 3"):
        data.load(DataConfig(data_dir=str(tmp_path), label_offset=0))
    wrong = streamed(tmp_path, label_offset=0)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        list(data.eval_dataset(wrong.validation, IDENTITY, 4))
    assert "validation-00000-of-00001: record 2 has label 3" in pipeline_error(raised.value)
    # Counted at start-up without shards.json; --index_only writes one with the offset.
    make_shards_lib.write_index(str(tmp_path), label_offset=1)
    index = json.loads((tmp_path / "shards.json").read_text())
    assert index["label_offset"] == 1 and index["splits"]["train"]["num_examples"] == [6]
    assert streamed(tmp_path).train.records.label_offset == 1


def test_only_test_shards_are_evaluation_data(tmp_path):
    write_shards(tmp_path, [4, 2], split="test")
    splits = streamed(tmp_path)
    assert splits.evaluation_only and splits.test.num_examples == 6
    labels = np.concatenate([y for _, y in data.eval_dataset(splits.test, IDENTITY, 4)])
    np.testing.assert_array_equal(labels, np.arange(6) % 3)


def test_a_corrupt_record_met_mid_run_stops_it_naming_the_shard(tmp_path):
    write_shards(tmp_path, [10, 10])
    corrupt_record(tmp_path / "train-00001-of-00002", 6)
    splits = streamed(tmp_path, validation_split=0.1)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        for _ in data.train_dataset(splits.train, IDENTITY, 2, seed=0, augment=False).take(20):
            pass
    assert "train-00001-of-00002: record 6 is corrupt or unreadable" in pipeline_error(raised.value)
    with pytest.raises(DataError, match=r"train-00001-of-00002: record 6 is corrupt"):
        data.load(DataConfig(data_dir=str(tmp_path)))  # read into memory: the same check


def test_an_image_over_the_pixel_limit_met_mid_run_is_named_by_shard_and_record(tmp_path):
    write_shards(tmp_path, [10, 10], size=8)
    splits = streamed(tmp_path, validation_split=0.1, max_pixels=63)  # every image: 64
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        for _ in data.train_dataset(splits.train, IDENTITY, 2, seed=0, augment=False):
            pass
    line = pipeline_error(raised.value)
    assert line is not None, raised.value
    assert "-of-00002: record " in line and "image of 8x8 pixels is over the limit of 63" in line


# --- streaming: order, workers, resume ----------------------------------------------------


def test_streamed_epochs_are_seeded_permutations_of_the_data(tmp_path):
    numbers = write_shards(tmp_path, [6, 6, 6, 6])
    train = streamed(tmp_path, validation_split=0.25).train  # the last 2 of each shard held out
    kept = sorted(n for n in numbers if n % 6 < 4)
    ds = data.train_dataset(train, IDENTITY, 4, seed=1, augment=False)
    epochs = np.concatenate(numbers_of(ds.take(12))).reshape(3, 16)
    for epoch in epochs:
        assert sorted(epoch) == kept
    assert len({tuple(e) for e in epochs}) == 3
    other = data.train_dataset(train, IDENTITY, 4, seed=2, augment=False)
    assert not np.array_equal(np.concatenate(numbers_of(other.take(4))), epochs[0])
    tf.random.set_seed(123)  # TensorFlow's global seed changes nothing
    same = data.train_dataset(train, IDENTITY, 4, seed=1, augment=False)
    np.testing.assert_array_equal(np.concatenate(numbers_of(same.take(4))), epochs[0])
    batches = list(data.eval_dataset(train, IDENTITY, 5))
    assert [len(y) for _, y in batches] == [5, 5, 5, 1]
    assert list(np.concatenate(numbers_of(batches))) == kept  # stored order


def test_two_workers_on_uneven_shards_read_their_own_and_drop_as_the_rule_says(tmp_path):
    """Shards of 7, 5 and 9 examples, 2 input pipelines, global batch 4 (2 per worker).

    The rule: worker 0 gets the 9-example shard, worker 1 the 7 and the 5 (largest first
    onto the emptier worker); each makes min(9, 12) // 2 = 4 steps a epoch, so worker 0
    leaves 1 example out and worker 1 leaves 4, the last of its seeded order each epoch."""
    write_shards(tmp_path, [7, 5, 9])
    write_shards(tmp_path, [2], split="validation", first=100)
    train = streamed(tmp_path).train
    assert data.steps_per_epoch(train, 4, 2) == 4 and data.steps_per_epoch(train, 4) == 5
    owned = {0: set(range(12, 21)), 1: set(range(0, 12))}
    seen = {}
    for w in (0, 1):
        ds = data.train_dataset(
            train, IDENTITY, 4, seed=3, augment=False, input_context=context(2, w)
        )
        seen[w] = np.concatenate(numbers_of(ds.take(12))).reshape(3, 8)  # 3 epochs of 4 steps
    for e in range(3):
        both = np.concatenate([seen[0][e], seen[1][e]])
        assert len(set(both)) == 16  # no example twice in an epoch
        for w in (0, 1):
            assert set(seen[w][e]) <= owned[w]  # each worker reads only its own shards
        assert len(owned[0] - set(seen[0][e])) == 1 and len(owned[1] - set(seen[1][e])) == 4
    assert len({frozenset(owned[1] - set(seen[1][e])) for e in range(3)}) > 1  # varies
    # Fewer files than pipelines: each pipeline gets its own range of every file.
    parts = stream.assign_files(train.records, 4)
    assert [sum(f.take for f in p) for p in parts] == [6, 5, 5, 5]


@pytest.mark.parametrize("pipelines", [1, 2])
def test_resuming_mid_epoch_gives_the_remaining_batches_exactly(tmp_path, monkeypatch, pipelines):
    monkeypatch.setattr(stream, "MAX_WINDOW", 8)  # several windows and lanes in 40 records
    monkeypatch.setattr(stream, "LANES", 4)
    write_shards(tmp_path, [13, 11, 9, 7])
    train = streamed(tmp_path, validation_split=0.1).train
    g = 4
    steps = data.steps_per_epoch(train, g, pipelines)
    for w in range(pipelines):
        ctx = context(pipelines, w) if pipelines > 1 else None
        full = list(
            data.train_dataset(train, IDENTITY, g, seed=5, input_context=ctx).take(3 * steps)
        )
        for start_epoch, start_step in [(0, 3), (1, 1), (1, steps - 1), (2, 2)]:
            resumed = data.train_dataset(
                train, IDENTITY, g, seed=5, start_epoch=start_epoch, start_step=start_step,
                input_context=ctx,
            )  # fmt: skip
            at = start_epoch * steps + start_step
            for (xa, ya), (xb, yb) in zip(resumed.take(len(full) - at), full[at:], strict=True):
                np.testing.assert_array_equal(ya, yb)
                np.testing.assert_array_equal(xa, xb)  # augmentation included


def test_a_resume_neither_reads_nor_decodes_the_windows_already_trained(tmp_path, monkeypatch):
    """A record of the first window is corrupted after the fact: the full epoch stops on
    it; a resume past that window never reads it (nor its image) and trains on exactly
    the batches the uninterrupted run had."""
    monkeypatch.setattr(stream, "MAX_WINDOW", 8)
    monkeypatch.setattr(stream, "LANES", 2)
    write_shards(tmp_path, [16, 16])
    write_shards(tmp_path, [2], split="validation", first=100)
    train = streamed(tmp_path).train
    full = numbers_of(data.train_dataset(train, IDENTITY, 4, seed=0, augment=False).take(8))
    victim = int(full[0][0])  # trained in the first window (8 records: steps 0 and 1)
    shard = tmp_path / f"train-{victim // 16:05d}-of-00002"
    records = list(tf.data.TFRecordDataset(str(shard)).as_numpy_iterator())
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for i, record in enumerate(records):
            writer.write(record if i != victim % 16 else b"\x00" * len(record))
    with pytest.raises(tf.errors.InvalidArgumentError):
        numbers_of(data.train_dataset(train, IDENTITY, 4, seed=0, augment=False).take(8))
    resumed = data.train_dataset(train, IDENTITY, 4, seed=0, augment=False, start_step=2)
    assert [list(b) for b in numbers_of(resumed.take(6))] == [list(b) for b in full[2:]]


# --- TFDS over the memory budget, and every source in a bucket ------------------------------


def test_a_tfds_dataset_over_the_budget_streams_its_own_files(tmp_path):
    import tensorflow_datasets as tfds

    images = np.stack([numbered_image(i) for i in range(21)])
    split = {"image": images, "label": np.arange(21) % 3}
    builder = tfds.dataset_builders.TfDataBuilder(
        name="tiny_numbers",
        version="1.0.0",
        split_datasets={"train": tf.data.Dataset.from_tensor_slices(split)},
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            }
        ),
        data_dir=str(tmp_path),
        disable_shuffling=True,
    )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
    config = DataConfig(
        dataset="tiny_numbers", data_dir=str(tmp_path), validation_split=1 / 7, memory_budget_mb=0
    )
    splits = data.load(config)
    assert splits.source == data.SOURCE_TFDS and splits.train.streamed
    assert splits.train.num_examples == 18 and splits.validation.num_examples == 3
    # 3 files of 6 on 2 workers: 12 and 6 records, 3 steps of 2 each.
    assert data.steps_per_epoch(splits.train, 4, 2) == 3
    seen = []
    for w in (0, 1):
        ds = data.train_dataset(
            splits.train, IDENTITY, 4, seed=0, augment=False, input_context=context(2, w)
        )
        seen.append(set(np.concatenate(numbers_of(ds.take(3)))))
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 6
    held = np.concatenate(numbers_of(data.eval_dataset(splits.validation, IDENTITY, 8)))
    assert list(held) == [6, 13, 20]  # the last of each of the 3 files of 7


def test_every_source_in_a_bucket_loads_trains_and_evaluates():
    """An image folder, CIFAR python batches and shards on ram://, TF's in-process file
    system standing in for gs://."""
    import pickle

    root = f"ram://data-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(6):
            image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            files.write_bytes(f"{root}/folder/{c}/{i}.png", tf.io.encode_png(image).numpy())
    meta = {b"label_names": [b"a", b"b"]}
    files.write_bytes(f"{root}/cifar/batches.meta", pickle.dumps(meta))
    rows = rng.integers(0, 256, (8, 3072), dtype=np.uint8)
    batch = {b"data": rows, b"labels": [0, 1] * 4}
    files.write_bytes(f"{root}/cifar/data_batch_1", pickle.dumps(batch))
    config = DataConfig(data_dir=f"{root}/folder", validation_split=0.25)
    make_shards_lib.make_shards(make_shards_lib.ShardsConfig(config, f"{root}/shards", 2, 0))
    for where, budget in (("folder", None), ("cifar", None), ("shards", None), ("shards", 0)):
        splits = data.load(DataConfig(data_dir=f"{root}/{where}", validation_split=0.25,
                                      memory_budget_mb=budget))  # fmt: skip
        x, y = next(iter(data.train_dataset(splits.train, IDENTITY, 2, seed=0)))
        assert x.shape == (2, 8, 8, 3) and y.shape == (2,)
        labels = np.concatenate([y for _, y in data.eval_dataset(splits.validation, IDENTITY, 2)])
        assert len(labels) == splits.validation.num_examples > 0
    with pytest.raises(DataError, match="does not exist"):
        data.load(DataConfig(data_dir=f"{root}/missing"))


def test_an_image_folder_starts_without_reading_every_header_when_a_sample_decides(
    tmp_path, monkeypatch
):
    from app.data import decode

    write_folder(tmp_path, per_class=100, size=8)
    read = []
    real = decode._header_shape
    monkeypatch.setattr(decode, "_header_shape", lambda p, m=0: read.append(p) or real(p, m))
    splits = data.load(DataConfig(data_dir=str(tmp_path), memory_budget_mb=0))
    assert splits.train.files is not None  # over the budget: decoded in the pipeline
    assert len(read) <= 2 * decode.HEADER_SAMPLE  # a sample of train and of validation
    read.clear()
    assert data.load(DataConfig(data_dir=str(tmp_path))).train.images is not None
    assert len(read) > 200  # fits: every header read, then decoded once
