"""Helpers shared by the programs: atomic writes and loading a model with its sidecars."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator

from models.preprocessing import FILENAME as PREPROCESSING_FILE
from models.preprocessing import Preprocessing

LABELS_FILE = "labels.txt"


class UsageError(ValueError):
    """A bad flag value or missing input file: reported as one line, exit code 2."""


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path beside `path`; moves it into place only on success.

    A crash or an exception never leaves a half-written `path` behind.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide outputs from e.g. a TF Serving user
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_labels(directory: str, class_names: list[str]) -> str:
    """Writes `labels.txt` (one class name per line, index order); returns its path."""
    path = os.path.join(directory, LABELS_FILE)
    write_text_atomic(path, "".join(f"{name}\n" for name in class_names))
    return path


def read_labels(directory: str) -> list[str]:
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
