"""Evaluation: metrics, split choice, class checks, the training run's data flags, the CLI.

The slow tests evaluate a small ResNet-18 (the `model_dir` fixture: 16x16 input, fitted on
200 real CIFAR-10 images through the project's own pipeline) with `python -m app.evaluate`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from app import data, data_flags, evaluate_lib
from common.errors import UsageError
from tests.helpers import error_lines, run_program

# --------------------------------------------------------------------------------------
# Metrics (pure)


def test_compute_metrics_matches_definitions():
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(7)]
    labels = rng.integers(0, 6, size=300)  # class c6 never occurs
    logits = rng.normal(size=(300, 7)).astype(np.float32)
    logits[np.arange(300), labels] += rng.normal(1.0, 1.0, size=300)
    result = evaluate_lib.compute_metrics(logits, labels, names, "validation")

    predicted = logits.argmax(1)
    assert result.top1 == pytest.approx(np.mean(predicted == labels))
    rank = (logits > logits[np.arange(300), labels][:, None]).sum(1)
    assert result.k == 5
    assert result.topk == pytest.approx(np.mean(rank < 5))
    shifted = logits - logits.max(1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    assert result.loss == pytest.approx(-np.mean(log_softmax[np.arange(300), labels]), rel=1e-5)
    assert result.confusion.sum() == 300
    for t in range(7):
        for p in range(7):
            assert result.confusion[t, p] == np.sum((labels == t) & (predicted == p))
    accuracy = result.class_accuracy
    assert math.isnan(accuracy[6])
    assert accuracy[2] == pytest.approx(np.mean(predicted[labels == 2] == 2))
    document = result.to_dict()
    assert document["per_class"]["c6"] == {"examples": 0, "correct": 0, "accuracy": None}
    assert document["top5_accuracy"] == result.topk
    json.dumps(document)  # serialisable as is


def test_topk_is_capped_by_the_number_of_classes():
    logits = np.array([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]], np.float32)
    result = evaluate_lib.compute_metrics(logits, np.array([0, 2]), ["a", "b", "c"], "test")
    assert (result.k, result.topk, result.top1) == (3, 1.0, 0.0)
    assert "top3_accuracy" in result.to_dict()


def test_report_lists_every_class_and_the_worst_confusion():
    confusion_logits = np.eye(3, dtype=np.float32)[[0, 0, 1, 2, 2, 2]] * 5
    labels = np.array([0, 1, 1, 2, 2, 0])  # 1 read as 0 once, 0 read as 2 once
    result = evaluate_lib.compute_metrics(confusion_logits, labels, ["cat", "dog", "frog"], "test")
    report = evaluate_lib.format_report(result)
    rows = {line.split()[0]: line.split()[1:] for line in report.splitlines() if line}
    assert rows["cat"] == ["2", "1", "0.5000"]
    assert rows["dog"] == ["2", "1", "0.5000"]
    assert rows["frog"] == ["2", "2", "1.0000"]
    assert "top-1 accuracy  0.6667" in report
    assert result.most_confused() == [("cat", "frog", 1), ("dog", "cat", 1)]


def test_check_class_names_refuses_other_classes():
    evaluate_lib.check_class_names(["a", "b"], ["a", "b"], "here")
    with pytest.raises(UsageError, match=r"class 1 is 'c' in the data but 'b' in the model"):
        evaluate_lib.check_class_names(["a", "b"], ["a", "c"], "here")
    with pytest.raises(UsageError, match="3 classes in the data, 2 in the model"):
        evaluate_lib.check_class_names(["a", "b"], ["a", "b", "c"], "here")
    with pytest.raises(UsageError, match="class 0"):  # same names, another order
        evaluate_lib.check_class_names(["a", "b"], ["b", "a"], "here")


def _splits(with_test: bool) -> data.Splits:
    def examples(n, origin):
        return data.Examples(
            np.zeros(n, np.int64), images=np.zeros((n, 2, 2, 3), np.uint8), origin=origin
        )

    return data.Splits(
        train=examples(8, "/d/train"),
        validation=examples(3, "/d/train"),
        test=examples(5, "/d/test") if with_test else None,
        class_names=["a"],
        source="image-folder",
        validation_held_out=True,
    )


def test_choose_split_falls_back_from_test_to_validation_with_a_note():
    splits = _splits(with_test=False)
    name, examples, note = evaluate_lib.choose_split(splits, "test")
    assert (name, examples.num_examples) == ("validation", 3)
    assert "no test split" in note and "--validation_split" in note
    name, examples, note = evaluate_lib.choose_split(_splits(with_test=True), "test")
    assert (name, examples.num_examples, note) == ("test", 5, None)
    assert evaluate_lib.choose_split(splits, "train")[1].num_examples == 8
    with pytest.raises(UsageError, match="--split=dev"):
        evaluate_lib.choose_split(splits, "dev")


def test_sample_indices_spread_over_the_split():
    assert evaluate_lib.sample_indices(1000) == [0, 200, 400, 599, 799, 999]
    assert evaluate_lib.sample_indices(4) == [0, 1, 2, 3]
    assert evaluate_lib.sample_indices(0) == []


def test_read_flagfile(tmp_path):
    path = tmp_path / "flags.txt"
    path.write_text("# comment\n--data_dir=/x=y\n--seed=3\n--nouse_ema\n\n")
    assert data_flags.read_flagfile(str(path)) == {"data_dir": "/x=y", "seed": "3"}
    assert data_flags.read_flagfile(str(tmp_path / "missing.txt")) == {}


def test_training_run_flags_give_the_data_to_evaluate_and_export_on(tmp_path):
    """The one read-back of flags.txt that app.evaluate and app.export share."""
    model = str(tmp_path / "best.keras")  # flags.txt is read beside it
    assert data_flags.training_run_flags(model) == {}
    assert data_flags.training_data_config(model) is None  # nothing to read images from
    assert data_flags.training_data_config(model, "/imgs") == data.DataConfig(data_dir="/imgs")
    (tmp_path / "flags.txt").write_text(
        "--dataset=cifar100\n--data_dir=/d\n--validation_split=0.25\n--seed=7\n--epochs=3\n"
    )
    trained = data_flags.training_run_flags(model)
    assert trained == {
        "dataset": "cifar100",
        "data_dir": "/d",
        "validation_split": 0.25,
        "seed": 7,
        "epochs": "3",
    }
    run = data.DataConfig("cifar100", "/d", 0.25, seed=7)
    assert data_flags.training_data_config(model) == run
    assert data_flags.training_data_config(model, "/imgs") == data.DataConfig(
        "cifar100", "/imgs", 0.25, seed=7
    )

    # app.evaluate: data flags given on the command line win; the others are the run's.
    from absl import flags

    fv = flags.FlagValues()
    data_flags.define_data_flags(fv)
    fv(["prog", "--data_dir=/mine", "--eval_limit=5"])
    config = data_flags.data_config_from_flags(3, fv, inherit=trained)
    assert config == data.DataConfig("cifar100", "/mine", 0.25, None, 5, seed=3)

    (tmp_path / "flags.txt").write_text("--seed=seven\n")
    with pytest.raises(UsageError, match="bad --seed or --validation_split in the model's"):
        data_flags.training_run_flags(model)


def _asymmetric_model():
    """A tiny model whose logits change when the image is mirrored."""
    import keras

    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(seed=1))(x)
    return keras.Model(inputs, outputs)


def test_flip_averages_the_logits_of_each_image_and_its_mirror():
    """A Keras model: the loop runs over the tf.data pipeline and averages logits."""
    from app import inference
    from models import preprocessing
    from models.bundle import ModelBundle

    model = _asymmetric_model()
    prep = preprocessing.cifar(4)
    predictor = inference.KerasPredictor(ModelBundle(model, ["a", "b", "c"], prep, "m.keras"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(5, 4, 4, 3)).astype(np.uint8)
    examples = data.Examples(images=images, labels=np.arange(5) % 3, origin="test")
    plain, _, _ = evaluate_lib.run_over(predictor, predictor.batches(examples, 2), verbose=0)
    flipped, seen, kept = evaluate_lib.run_over(
        predictor, predictor.batches(examples, 2), keep=[1, 4], verbose=0, flip=True
    )
    normalised = np.asarray(prep(images.astype(np.float32)), np.float32)
    mirror = model.predict(normalised[:, :, ::-1], verbose=0)
    np.testing.assert_allclose(plain, model.predict(normalised, verbose=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flipped, (plain + mirror) / 2, rtol=1e-5, atol=1e-5)
    assert not np.allclose(flipped, plain)
    np.testing.assert_array_equal(seen, np.arange(5) % 3)
    assert sorted(kept) == [1, 4]  # the picture's images, back in 0..255 pixels
    np.testing.assert_allclose(kept[4], images[4], atol=1e-3)


def test_flip_averages_the_probabilities_of_any_format():
    """An exported format: the loop feeds the images as stored and averages probabilities."""
    from app import inference

    class LeftColumn(inference.Predictor):
        """Probabilities from the mean of each image's left column (a mirror changes it)."""

        image_size = None

        def predict(self, images):
            left = np.stack([image[:, 0].mean(axis=0) for image in images]).astype(np.float32)
            return left / left.sum(axis=1, keepdims=True)

    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, size=(3, 4, 4, 3)).astype(np.uint8)
    examples = data.Examples(images=images, labels=np.zeros(3, np.int64), origin="test")
    predictor = LeftColumn()
    flipped, _, kept = evaluate_lib.run_over(
        predictor, predictor.batches(examples, 2), keep=[2], verbose=0, flip=True
    )
    expected = (predictor.predict(list(images)) + predictor.predict(list(images[:, :, ::-1]))) / 2
    np.testing.assert_allclose(flipped, expected, rtol=1e-6)
    assert not np.allclose(flipped, predictor.predict(list(images)))
    assert kept[2].shape == (inference.DISPLAY_SIZE, inference.DISPLAY_SIZE, 3)


