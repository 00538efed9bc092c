"""Broken model files given to predict, evaluate, export and `app.train --pretrained`: one
clear line each (what, where, how to fix), an error type the programs report without a
traceback (exit code 2), and nothing written.

The broken files are made here from a tiny conv net exported once per module (SavedModel and
float32 .tflite): emptied, truncated, bit-flipped, a zip of something else, another
program's Keras model or SavedModel, a SavedModel without its variables.
"""

from __future__ import annotations

import io
import shutil
import zipfile

import keras
import pytest

from app import cli, data, evaluate_lib, export_lib, inference
from export import all_formats
from models import preprocessing, weights
from models.bundle import load_model_bundle
from tests.helpers import error_lines, run_train, save_bundle, tiny_model, write_folder

CLASSES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A model directory and its export (SavedModel + float32 .tflite)."""
    root = tmp_path_factory.mktemp("good")
    path = save_bundle(root / "model", tiny_model(size=16), preprocessing.cifar(16), CLASSES)
    config = all_formats.ExportConfig(str(root / "export"), formats=("saved_model", "float32"))
    all_formats.export_all(load_model_bundle(path), config)
    return root


def _zip(**members: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def _flip_inside(blob: bytes, member: str) -> bytes:
    """`blob` with one byte of `member`'s stored data inverted (the zip structure intact)."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        info = archive.getinfo(member)
    # The local header: 30 bytes + name + extra, then the data.
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    broken = bytearray(blob)
    broken[start + info.compress_size // 2] ^= 0xFF
    return bytes(broken)


def _other_keras_model(path) -> None:
    inputs = keras.Input((10,))
    keras.Model(inputs, keras.layers.Dense(10)(inputs)).save(path)


# name -> (makes the broken best.keras beside good sidecars, expected message)
KERAS_CASES = {
    "empty": (lambda good, path: path.write_bytes(b""), "empty (0 bytes)"),
    "truncated": (
        lambda good, path: path.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
        "truncated by an interrupted copy",
    ),
    "corrupt": (
        lambda good, path: path.write_bytes(_flip_inside(good.read_bytes(), "model.weights.h5")),
        "not a Keras model file",
    ),
    "other zip": (
        lambda good, path: path.write_bytes(_zip(**{"readme.txt": "hello"})),
        "a zip archive without config.json",
    ),
    "bad config": (
        lambda good, path: path.write_bytes(_zip(**{"config.json": "{", "model.weights.h5": ""})),
        "corrupt config.json",
    ),
    "other program's model": (lambda good, path: _other_keras_model(path), "takes input"),
    "more classes than labels": (
        lambda good, path: tiny_model(num_classes=12, size=16).save(path),
        "not one score per class",
    ),
}
# Cases that are not a readable .keras file at all (--pretrained reads only the weights).
UNREADABLE = ("empty", "truncated", "corrupt", "other zip", "bad config")


def _user_error(call, *where: str) -> str:
    """Runs `call`; returns the one-line message of the user error it raises."""
    with pytest.raises(cli.user_errors()) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message
    for text in where:
        assert text in message, message
    return message


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_broken_keras_file(good, tmp_path, case):
    make, expected = KERAS_CASES[case]
    folder = tmp_path / "run"
    shutil.copytree(good / "model", folder)
    path = folder / "best.keras"
    path.unlink()
    make(good / "model" / "best.keras", path)
    out = tmp_path / "out"
    before = sorted(p.name for p in folder.iterdir())

    _user_error(lambda: inference.load_predictor(str(path)), str(path), expected)
    job = export_lib.ExportJob(str(path), str(out), formats=("saved_model",))
    _user_error(lambda: export_lib.export_model(job), str(path), expected)
    run = evaluate_lib.EvalConfig(str(path), data.DataConfig(data_dir=str(tmp_path / "none")))
    _user_error(lambda: evaluate_lib.evaluate(run), str(path), expected)
    if case in UNREADABLE:
        _user_error(lambda: weights.read_layer_weights(str(path)), str(path), expected)
    assert not out.exists()
    assert sorted(p.name for p in folder.iterdir()) == before


def test_keras_file_from_another_program_without_our_sidecars(good, tmp_path):
    path = tmp_path / "model.keras"
    shutil.copy(good / "model" / "best.keras", path)
    _user_error(lambda: inference.load_predictor(str(path)), "labels.txt not found next to")
    _user_error(lambda: load_model_bundle(str(tmp_path)), "is a folder, not a .keras file")


def _break_saved_model(version, case: str) -> str:
    if case == "no variables":
        shutil.rmtree(version / "variables")
        return "has no variables/ folder"
    if case == "truncated variables":
        for file in (version / "variables").iterdir():
            file.write_bytes(file.read_bytes()[:10])
        return "is not a loadable SavedModel"
    if case == "corrupt saved_model.pb":
        (version / "saved_model.pb").write_bytes(b"garbage")
        return "is not a loadable SavedModel"
    raise ValueError(case)


@pytest.mark.parametrize(
    "case", ["no variables", "truncated variables", "corrupt saved_model.pb", "other program's"]
)
def test_broken_saved_model(good, tmp_path, case):
    export_dir = tmp_path / "export"
    shutil.copytree(good / "export", export_dir)
    base = export_dir / "saved_model"
    if case == "other program's":
        shutil.rmtree(base / "1")
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.export(str(base / "1"), verbose=False)
        expected = "signature serving_default takes"
    else:
        expected = _break_saved_model(base / "1", case)
    before = sorted(p.name for p in export_dir.iterdir())
    message = _user_error(lambda: inference.load_predictor(str(base)), str(base / "1"), expected)
    assert "app.export" in message  # how to fix
    run = evaluate_lib.EvalConfig(str(base), data.DataConfig(data_dir=str(tmp_path / "none")))
    _user_error(lambda: evaluate_lib.evaluate(run), expected)
    assert sorted(p.name for p in export_dir.iterdir()) == before
    _user_error(lambda: inference.load_predictor(str(export_dir)), "did you mean")


@pytest.mark.parametrize("case", ["empty", "truncated", "random bytes"])
def test_broken_tflite(good, tmp_path, case):
    export_dir = tmp_path / "export"
    shutil.copytree(good / "export", export_dir)
    path = export_dir / "model_float32.tflite"
    blob = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": blob[:-200], "random bytes": b"\x17" * 999}[case])
    before = sorted(p.name for p in export_dir.iterdir())
    message = _user_error(lambda: inference.load_predictor(str(path)), str(path), "is not a TFLite")
    assert "export it again with app.export" in message
    run = evaluate_lib.EvalConfig(str(path), data.DataConfig(data_dir=str(tmp_path / "none")))
    _user_error(lambda: evaluate_lib.evaluate(run), "is not a TFLite model")
    assert sorted(p.name for p in export_dir.iterdir()) == before


def test_unknown_model_format_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\x08\x07")
    _user_error(lambda: inference.load_predictor(str(path)), "--model must be a .keras file")


def test_pretrained_with_a_corrupt_preprocessing_json(tmp_path):
    from app.training import config

    (tmp_path / "best.keras").write_bytes(b"")
    (tmp_path / preprocessing.FILENAME).write_text('{"name": "cifar", "mean": [0.5')
    _user_error(
        lambda: config.resolve_normalization("auto", str(tmp_path / "best.keras")),
        str(tmp_path / preprocessing.FILENAME),
        "JSONDecodeError",
    )


@pytest.mark.slow
def test_train_with_a_truncated_pretrained_file_writes_nothing(good, tmp_path):
    broken = tmp_path / "old" / "best.keras"
    broken.parent.mkdir()
    blob = (good / "model" / "best.keras").read_bytes()
    broken.write_bytes(blob[: len(blob) // 3])
    write_folder(tmp_path / "images", per_class=4, size=16)
    model_dir = tmp_path / "run"
    result = run_train(
        model_dir,
        "--model=resnet18",
        "--stem=cifar",
        "--image_size=16",
        "--epochs=1",
        "--batch_size=4",
        "--normalization=cifar",
        f"--data_dir={tmp_path / 'images'}",
        f"--pretrained={broken}",
        "--verbose=0",
        timeout=180,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and str(broken) in errors[0], result.stderr
    assert "truncated by an interrupted copy" in errors[0]
    assert "Traceback" not in result.stderr
    # (A lock file the run may take is removed again: no file is left.)
    assert not model_dir.exists() or not any(model_dir.rglob("*"))
