"""Evaluation and prediction: metrics, split choice, class checks, image reading, the CLIs.

A small ResNet-18 (CIFAR stem, 16x16 input so it trains in well under a minute on 2 cores)
is trained once per module on 200 real CIFAR-10 images through the project's own pipeline.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from app import data, evaluation, prediction
from common.errors import UsageError
from models import preprocessing, resnet
from models.bundle import write_labels
from tests.helpers import error_lines, require_cifar10, run_program

IMAGE_SIZE = 16
TRAIN_IMAGES = 200
EPOCHS = 4


# --------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    """A model directory as app.train leaves it: best.keras, labels.txt,
    preprocessing.json and flags.txt, from a ResNet-18 fitted on real CIFAR-10 images."""
    import keras

    cifar10 = require_cifar10()
    directory = tmp_path_factory.mktemp("model")
    config = data.DataConfig(data_dir=str(cifar10), train_limit=TRAIN_IMAGES, eval_limit=1, seed=0)
    splits = data.load(config)
    prep = preprocessing.cifar(IMAGE_SIZE)
    keras.utils.set_random_seed(0)
    model = resnet.resnet18(
        num_classes=len(splits.class_names), input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), stem="cifar"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batch = 25
    model.fit(
        data.train_dataset(splits.train, prep, batch, seed=0, augment=False),
        steps_per_epoch=data.steps_per_epoch(splits.train, batch),
        epochs=EPOCHS,
        shuffle=False,  # the pipeline orders each epoch itself
        verbose=0,
    )
    model.save(directory / "best.keras")
    write_labels(str(directory), splits.class_names)
    prep.save(str(directory))
    (directory / "flags.txt").write_text(
        f"# training run\n--data_dir={cifar10}\n--validation_split=0.1\n--seed=0\n"
    )
    keras.backend.clear_session()
    return directory


@pytest.fixture
def images_dir(tmp_path, cifar10_dir) -> pathlib.Path:
    """Real CIFAR-10 images in several forms: JPEG as stored, an enlarged odd-sized PNG,
    grayscale, RGBA, and a text file that is not an image."""
    sources = [
        cifar10_dir / "train" / name / "0000.jpg" for name in ("airplane", "cat", "ship", "truck")
    ]
    out = tmp_path / "images"
    out.mkdir()
    (out / "plane.jpg").write_bytes(sources[0].read_bytes())
    Image.open(sources[1]).resize((70, 50), Image.BICUBIC).save(out / "cat_70x50.png")
    Image.open(sources[2]).convert("L").save(out / "ship_gray.png")
    rgba = Image.open(sources[3]).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(out / "truck_rgba.png")
    (out / "notes.txt").write_text("not an image\n")
    return out


# --------------------------------------------------------------------------------------
# Metrics (pure)


def test_compute_metrics_matches_definitions():
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(7)]
    labels = rng.integers(0, 6, size=300)  # class c6 never occurs
    logits = rng.normal(size=(300, 7)).astype(np.float32)
    logits[np.arange(300), labels] += rng.normal(1.0, 1.0, size=300)
    result = evaluation.compute_metrics(logits, labels, names, "validation")

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
    result = evaluation.compute_metrics(logits, np.array([0, 2]), ["a", "b", "c"], "test")
    assert (result.k, result.topk, result.top1) == (3, 1.0, 0.0)
    assert "top3_accuracy" in result.to_dict()


def test_report_lists_every_class_and_the_worst_confusion():
    confusion_logits = np.eye(3, dtype=np.float32)[[0, 0, 1, 2, 2, 2]] * 5
    labels = np.array([0, 1, 1, 2, 2, 0])  # 1 read as 0 once, 0 read as 2 once
    result = evaluation.compute_metrics(confusion_logits, labels, ["cat", "dog", "frog"], "test")
    report = evaluation.format_report(result)
    rows = {line.split()[0]: line.split()[1:] for line in report.splitlines() if line}
    assert rows["cat"] == ["2", "1", "0.5000"]
    assert rows["dog"] == ["2", "1", "0.5000"]
    assert rows["frog"] == ["2", "2", "1.0000"]
    assert "top-1 accuracy  0.6667" in report
    assert result.most_confused() == [("cat", "frog", 1), ("dog", "cat", 1)]


def test_check_class_names_refuses_other_classes():
    evaluation.check_class_names(["a", "b"], ["a", "b"], "here")
    with pytest.raises(UsageError, match=r"class 1 is 'c' in the data but 'b' in the model"):
        evaluation.check_class_names(["a", "b"], ["a", "c"], "here")
    with pytest.raises(UsageError, match="3 classes in the data, 2 in the model"):
        evaluation.check_class_names(["a", "b"], ["a", "b", "c"], "here")
    with pytest.raises(UsageError, match="class 0"):  # same names, another order
        evaluation.check_class_names(["a", "b"], ["b", "a"], "here")


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
    name, examples, note = evaluation.choose_split(splits, "test")
    assert (name, examples.num_examples) == ("validation", 3)
    assert "no test split" in note and "--validation_split" in note
    name, examples, note = evaluation.choose_split(_splits(with_test=True), "test")
    assert (name, examples.num_examples, note) == ("test", 5, None)
    assert evaluation.choose_split(splits, "train")[1].num_examples == 8
    with pytest.raises(UsageError, match="--split=dev"):
        evaluation.choose_split(splits, "dev")


def test_sample_indices_spread_over_the_split():
    assert evaluation.sample_indices(1000) == [0, 200, 400, 599, 799, 999]
    assert evaluation.sample_indices(4) == [0, 1, 2, 3]
    assert evaluation.sample_indices(0) == []


def test_read_flagfile(tmp_path):
    path = tmp_path / "flags.txt"
    path.write_text("# comment\n--data_dir=/x=y\n--seed=3\n--nouse_ema\n\n")
    assert evaluation.read_flagfile(str(path)) == {"data_dir": "/x=y", "seed": "3"}
    assert evaluation.read_flagfile(str(tmp_path / "missing.txt")) == {}


# --------------------------------------------------------------------------------------
# Images and top-k (pure)


def test_top_k_orders_and_caps():
    probabilities = np.array([0.1, 0.6, 0.05, 0.25])
    top = prediction.top_k(probabilities, ["a", "b", "c", "d"], 3)
    assert [(p.name, p.index) for p in top] == [("b", 1), ("d", 3), ("a", 0)]
    assert top[0].probability == pytest.approx(0.6)
    assert len(prediction.top_k(probabilities, ["a", "b", "c", "d"], 10)) == 4


def test_read_image_handles_formats_and_names_bad_files(images_dir):
    plane = prediction.read_image(str(images_dir / "plane.jpg"))
    assert plane.shape == (32, 32, 3) and plane.dtype == np.uint8
    assert prediction.read_image(str(images_dir / "cat_70x50.png")).shape == (50, 70, 3)
    gray = prediction.read_image(str(images_dir / "ship_gray.png"))
    assert gray.shape == (32, 32, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    rgba = prediction.read_image(str(images_dir / "truck_rgba.png"))
    expected = np.asarray(Image.open(images_dir / "truck_rgba.png").convert("RGBA"))[..., :3]
    np.testing.assert_array_equal(rgba, expected)  # alpha dropped, colours kept
    with pytest.raises(prediction.ImageError, match=r"notes\.txt: not a readable image"):
        prediction.read_image(str(images_dir / "notes.txt"))
    with pytest.raises(prediction.ImageError, match=r"missing\.jpg: no such file"):
        prediction.read_image(str(images_dir / "missing.jpg"))


def test_resize_is_the_pipelines_bilinear_resize(images_dir):
    import tensorflow as tf

    image = prediction.read_image(str(images_dir / "cat_70x50.png"))
    resized = prediction.resize(image, IMAGE_SIZE)
    assert resized.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and resized.dtype == np.float32
    np.testing.assert_array_equal(resized, data._resize(tf.constant(image), IMAGE_SIZE).numpy())
    native = prediction.read_image(str(images_dir / "plane.jpg"))
    np.testing.assert_array_equal(prediction.resize(native, 32), native.astype(np.float32))


def test_load_predictor_rejects_unknown_paths(tmp_path):
    with pytest.raises(UsageError, match="model not found"):
        prediction.load_predictor(str(tmp_path / "nothing.h5"))
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(UsageError, match=r"must be a \.keras file, a SavedModel folder"):
        prediction.load_predictor(str(tmp_path / "weights.h5"))
    with pytest.raises(UsageError, match="no SavedModel in"):
        prediction.load_predictor(str(tmp_path))
    (tmp_path / "model.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(UsageError, match="is not a TFLite model"):
        prediction.load_predictor(str(tmp_path / "model.tflite"))


# --------------------------------------------------------------------------------------
# With a trained model and real images


@pytest.mark.slow
def test_keras_predictor_matches_the_eval_pipeline(model_dir, cifar10_dir):
    """The predictor's decode + resize + normalise equals the data pipeline's, image for
    image, on real JPEGs (the model runs at 16x16, so both resize 32 -> 16)."""
    import keras

    predictor = prediction.load_predictor(str(model_dir / "best.keras"))
    splits = data.load(data.DataConfig(data_dir=str(cifar10_dir), train_limit=1, eval_limit=40))
    examples = splits.validation
    logits = predictor.model.predict(
        data.eval_dataset(examples, predictor.preprocessing, 16), verbose=0
    )
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    images = list(examples.images)  # uint8 decoded by the pipeline
    np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-5)
    assert predictor.class_names == splits.class_names


@pytest.mark.slow
def test_classify_files_answers_every_image_and_names_the_bad_one(model_dir, images_dir):
    predictor = prediction.load_predictor(str(model_dir / "best.keras"))
    names = ["plane.jpg", "notes.txt", "cat_70x50.png", "ship_gray.png", "truck_rgba.png"]
    results = prediction.classify_files(predictor, [str(images_dir / n) for n in names], k=3)
    assert [pathlib.Path(r.path).name for r in results] == names
    assert results[1].predictions is None and "notes.txt" in results[1].error
    for r in results[:1] + results[2:]:
        assert r.error is None and len(r.predictions) == 3
        probabilities = [p.probability for p in r.predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    # The training image it has fitted comes out right.
    assert results[0].predictions[0].name == "airplane"
    # The table: each readable file, then its k classes; the bad file is left to stderr.
    lines = prediction.format_results(results).splitlines()
    assert len(lines) == 4 * 4 and "notes.txt" not in "".join(lines)
    assert lines[0] == results[0].path
    assert lines[1].split() == ["1.", "airplane", f"{results[0].predictions[0].probability:.4f}"]


@pytest.mark.slow
def test_predict_cli_json_and_exit_code(model_dir, images_dir):
    files = [str(images_dir / n) for n in ("plane.jpg", "notes.txt", "ship_gray.png")]
    proc = run_program(
        "app.predict", f"--model={model_dir / 'best.keras'}", "--top_k=2", "--json", *files
    )
    assert proc.returncode == 1, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "notes.txt" in errors[0], proc.stderr
    document = json.loads(proc.stdout)
    assert document["format"] == "keras"
    results = document["results"]
    assert [r["image"] for r in results] == files
    assert "error" in results[1]
    assert [len(r["predictions"]) for r in (results[0], results[2])] == [2, 2]
    assert results[0]["predictions"][0]["name"] == "airplane"


@pytest.mark.slow
def test_predict_cli_bad_model_is_one_line(tmp_path, images_dir):
    proc = run_program(
        "app.predict", f"--model={tmp_path / 'x.keras'}", str(images_dir / "plane.jpg")
    )
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [f"error: model file not found: {tmp_path / 'x.keras'}"]
    assert "Traceback" not in proc.stderr


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


# --------------------------------------------------------------------------------------
# Exported formats


@pytest.fixture(scope="module")
def export_dir(model_dir) -> pathlib.Path:
    """What app.export writes for the test model: SavedModel + float32 and int8 .tflite."""
    from export import exporter
    from models.bundle import load_model_bundle

    directory = model_dir / "export"
    config = exporter.ExportConfig(
        export_dir=str(directory),
        formats=("saved_model", "float32", "int8"),
        data=data.DataConfig(data_dir=str(require_cifar10()), seed=0),
        num_calibration=50,
        num_evaluation=0,
    )
    exporter.export_all(load_model_bundle(str(model_dir / "best.keras")), config)
    return directory


def _agreement_files(cifar10_dir: pathlib.Path, images_dir: pathlib.Path) -> list[str]:
    """The odd forms of images_dir plus two real JPEGs of every class."""
    files = [str(images_dir / n) for n in ("cat_70x50.png", "ship_gray.png", "truck_rgba.png")]
    for folder in sorted((cifar10_dir / "train").iterdir()):
        files += [str(folder / "4990.jpg"), str(folder / "4991.jpg")]
    return files


@pytest.mark.slow
def test_formats_agree_on_top1(model_dir, export_dir, cifar10_dir, images_dir):
    files = _agreement_files(cifar10_dir, images_dir)
    keras_model = prediction.load_predictor(str(model_dir / "best.keras"))
    answers = {}
    for name, path in (
        ("keras", model_dir / "best.keras"),
        ("saved_model", export_dir / "saved_model"),
        ("float32", export_dir / "model_float32.tflite"),
        ("int8", export_dir / "model_int8.tflite"),
    ):
        predictor = keras_model if name == "keras" else prediction.load_predictor(str(path))
        assert predictor.class_names == keras_model.class_names
        images = [prediction.read_image(f) for f in files]
        answers[name] = predictor.predict(images)
    top1 = {name: probabilities.argmax(1) for name, probabilities in answers.items()}
    np.testing.assert_array_equal(top1["saved_model"], top1["keras"])
    np.testing.assert_array_equal(top1["float32"], top1["keras"])
    np.testing.assert_allclose(answers["saved_model"], answers["keras"], atol=1e-4)
    np.testing.assert_allclose(answers["float32"], answers["keras"], atol=1e-4)
    # Full-integer quantization moves probabilities; most answers must still agree.
    assert np.mean(top1["int8"] == top1["keras"]) >= 0.75, (top1["int8"], top1["keras"])


@pytest.mark.slow
def test_predict_cli_takes_the_highest_saved_model_version(export_dir, images_dir, tmp_path):
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    base = copy / "saved_model"
    shutil.copytree(base / "1", base / "7")
    (base / "v9").mkdir()  # not an integer version: ignored, as TF Serving does
    image = str(images_dir / "plane.jpg")
    proc = run_program("app.predict", f"--model={base}", "--json", "--top_k=1", image)
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["format"] == "saved_model"
    assert document["model"] == str(base / "7")
    assert len(document["results"][0]["predictions"]) == 1
