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
import os

from common.errors import UsageError
from common.files import write_text_atomic
from models.preprocessing import FILENAME as PREPROCESSING_FILE
from models.preprocessing import Preprocessing

LABELS_FILE = "labels.txt"


def write_labels(directory: str, class_names: list[str]) -> str:
    """Writes `labels.txt` (one class name per line, index order); returns its path."""
    path = os.path.join(directory, LABELS_FILE)
    write_text_atomic(path, "".join(f"{name}\n" for name in class_names))
    return path


def read_labels(directory: str) -> list[str]:
    """The class names of `directory/labels.txt`, in index order."""
    path = os.path.join(directory, LABELS_FILE)
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


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

    if not os.path.isfile(path):
        raise UsageError(f"model file not found: {path}")
    directory = os.path.dirname(os.path.abspath(path))
    for sidecar in (LABELS_FILE, PREPROCESSING_FILE):
        if not os.path.isfile(os.path.join(directory, sidecar)):
            raise UsageError(
                f"{sidecar} not found next to {path}: keep the files app.train writes "
                "together with the model"
            )
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # zip/h5/config errors all mean "not a usable .keras file"
        raise UsageError(f"{path} is not a Keras model file ({type(e).__name__}: {e})") from e
    class_names = read_labels(directory)
    outputs = model.output_shape[-1]
    if outputs != len(class_names):
        raise UsageError(
            f"{path} has {outputs} outputs but labels.txt lists {len(class_names)} classes"
        )
    return ModelBundle(model, class_names, Preprocessing.load(directory), path)
