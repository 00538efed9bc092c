"""Loaded models that map images to class scores, one class per format.

`load_predictor` picks the class from the path: a `.keras` file (labels.txt and
preprocessing.json beside it), a SavedModel (base path or version folder), a `.tflite` or a
`.onnx` file. Two uses:

- `predict`: uint8 RGB images of any size -> probabilities (what `app.predict` answers). Every
  format resizes with `models.preprocessing.resize`, the one resize of the project.
- the evaluation loop (`app.evaluate_lib.run_over`): `batches` streams a split in the input
  form the format takes, `scores` scores one batch, `mirror` flips it for test-time
  augmentation, `figure_image` gives back an example's pixels for the prediction picture. A
  Keras model is fed by the `tf.data` pipeline (`app.data.eval_dataset`, normalised in the
  pipeline) and scores logits; the exported formats take the images as stored and return
  probabilities, as a server or a phone would.

Example:

    from app import inference
    predictor = inference.load_predictor("runs/cpu_quick/export/model_int8.tflite")
    probabilities = predictor.predict([image])   # [1, classes]
    print(predictor.class_names[probabilities[0].argmax()])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from app import data
from common import files
from common.errors import UsageError
from models.bundle import LABELS_FILE, ModelBundle, load_model_bundle, read_labels
from models.preprocessing import FILENAME as PREPROCESSING_FILE
from models.preprocessing import Preprocessing, resize

KERAS_SUFFIX = ".keras"
TFLITE_SUFFIX = ".tflite"
ONNX_SUFFIX = ".onnx"
# Images per model call: bounds memory for long file lists.
BATCH = 64
# The prediction picture's image size for a model that does not state its input size.
DISPLAY_SIZE = 64


def _resized(images: Sequence[np.ndarray], image_size: int) -> np.ndarray:
    """uint8 `[h, w, 3]` images of any sizes -> float32 `[n, S, S, 3]` pixels 0..255."""
    import keras

    return np.stack([keras.ops.convert_to_numpy(resize(im, image_size)) for im in images])


class Predictor:
    """A loaded model that maps decoded images to class probabilities.

    Attributes:
        kind: "keras", "saved_model", "tflite" or "onnx".
        name: the format, for file names: "keras", "saved_model", or the `.tflite` variant
            ("int8" for `model_int8.tflite`).
        path: the model file or SavedModel version folder loaded.
        folder: where the model's sidecars are (its model or export folder).
        class_names: names by class index.
        image_size: the model's square input size, or None when the model does not say.
    """

    kind: str = ""
    name: str = ""
    path: str = ""
    folder: str = ""
    class_names: list[str]
    image_size: int | None = None

    # What `scores` returns: probabilities, or logits (a Keras model's head).
    scores_are_logits: bool = False

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB images `[h, w, 3]` of any sizes -> float32 probabilities `[n, classes]`."""
        raise NotImplementedError

    def batches(self, examples: data.Examples, batch_size: int) -> Iterator[tuple[Any, np.ndarray]]:
        """The split in order, a batch at a time, as (inputs `scores` takes, int labels):
        here the images as stored (decoded a batch at a time)."""
        return data.stored_batches(examples, batch_size)

    def scores(self, inputs: Any) -> np.ndarray:
        """float32 `[n, classes]` scores of one batch of `batches`' inputs."""
        return self.predict(inputs)

    def mirror(self, inputs: Any) -> Any:
        """The batch's images mirrored left to right (test-time augmentation)."""
        return [image[:, ::-1] for image in inputs]

    def figure_image(self, inputs: Any, index: int) -> np.ndarray:
        """Float 0..255 RGB pixels of image `index` of the batch, at the model's input size
        (`DISPLAY_SIZE` when the model does not say), for the prediction picture."""
        import keras

        return keras.ops.convert_to_numpy(resize(inputs[index], self.image_size or DISPLAY_SIZE))


