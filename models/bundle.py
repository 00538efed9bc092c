"""A trained model with the sidecar files that give its outputs meaning.

A model directory (what `app.train` writes, and an export folder) holds the model beside
`labels.txt` (class names in index order, one per line) and `preprocessing.json`
(`models.preprocessing.Preprocessing`). Every program loads them together, here.

Example:

    from models import bundle
    b = bundle.load_model_bundle("runs/cpu_quick/best.keras")
    print(b.class_names, b.preprocessing.image_size)
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
import zlib

from common import files
from common.errors import UsageError, first_line
from models.preprocessing import FILENAME as PREPROCESSING_FILE
from models.preprocessing import Preprocessing

LABELS_FILE = "labels.txt"
# What every Keras 3 `.keras` archive holds.
KERAS_ARCHIVE_FILES = ("config.json", "model.weights.h5")


def write_labels(directory: str, class_names: list[str]) -> str:
    """Writes `labels.txt` (one class name per line, index order); returns its path."""
    path = files.join(directory, LABELS_FILE)
    files.write_text(path, "".join(f"{name}\n" for name in class_names))
    return path


def read_labels(directory: str) -> list[str]:
    """The class names of `directory/labels.txt`, in index order."""
    text = files.read_text(files.join(directory, LABELS_FILE))
    return [line for line in text.splitlines() if line.strip()]


def check_keras_archive(path: str, name: str | None = None) -> None:
    """Refuses a `.keras` file that is empty, truncated, corrupt or another program's zip,
    before Keras reads it (its own error for all of these is "File not found").

    Args:
        path: a local file (zip needs one: `common.files.local_copy`).
        name: what to call it in messages (the path the user gave); default `path`.

    Raises:
        UsageError: what is wrong with the file, and how to get a good one.
    """
    fix = "copy it again from the training run, or retrain"
    local, path = path, name or path
    size = files.size(local)
    if size == 0:
        raise UsageError(f"{path} is not a Keras model file: it is empty (0 bytes); {fix}")
    try:
        with zipfile.ZipFile(local) as archive:
            names = set(archive.namelist())
            damaged = archive.testzip()  # checks every member's CRC
            config = archive.read("config.json") if "config.json" in names else b"{}"
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise UsageError(
            f"{path} is not a Keras model file ({size} bytes, {first_line(e)}): truncated by "
            f"an interrupted copy or save, or another format; {fix}"
        ) from e
    missing = [name for name in KERAS_ARCHIVE_FILES if name not in names]
    if missing:
        raise UsageError(
            f"{path} is not a Keras model file: a zip archive without {missing[0]} (from "
            "another program?); pass the best.keras that app.train writes"
        )
    if damaged is not None:
        raise UsageError(
            f"{path} is not a Keras model file: corrupt ({damaged} inside fails its checksum); "
            f"{fix}"
        )
    try:
        json.loads(config)
    except ValueError as e:
        raise UsageError(
            f"{path} is not a Keras model file: corrupt config.json ({first_line(e)}); {fix}"
        ) from e


def check_image_model(path: str, model, preprocessing: Preprocessing, classes: int) -> None:
    """Refuses a Keras model that does not take `preprocessing`'s images or lacks a class
    per label (another program's model beside our sidecars).

    Raises:
        UsageError: naming the shape the model has and the one expected.
    """
    size = preprocessing.image_size
    shape = model.input_shape
    if not isinstance(shape, tuple) or len(shape) != 4 or shape[-1] != 3:
        raise UsageError(
            f"{path} takes input {shape}, not RGB images [batch, {size}, {size}, 3]: not an "
            "image classifier of this project; pass the best.keras that app.train writes"
        )
    if shape[1:3] not in ((size, size), (None, None)):
        raise UsageError(
            f"{path} takes {shape[1]}x{shape[2]} images but its {PREPROCESSING_FILE} says "
            f"{size}: keep the files app.train writes together"
        )
    outputs = model.output_shape
    if not isinstance(outputs, tuple) or len(outputs) != 2 or outputs[-1] != classes:
        raise UsageError(
            f"{path} outputs {outputs}, not one score per class of its {LABELS_FILE} "
            f"({classes} classes): keep the files app.train writes together"
        )


@dataclasses.dataclass
class ModelBundle:
    """A Keras model with the sidecar files that give its outputs meaning."""

    model: object  # keras.Model; typed loosely so importing this module stays cheap
    class_names: list[str]
    preprocessing: Preprocessing
    path: str


def load_model_bundle(path: str) -> ModelBundle:
    """Loads a `.keras` model plus `labels.txt` and `preprocessing.json` beside it.

    Raises:
        UsageError: the file is missing, is not a Keras model, or lacks its sidecars.
    """
    import keras

    if files.isdir(path):
        raise UsageError(
            f"{path} is a folder, not a .keras file: pass the model app.train writes, e.g. "
            "runs/cpu_quick/best.keras"
        )
    if not files.isfile(path):
        raise UsageError(f"model file not found: {path}")
    directory = files.dirname(path)
    for sidecar in (LABELS_FILE, PREPROCESSING_FILE):
        if not files.isfile(files.join(directory, sidecar)):
            raise UsageError(
                f"{sidecar} not found next to {path}: keep the files app.train writes "
                "together with the model"
            )
    with files.local_copy(path) as local:  # one download, checked, then loaded
        check_keras_archive(local, path)
        try:
            class_names = read_labels(directory)
            preprocessing = Preprocessing.load(directory)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UsageError(
                f"{LABELS_FILE} or {PREPROCESSING_FILE} next to {path} cannot be read "
                f"({type(e).__name__}: {first_line(e)}): keep the files app.train writes "
                "together"
            ) from e
        try:
            model = keras.saving.load_model(local, compile=False)
        except Exception as e:  # h5/config/layer errors all mean "not a usable .keras file"
            raise UsageError(
                f"{path} is not a Keras model this project can load ({type(e).__name__}: "
                f"{first_line(e)}); pass the best.keras that app.train writes"
            ) from e
    check_image_model(path, model, preprocessing, len(class_names))
    return ModelBundle(model, class_names, preprocessing, path)
