"""Top-k classification of image files with a Keras, SavedModel or TFLite model.

The three formats share one image path: decode (JPEG/PNG/GIF/BMP/WebP, grayscale and RGBA
to RGB), then resize float pixels to the model's image size with `models.preprocessing.resize`,
the one resize the data pipeline and the exported graphs use, so they agree on the top-1 class.
`predict_files` is what `python -m app.predict` runs.

Example:

    from app import prediction
    predictor = prediction.load_predictor("runs/cpu_quick/best.keras")
    image = prediction.read_image("cat.jpg")
    print(prediction.top_k(predictor.predict([image])[0], predictor.class_names, k=3))

    prediction.predict_files("runs/cpu_quick/export/model_int8.tflite", ["cat.jpg"], k=3)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from common.errors import UsageError, first_line
from common.images import MAX_PIXELS
from models.bundle import LABELS_FILE, load_model_bundle, read_labels
from models.preprocessing import FILENAME as PREPROCESSING_FILE
from models.preprocessing import Preprocessing, resize

KERAS_SUFFIX = ".keras"
TFLITE_SUFFIX = ".tflite"
ONNX_SUFFIX = ".onnx"
# Images per Keras call: bounds memory for long file lists.
KERAS_BATCH = 64


class ImageError(ValueError):
    """An input file that cannot be read as an image; names the file."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One class of a top-k answer."""

    index: int
    name: str
    probability: float


def read_image(path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decodes an image file to uint8 RGB `[h, w, 3]`.

    JPEG, PNG, GIF (first frame), BMP and WebP; grayscale is repeated to three channels and
    an alpha channel is dropped, as the SavedModel's `serving_bytes` signature does. An
    image over `max_pixels` is refused from its header, before decoding.

    Raises:
        ImageError: the file is missing, is not a decodable image or is too large.
    """
    import tensorflow as tf

    from export import graph

    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = graph.decode_image(data, max_pixels)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
        raise ImageError(f"{path}: not a readable image ({first_line(e)})") from e
    return image.numpy()


def _resized(images: Sequence[np.ndarray], image_size: int) -> np.ndarray:
    """uint8 `[h, w, 3]` images of any sizes -> float32 `[n, S, S, 3]` pixels 0..255."""
    import keras

    return np.stack([keras.ops.convert_to_numpy(resize(im, image_size)) for im in images])


def top_k(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[Prediction]:
    """The `k` most probable classes, most probable first (ties: lower index first)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-probabilities, kind="stable")[: max(1, min(k, len(probabilities)))]
    return [Prediction(int(i), class_names[int(i)], float(probabilities[i])) for i in order]


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

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB images `[h, w, 3]` of any sizes -> float32 probabilities `[n, classes]`."""
        raise NotImplementedError


class KerasPredictor(Predictor):
    """A `.keras` model (logits head) with its `labels.txt` and `preprocessing.json`."""

    kind = name = "keras"

    def __init__(self, path: str):
        bundle = load_model_bundle(path)
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.model = bundle.model
        self.class_names = bundle.class_names
        self.preprocessing = bundle.preprocessing
        self.image_size = bundle.preprocessing.image_size

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import keras

        size = self.preprocessing.image_size
        out = []
        for start in range(0, len(images), KERAS_BATCH):
            pixels = _resized(images[start : start + KERAS_BATCH], size)
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
    directory = os.path.abspath(model_dir)
    searched = []
    for _ in range(levels + 1):
        searched.append(directory)
        if os.path.isfile(os.path.join(directory, LABELS_FILE)):
            return directory
        directory = os.path.dirname(directory)
    raise UsageError(
        f"{LABELS_FILE} not found in {' or '.join(searched)}: keep the files app.export "
        "writes together"
    )


def export_folder(path: str) -> str:
    """The export folder of an exported model: the `.tflite` file's folder, or the folder
    holding a SavedModel's base path (`<export_dir>/saved_model/<N>/`); `path`'s own folder
    when it is laid out otherwise."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return os.path.dirname(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):  # a version folder
        path = os.path.dirname(path)
    candidate = os.path.dirname(path)
    if os.path.isfile(os.path.join(candidate, LABELS_FILE)):
        return candidate
    return path if os.path.isfile(os.path.join(path, LABELS_FILE)) else candidate


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
            if os.path.isfile(os.path.join(labels_dir, PREPROCESSING_FILE)):
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
            while (
                stop < len(images)
                and stop - start < KERAS_BATCH
                and np.shape(images[stop]) == shape
            ):
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