class KerasPredictor(Predictor):
    """A `.keras` model (logits head) with its `labels.txt` and `preprocessing.json`.

    Evaluated over the `tf.data` pipeline: batches of normalised images, logits out.
    """

    kind = name = "keras"
    scores_are_logits = True

    def __init__(self, bundle: ModelBundle):
        self.path = bundle.path
        self.folder = files.dirname(bundle.path)
        self.model = bundle.model
        self.class_names = bundle.class_names
        self.preprocessing = bundle.preprocessing
        self.image_size = bundle.preprocessing.image_size

    def batches(self, examples: data.Examples, batch_size: int) -> Iterator[tuple[Any, np.ndarray]]:
        return iter(data.eval_dataset(examples, self.preprocessing, batch_size))

    def scores(self, inputs: Any) -> np.ndarray:
        # predict_on_batch runs the compiled predict function (no per-batch retracing).
        return np.asarray(self.model.predict_on_batch(inputs), np.float32)

    def mirror(self, inputs: Any) -> Any:
        return inputs[:, :, ::-1]

    def figure_image(self, inputs: Any, index: int) -> np.ndarray:
        return self.preprocessing.invert(np.asarray(inputs[index]))

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import keras

        size = self.preprocessing.image_size
        out = []
        for start in range(0, len(images), BATCH):
            pixels = _resized(images[start : start + BATCH], size)
            logits = self.model.predict_on_batch(self.preprocessing(pixels).astype(np.float32))
            out.append(keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1)))
        if not out:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(out).astype(np.float32)


def find_labels(model_dir: str, levels: int = 2) -> str:
    """`labels.txt` in `model_dir` or up to `levels` folders above it.

    An export folder holds `saved_model/<N>/` with `labels.txt` two levels up.

    Raises:
        UsageError: not found.
    """
    directory = files.resolve(model_dir)
    searched = []
    for _ in range(levels + 1):
        searched.append(directory)
        if files.isfile(files.join(directory, LABELS_FILE)):
            return directory
        directory = files.dirname(directory)
    raise UsageError(
        f"{LABELS_FILE} not found in {' or '.join(searched)}: keep the files app.export "
        "writes together"
    )


def export_folder(path: str) -> str:
    """The export folder of an exported model: the `.tflite` file's folder, or the folder
    holding a SavedModel's base path (`<export_dir>/saved_model/<N>/`); `path`'s own folder
    when it is laid out otherwise."""
    path = files.resolve(path).rstrip("/")
    if files.isfile(path):
        return files.dirname(path)
    if files.isfile(files.join(path, "saved_model.pb")):  # a version folder
        path = files.dirname(path)
    candidate = files.dirname(path)
    if files.isfile(files.join(candidate, LABELS_FILE)):
        return candidate
    return path if files.isfile(files.join(path, LABELS_FILE)) else candidate


class SavedModelPredictor(Predictor):
    """A SavedModel's `serving_default` signature: uint8 images in, resized inside the graph
    (`export.saved_model.load_serving`). Labels and image size from the version's
    `assets.extra/`; for older exports, `labels.txt` and `preprocessing.json` beside it or up
    to two folders above (`export/labels.txt` for `export/saved_model/<N>/`)."""

    kind = name = "saved_model"

    def __init__(self, path: str):
        from export import saved_model

        self.serving = saved_model.load_serving(path)
        self.path = self.serving.path
        self.folder = export_folder(self.path)
        self.class_names = self.serving.class_names
        preprocessing = self.serving.preprocessing
        if self.class_names is None:
            labels_dir = find_labels(self.path)
            self.class_names = read_labels(labels_dir)
            if files.isfile(files.join(labels_dir, PREPROCESSING_FILE)):
                preprocessing = Preprocessing.load(labels_dir)
        self.image_size = preprocessing.image_size if preprocessing else None
        self._checked = False

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        start = 0
        # Runs of images of one size go in one call (a batch shares one size).
        while start < len(images):
            stop = start + 1
            shape = np.shape(images[start])
            while stop < len(images) and stop - start < BATCH and np.shape(images[stop]) == shape:
                stop += 1
            batch = np.stack([np.asarray(im, np.uint8) for im in images[start:stop]])
            result = self.serving.predict(batch)
            if not self._checked:
                self._check_labels(result)
            out.append(result["probabilities"])
            start = stop
        if not out:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(out).astype(np.float32)

    def _check_labels(self, result: dict) -> None:
        """The labels found must agree with the names inside the model."""
        probabilities = result["probabilities"][0]
        if len(probabilities) != len(self.class_names):
            raise UsageError(
                f"{self.path} has {len(probabilities)} classes but {LABELS_FILE} lists "
                f"{len(self.class_names)}"
            )
        inside = result["class_names"][0].decode()
        if inside != self.class_names[int(np.argmax(probabilities))]:
            raise UsageError(
                f"{LABELS_FILE} next to {self.path} does not match the class names inside the "
                f"model (it answers {inside!r}); keep the files app.export writes together"
            )
        self._checked = True