# --------------------------------------------------------------------------------------
# With a trained model and real images


@pytest.mark.slow
def test_evaluate_cli_on_real_images(model_dir, cifar10_dir, tmp_path):
    """Defaults: data flags from flags.txt, --split=test falls back to validation."""
    out = tmp_path / "eval"
    proc = run_program(
        "app.evaluate",
        f"--model={model_dir / 'best.keras'}",
        "--eval_limit=120",
        f"--output_dir={out}",
        "--verbose=0",
    )
    assert proc.returncode == 0, proc.stderr
    assert "no test split" in proc.stderr
    assert sorted(os.listdir(out)) == [
        "confusion_validation.png",
        "eval_validation.json",
        "predictions_validation.png",
    ]
    report = json.loads((out / "eval_validation.json").read_text())
    assert report["split"] == "validation" and report["requested_split"] == "test"
    assert report["num_examples"] == 120
    assert report["data_config"]["data_dir"] == str(cifar10_dir)  # from flags.txt
    confusion = np.array(report["confusion_matrix"])
    assert confusion.sum() == 120
    assert report["top1_accuracy"] == pytest.approx(np.trace(confusion) / 120)
    assert report["top1_accuracy"] <= report["top5_accuracy"] <= 1
    assert report["top1_accuracy"] > 0.1  # fitted on other images, still above chance
    for i, name in enumerate(report["class_names"]):
        assert report["per_class"][name]["examples"] == confusion[i].sum()
    assert f"top-1 accuracy  {report['top1_accuracy']:.4f}" in proc.stdout
    assert all(name in proc.stdout for name in report["class_names"])

    # The metrics are those of the model on the same images, computed independently.
    import keras

    from models.bundle import load_model_bundle

    bundle = load_model_bundle(str(model_dir / "best.keras"))
    splits = data.load(data.DataConfig(data_dir=str(cifar10_dir), train_limit=1, eval_limit=120))
    logits = bundle.model.predict(
        data.eval_dataset(splits.validation, bundle.preprocessing, 64), verbose=0
    )
    labels = splits.validation.labels
    assert report["top1_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    assert report["loss"] == pytest.approx(float(loss), rel=1e-4)

    with Image.open(out / "predictions_validation.png") as grid:
        assert grid.width > grid.height  # 2 rows of 3
    with Image.open(out / "confusion_validation.png") as picture:
        assert picture.size[0] > 300


@pytest.mark.slow
def test_evaluate_refuses_data_with_other_classes(model_dir, cifar10_dir, tmp_path):
    folder = tmp_path / "other"
    for name in ("airplane", "car"):  # 2 classes, the second unknown to the model
        (folder / name).mkdir(parents=True)
        for i in range(2):
            src = cifar10_dir / "train" / "airplane" / f"000{i}.jpg"
            (folder / name / f"{i}.jpg").write_bytes(src.read_bytes())
    out = tmp_path / "out"
    proc = run_program(
        "app.evaluate",
        f"--model={model_dir / 'best.keras'}",
        f"--data_dir={folder}",
        "--split=validation",
        "--validation_split=0.5",
        f"--output_dir={out}",
    )
    assert proc.returncode == 2
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "differ from the model's labels.txt" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_evaluate_cli_flip_scores_the_mean_of_each_image_and_its_mirror(
    model_dir, cifar10_dir, tmp_path
):
    from models.bundle import load_model_bundle

    out = tmp_path / "eval"
    proc = run_program(
        "app.evaluate",
        f"--model={model_dir / 'best.keras'}",
        "--split=validation",
        "--eval_limit=120",
        "--flip",
        f"--output_dir={out}",
        "--verbose=0",
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == [
        "confusion_validation_flip.png",
        "eval_validation_flip.json",
        "predictions_validation_flip.png",
    ]
    report = json.loads((out / "eval_validation_flip.json").read_text())
    assert report["test_time_flip"] is True

    bundle = load_model_bundle(str(model_dir / "best.keras"))
    splits = data.load(data.DataConfig(data_dir=str(cifar10_dir), train_limit=1, eval_limit=120))
    images = np.concatenate(
        [x for x, _ in data.eval_dataset(splits.validation, bundle.preprocessing, 64)]
    )
    logits = bundle.model.predict(images, verbose=0) + bundle.model.predict(
        images[:, :, ::-1], verbose=0
    )
    top1 = np.mean(logits.argmax(1) == splits.validation.labels)
    assert report["top1_accuracy"] == pytest.approx(top1)
