"""Prediction: image reading, the one resize, top-k, the predictors of every format, the CLI.

The slow tests use a small ResNet-18 (the `model_dir` fixture: 16x16 input, fitted on 200
real CIFAR-10 images) and what `python -m app.export` writes for it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from app import data, evaluate_lib, export_lib, inference, predict_lib
from common.errors import UsageError
from export import TFLITE_FORMATS
from models.bundle import read_labels
from models.preprocessing import resize
from tests.helpers import error_lines, require_cifar10, run_program

IMAGE_SIZE = 16  # the model_dir fixture's


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
# Images and top-k (pure)


def test_top_k_orders_and_caps():
    probabilities = np.array([0.1, 0.6, 0.05, 0.25])
    top = predict_lib.top_k(probabilities, ["a", "b", "c", "d"], 3)
    assert [(p.name, p.index) for p in top] == [("b", 1), ("d", 3), ("a", 0)]
    assert top[0].probability == pytest.approx(0.6)
    assert len(predict_lib.top_k(probabilities, ["a", "b", "c", "d"], 10)) == 4


def test_read_image_handles_formats_and_names_bad_files(images_dir):
    plane = predict_lib.read_image(str(images_dir / "plane.jpg"))
    assert plane.shape == (32, 32, 3) and plane.dtype == np.uint8
    assert predict_lib.read_image(str(images_dir / "cat_70x50.png")).shape == (50, 70, 3)
    gray = predict_lib.read_image(str(images_dir / "ship_gray.png"))
    assert gray.shape == (32, 32, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    rgba = predict_lib.read_image(str(images_dir / "truck_rgba.png"))
    expected = np.asarray(Image.open(images_dir / "truck_rgba.png").convert("RGBA"))[..., :3]
    np.testing.assert_array_equal(rgba, expected)  # alpha dropped, colours kept
    with pytest.raises(predict_lib.ImageError, match=r"notes\.txt: not a readable image"):
        predict_lib.read_image(str(images_dir / "notes.txt"))
    with pytest.raises(predict_lib.ImageError, match=r"missing\.jpg: no such file"):
        predict_lib.read_image(str(images_dir / "missing.jpg"))


def test_resize_is_tf_bilinear_and_exact_at_the_models_size(images_dir):
    """`models.preprocessing.resize`, which prediction, training and the exported graphs
    share, is `tf.image.resize` bilinear on float pixels (no antialiasing)."""
    image = predict_lib.read_image(str(images_dir / "cat_70x50.png"))
    resized = keras.ops.convert_to_numpy(resize(image, IMAGE_SIZE))
    assert resized.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and resized.dtype == np.float32
    expected = tf.image.resize(tf.cast(image, tf.float32), (IMAGE_SIZE, IMAGE_SIZE), "bilinear")
    np.testing.assert_array_equal(resized, expected.numpy())
    batch = np.stack([image, image[::-1]])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(resize(batch, IMAGE_SIZE)),
        tf.image.resize(tf.cast(batch, tf.float32), (IMAGE_SIZE, IMAGE_SIZE)).numpy(),
    )
    native = predict_lib.read_image(str(images_dir / "plane.jpg"))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(resize(native, 32)), native.astype(np.float32)
    )


def test_load_predictor_rejects_unknown_paths(tmp_path):
    with pytest.raises(UsageError, match="model not found"):
        inference.load_predictor(str(tmp_path / "nothing.h5"))
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(UsageError, match=r"must be a \.keras file, a SavedModel folder"):
        inference.load_predictor(str(tmp_path / "weights.h5"))
    with pytest.raises(UsageError, match="no SavedModel in"):
        inference.load_predictor(str(tmp_path))
    (tmp_path / "model.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(UsageError, match="is not a TFLite model"):
        inference.load_predictor(str(tmp_path / "model.tflite"))


# --------------------------------------------------------------------------------------
# With a trained model and real images


@pytest.mark.slow
def test_keras_predictor_matches_the_eval_pipeline(model_dir, cifar10_dir):
    """The predictor's decode + resize + normalise equals the data pipeline's, image for
    image, on real JPEGs (the model runs at 16x16, so both resize 32 -> 16)."""
    predictor = inference.load_predictor(str(model_dir / "best.keras"))
    splits = data.load(data.DataConfig(data_dir=str(cifar10_dir), train_limit=1, eval_limit=40))
    examples = splits.validation
    logits = predictor.model.predict(
        data.eval_dataset(examples, predictor.preprocessing, 16), verbose=0
    )
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    images = list(examples.images)  # uint8 decoded by the pipeline
    np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-5)
    assert predictor.class_names == splits.class_names


def _model_answer(model_dir: pathlib.Path, image_file: pathlib.Path) -> tuple[str, float]:
    """The model's top class and probability for an image file, computed without app.predict's
    code: Pillow decodes, tf.image.resize resizes, the bundle normalises."""
    from models.bundle import load_model_bundle

    bundle = load_model_bundle(str(model_dir / "best.keras"))
    size = bundle.preprocessing.image_size
    pixels = np.asarray(Image.open(image_file).convert("RGB"), np.float32)[None]
    logits = bundle.model(bundle.preprocessing(tf.image.resize(pixels, (size, size)).numpy()))
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits))[0]
    return bundle.class_names[int(probabilities.argmax())], float(probabilities.max())


@pytest.mark.slow
def test_classify_files_answers_every_image_and_names_the_bad_one(model_dir, images_dir):
    predictor = inference.load_predictor(str(model_dir / "best.keras"))
    names = ["plane.jpg", "notes.txt", "cat_70x50.png", "ship_gray.png", "truck_rgba.png"]
    results = predict_lib.classify_files(predictor, [str(images_dir / n) for n in names], k=3)
    assert [pathlib.Path(r.path).name for r in results] == names
    assert results[1].predictions is None and "notes.txt" in results[1].error
    for r in results[:1] + results[2:]:
        assert r.error is None and len(r.predictions) == 3
        probabilities = [p.probability for p in r.predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    # The model's own answer, computed independently.
    name, probability = _model_answer(model_dir, images_dir / "plane.jpg")
    assert results[0].predictions[0].name == name
    assert results[0].predictions[0].probability == pytest.approx(probability, abs=0.02)
    # The table: each readable file, then its k classes; the bad file is left to stderr.
    lines = predict_lib.format_results(results).splitlines()
    assert len(lines) == 4 * 4 and "notes.txt" not in "".join(lines)
    assert lines[0] == results[0].path
    assert lines[1].split() == ["1.", name, f"{results[0].predictions[0].probability:.4f}"]


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
    assert (
        results[0]["predictions"][0]["name"]
        == _model_answer(model_dir, images_dir / "plane.jpg")[0]
    )


@pytest.mark.slow
def test_predict_cli_bad_model_is_one_line(tmp_path, images_dir):
    proc = run_program(
        "app.predict", f"--model={tmp_path / 'x.keras'}", str(images_dir / "plane.jpg")
    )
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [f"error: model file not found: {tmp_path / 'x.keras'}"]
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------
# Exported formats


@pytest.fixture(scope="module")
def export_dir(model_dir) -> pathlib.Path:
    """What app.export writes for the test model: every format."""
    directory = model_dir / "export"
    job = export_lib.ExportJob(
        model=str(model_dir / "best.keras"),
        export_dir=str(directory),
        data=data.DataConfig(data_dir=str(require_cifar10()), seed=0),
        num_calibration=50,
        num_evaluation=0,
    )
    export_lib.export_model(job)
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
    keras_model = inference.load_predictor(str(model_dir / "best.keras"))
    answers = {}
    for name, path in (
        ("keras", model_dir / "best.keras"),
        ("saved_model", export_dir / "saved_model"),
        ("float32", export_dir / "model_float32.tflite"),
        ("int8", export_dir / "model_int8.tflite"),
    ):
        predictor = keras_model if name == "keras" else inference.load_predictor(str(path))
        assert predictor.class_names == keras_model.class_names
        images = [predict_lib.read_image(f) for f in files]
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


@pytest.mark.slow
def test_evaluate_takes_every_exported_format(model_dir, export_dir, cifar10_dir, tmp_path):
    """app.evaluate on each of the six exported formats scores that format's own answers,
    image for image, with the class names from the export; the float formats score what
    Keras scores (ONNX Runtime within a near tie)."""
    from export import FORMATS, tflite
    from export.onnx import FILENAME as ONNX_FILE

    config = data.DataConfig(data_dir=str(cifar10_dir), eval_limit=60, seed=0)
    validation = data.load(dataclasses.replace(config, train_limit=1)).validation
    paths = {"keras": model_dir / "best.keras", "saved_model": export_dir / "saved_model"}
    paths |= {fmt: export_dir / tflite.filename(fmt) for fmt in TFLITE_FORMATS}
    paths["onnx"] = export_dir / ONNX_FILE
    assert set(paths) == {"keras", *FORMATS}
    results = {}
    for name, path in paths.items():
        run = evaluate_lib.EvalConfig(
            str(path), config, "validation", output_dir=str(tmp_path), verbose=0
        )
        results[name], written = evaluate_lib.evaluate(run)
        tag = "" if name == "keras" else f"_{name}"
        assert written["json"] == str(tmp_path / f"eval_validation{tag}.json")
        assert json.loads(pathlib.Path(written["json"]).read_text())["format"] == name
        assert results[name].class_names == results["keras"].class_names
        # Its own answers, computed here from the predictor on the stored images.
        answers = inference.load_predictor(str(path)).predict(list(validation.images)).argmax(1)
        own = np.zeros_like(results[name].confusion)
        np.add.at(own, (validation.labels, answers), 1)
        np.testing.assert_array_equal(results[name].confusion, own, err_msg=name)
    keras_result = results["keras"]
    for name in ("saved_model", "float32"):  # TensorFlow's and LiteRT's float kernels
        np.testing.assert_array_equal(results[name].confusion, keras_result.confusion, name)
        assert results[name].loss == pytest.approx(keras_result.loss, abs=1e-4), name
    # ONNX Runtime's kernels round differently: a near tie of this weak model may flip.
    differ = np.abs(results["onnx"].confusion - keras_result.confusion).sum() / 2
    assert differ <= 2 and results["onnx"].loss == pytest.approx(keras_result.loss, rel=2e-3)


@pytest.mark.slow
def test_evaluate_cli_on_the_int8_model_reads_the_training_runs_data(export_dir, cifar10_dir):
    """No data flags: report.json names the model the export came from, whose flags.txt
    names the data; the metrics are those of the int8 model's own answers; the results go
    into the export folder, named after the format."""
    proc = run_program(
        "app.evaluate",
        f"--model={export_dir / 'model_int8.tflite'}",
        "--eval_limit=30",
        "--verbose=0",
    )
    assert proc.returncode == 0, proc.stderr
    document = json.loads((export_dir / "eval_validation_int8.json").read_text())
    assert document["num_examples"] == 30 and document["format"] == "int8"
    assert document["data_config"]["data_dir"] == str(cifar10_dir)
    assert f"top-1 accuracy  {document['top1_accuracy']:.4f}" in proc.stdout
    assert (export_dir / "confusion_validation_int8.png").is_file()
    splits = data.load(data.DataConfig(data_dir=str(cifar10_dir), train_limit=1, eval_limit=30))
    predictor = inference.load_predictor(str(export_dir / "model_int8.tflite"))
    answers = predictor.predict(list(splits.validation.images)).argmax(1)
    assert document["top1_accuracy"] == pytest.approx(np.mean(answers == splits.validation.labels))


@pytest.mark.slow
def test_a_tflite_copied_alone_names_classes_from_its_metadata(export_dir, tmp_path):
    """A phone app ships the .tflite alone: the class names travel inside it."""
    import shutil

    alone = tmp_path / "model_int8.tflite"
    shutil.copy(export_dir / "model_int8.tflite", alone)
    predictor = inference.load_predictor(str(alone))
    assert predictor.class_names == read_labels(str(export_dir))