def _tflite_labels(path: str, folder: str) -> list[str]:
    """The class names inside a `.tflite` (its metadata's labels file), else `labels.txt`
    beside it (an export from before the metadata)."""
    from export import metadata

    try:
        return metadata.read_metadata(path).labels
    except UsageError:
        return read_labels(find_labels(folder, 0))


class TFLitePredictor(Predictor):
    """A `.tflite` model run by `export.tflite.TFLiteClassifier`: `[1, S, S, 3]` RGB pixels
    0..255 in, probabilities out; class names from its metadata (`labels.txt` beside it for
    older exports).

    Float models get the resized pixels as exact floats (rounding them to uint8 would put a
    float model up to half a grey level off what Keras sees, which can flip a close top-1);
    only the int8 model gets them rounded, to its uint8 input.
    """

    kind = "tflite"

    def __init__(self, path: str):
        from export.tflite import TFLiteClassifier

        if not files.isfile(path):
            raise UsageError(f"model file not found: {path}")
        self.path = path
        self.folder = export_folder(path)
        self.name = files.basename(path).removesuffix(TFLITE_SUFFIX).removeprefix("model_")
        try:
            self.classifier = TFLiteClassifier(path)
        except UsageError as e:  # empty, truncated, not a flatbuffer, another input shape
            raise UsageError(f"{e}; copy it again, or export it again with app.export") from e
        self.image_size = self.classifier.image_size
        self.class_names = _tflite_labels(path, self.folder)
        classes = self.classifier.num_classes
        if classes != len(self.class_names):
            raise UsageError(
                f"{path} has {classes} outputs but {LABELS_FILE} lists {len(self.class_names)}"
            )

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, len(self.class_names)), np.float32)
        return self.classifier.predict(_resized(images, self.image_size))


class ONNXPredictor(Predictor):
    """`model.onnx` run by `export.onnx.ONNXClassifier` (ONNX Runtime): uint8 pixels resized
    to its size, as the export's report feeds it; `labels.txt` beside it."""

    kind = name = "onnx"

    def __init__(self, path: str):
        from export.onnx import ONNXClassifier

        self.path, self.folder = path, export_folder(path)
        self.classifier = ONNXClassifier(path)
        self.image_size = self.classifier.image_size
        self.class_names = read_labels(find_labels(self.folder, 0))
        if self.classifier.num_classes != len(self.class_names):
            raise UsageError(
                f"{path} has {self.classifier.num_classes} outputs but {LABELS_FILE} lists "
                f"{len(self.class_names)}"
            )

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from export.model_input import to_model_input

        if not len(images):
            return np.zeros((0, len(self.class_names)), np.float32)
        return self.classifier.predict(to_model_input(list(images), self.image_size))


def load_predictor(path: str) -> Predictor:
    """Loads a `.keras` file, a SavedModel (version folder or base path), a `.tflite` or
    an `.onnx` file.

    Raises:
        UsageError: the path is missing, of no known format, broken, or lacks its labels.
    """
    if path.endswith(KERAS_SUFFIX):
        return KerasPredictor(load_model_bundle(path))
    if path.endswith(TFLITE_SUFFIX):
        return TFLitePredictor(path)
    if path.endswith(ONNX_SUFFIX):
        return ONNXPredictor(path)
    if files.isdir(path):
        return SavedModelPredictor(path)
    if not files.exists(path):
        raise UsageError(f"model not found: {path}")
    raise UsageError(
        f"{path}: --model must be a .keras file, a SavedModel folder (the export's "
        "saved_model/ or one of its version folders), a .tflite or a .onnx file"
    )
