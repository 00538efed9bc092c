"""Top-k classification of image files with any format `app.inference` loads.

Every format shares one image path: decode (JPEG/PNG/GIF/BMP/WebP, grayscale and RGBA to RGB,
images over the pixel limit refused from their header), then the predictor resizes float
pixels to the model's image size with `models.preprocessing.resize`, the one resize the data
pipeline and the exported graphs use, so they agree on the top-1 class. `predict_files` is
what `python -m app.predict` runs.

Example:

    from app import inference, predict_lib
    predictor = inference.load_predictor("runs/cpu_quick/best.keras")
    image = predict_lib.read_image("cat.jpg")
    print(predict_lib.top_k(predictor.predict([image])[0], predictor.class_names, k=3))

    predict_lib.predict_files("runs/cpu_quick/export/model_int8.tflite", ["cat.jpg"], k=3)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

import numpy as np

from app.inference import BATCH, Predictor, load_predictor
from common import files
from common.errors import UsageError, first_line
from common.pixel_limits import MAX_PIXELS


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

    from export import image_header

    if not files.isfile(path):
        raise ImageError(f"{path}: no such file")
    data = files.read_bytes(path)
    try:
        image = image_header.decode_image(data, max_pixels)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
        raise ImageError(f"{path}: not a readable image ({first_line(e)})") from e
    return image.numpy()


def top_k(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[Prediction]:
    """The `k` most probable classes, most probable first (ties: lower index first)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-probabilities, kind="stable")[: max(1, min(k, len(probabilities)))]
    return [Prediction(int(i), class_names[int(i)], float(probabilities[i])) for i in order]


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
    for start in range(0, len(paths), BATCH):
        chunk = paths[start : start + BATCH]
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