class TFLitePredictor(Predictor):
    """A `.tflite` model run by `export.tflite.TFLiteClassifier`: `[1, S, S, 3]` RGB pixels
    0..255 in, probabilities out; `labels.txt` beside it.

    Float models get the resized pixels as exact floats (rounding them to uint8 would put a
    float model up to half a grey level off what Keras sees, which can flip a close top-1);
    only the int8 model gets them rounded, to its uint8 input.
    """

    kind = "tflite"

    def __init__(self, path: str):
        from export.tflite import TFLiteClassifier

        if not os.path.isfile(path):
            raise UsageError(f"model file not found: {path}")
        self.path = path
        self.folder = export_folder(path)
        self.name = os.path.basename(path).removesuffix(TFLITE_SUFFIX).removeprefix("model_")
        try:
            self.classifier = TFLiteClassifier(path)
        except UsageError as e:  # empty, truncated, not a flatbuffer, another input shape
            raise UsageError(f"{e}; copy it again, or export it again with app.export") from e
        self.image_size = self.classifier.image_size
        self.class_names = read_labels(find_labels(self.folder, 0))
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
        from export.images import to_model_input

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
        return KerasPredictor(path)
    if path.endswith(TFLITE_SUFFIX):
        return TFLitePredictor(path)
    if path.endswith(ONNX_SUFFIX):
        return ONNXPredictor(path)
    if os.path.isdir(path):
        return SavedModelPredictor(path)
    if not os.path.exists(path):
        raise UsageError(f"model not found: {path}")
    raise UsageError(
        f"{path}: --model must be a .keras file, a SavedModel folder (the export's "
        "saved_model/ or one of its version folders), a .tflite or a .onnx file"
    )


@dataclasses.dataclass(frozen=True)
class ImageResult:
    """The answer for one image file: predictions, or the error that stopped it."""

    path: str
    predictions: list[Prediction] | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"image": self.path, "error": self.error}
        return {
            "image": self.path,
            "predictions": [dataclasses.asdict(p) for p in self.predictions],
        }


def classify_files(
    predictor: Predictor, paths: Sequence[str], k: int, max_pixels: int = MAX_PIXELS
) -> list[ImageResult]:
    """Top-k for each image file, in order; an unreadable file gets an error and does not
    stop the others. Files are decoded a chunk at a time, so long lists fit in memory."""
    results = []
    for start in range(0, len(paths), KERAS_BATCH):
        chunk = paths[start : start + KERAS_BATCH]
        images, errors = {}, {}
        for path in chunk:
            try:
                images[path] = read_image(path, max_pixels)
            except ImageError as e:
                errors[path] = str(e)
        readable = [p for p in chunk if p not in errors]
        answers = predictor.predict([images[p] for p in readable])
        probabilities = dict(zip(readable, answers, strict=True))
        for path in chunk:
            if path in errors:
                results.append(ImageResult(path, error=errors[path]))
            else:
                names = predictor.class_names
                results.append(ImageResult(path, top_k(probabilities[path], names, k)))
    return results


def format_results(results: Sequence[ImageResult]) -> str:
    """Human-readable lines: the file, then rank, class and probability per line."""
    lines = []
    for result in results:
        if result.error is not None:
            continue  # errors go to stderr, one line each
        lines.append(result.path)
        width = max(len(p.name) for p in result.predictions)
        for rank, p in enumerate(result.predictions, 1):
            lines.append(f"  {rank}. {p.name:<{width}}  {p.probability:.4f}")
    return "\n".join(lines)


def predict_files(
    model: str,
    paths: Sequence[str],
    k: int = 3,
    as_json: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> bool:
    """Classifies image files and prints the answers, as `python -m app.predict` does.

    Prints the top-k classes of each readable file (a table, or one JSON document with
    `as_json`) to stdout, and one `error: ...` line per unreadable file to stderr.

    Returns:
        True when every file was answered.

    Raises:
        UsageError: no files, or a model that cannot be loaded.
    """
    if not paths:
        raise UsageError("no images given: python -m app.predict --model=MODEL IMAGE [IMAGE ...]")
    predictor = load_predictor(model)
    results = classify_files(predictor, paths, k, max_pixels)
    for result in results:
        if result.error is not None:
            print(f"error: {result.error}", file=sys.stderr)
    if as_json:
        document = {
            "model": predictor.path,
            "format": predictor.kind,
            "results": [r.to_dict() for r in results],
        }
        print(json.dumps(document, indent=2))
    else:
        print(format_results(results))
    return all(r.error is None for r in results)
