"""Evaluation of a trained model on one split: metrics, per-class accuracy, pictures.

`evaluate(EvalConfig)` is what `python -m app.evaluate` runs: load the model and the data,
refuse data with other classes, run the model over the split, print the metrics and write
`eval_<split>.json`, `confusion_<split>.png` and `predictions_<split>.png`. Its steps are
pure functions over plain arguments (a Keras model, a `tf.data` dataset, arrays); the
metrics are `app.metrics`.

The model may be any exported format too: a `.tflite` file or a SavedModel (base path or
version folder), run through `app.inference` on the images as stored (the
SavedModel resizes inside its graph; a `.tflite` gets them resized as `app.predict` does), with
the class names from the export itself. The files are then named after the format
(`eval_<split>_int8.json`, ...) and go into the export folder.

Example:

    from app import data, evaluate_lib
    config = evaluate_lib.EvalConfig(
        model="runs/cpu_quick/best.keras",
        data=data.DataConfig(data_dir="~/data/cifar10"),
        split="validation",
    )
    result, paths = evaluate_lib.evaluate(config)
    print(result.top1, paths["json"])

Or step by step:

    from models.bundle import load_model_bundle
    bundle = load_model_bundle("runs/cpu_quick/best.keras")
    splits = data.load(data.DataConfig(data_dir="~/data/cifar10"))
    evaluate_lib.check_class_names(bundle.class_names, splits.class_names, "the data")
    name, examples, note = evaluate_lib.choose_split(splits, "validation")
    ds = data.eval_dataset(examples, bundle.preprocessing, 128)
    logits, labels, samples = evaluate_lib.predict_logits(bundle.model, ds, [0, 1, 2])
    result = evaluate_lib.compute_metrics(logits, labels, bundle.class_names, name)
    print(evaluate_lib.format_report(result))

    # an exported model: probabilities, not logits
    from app import inference
    predictor = inference.load_predictor("runs/cpu_quick/export/model_int8.tflite")
    probabilities, labels, samples = evaluate_lib.predict_probabilities(predictor, examples)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from app.data import SPLITS
from app.metrics import EvalResult, compute_metrics, format_report
from common.errors import UsageError
from common.files import write_text_atomic

if TYPE_CHECKING:
    from app.data import DataConfig

# The reference tutorial's prediction figure: 2 rows of 3 images.
GRID_IMAGES = 6
GRID_COLS = 3
# The figure's image size for a model that does not state its input size.
DISPLAY_SIZE = 64


def check_class_names(model_classes: Sequence[str], data_classes: Sequence[str], where: str):
    """Refuses data whose classes differ from the model's labels.txt (names and order).

    Raises:
        UsageError: naming the first difference.
    """
    if list(model_classes) == list(data_classes):
        return
    if len(model_classes) != len(data_classes):
        detail = f"{len(data_classes)} classes in the data, {len(model_classes)} in the model"
    else:
        i = next(
            i for i, (a, b) in enumerate(zip(model_classes, data_classes, strict=True)) if a != b
        )
        detail = (
            f"class {i} is {data_classes[i]!r} in the data but {model_classes[i]!r} in the model"
        )
    raise UsageError(
        f"the classes of {where} differ from the model's labels.txt ({detail}); evaluate on "
        "data with the classes the model was trained on"
    )


def choose_split(splits, split: str) -> tuple[str, object, str | None]:
    """The examples of `split` from a `data.Splits`.

    `test` falls back to `validation` when the data has no test split (an image folder with
    only train/, say): the files are then named after the split actually evaluated, and the
    returned note says so.

    Returns:
        (split evaluated, its `data.Examples`, a note for the user or None).

    Raises:
        UsageError: an unknown split name.
    """
    if split not in SPLITS:
        raise UsageError(f"--split={split} is not one of {', '.join(SPLITS)}")
    if split == "test" and splits.test is None:
        how = (
            "held out of train by --validation_split and --seed"
            if splits.validation_held_out
            else "of the data"
        )
        note = (
            f"{splits.source} data at {splits.train.origin} has no test split; evaluating the "
            f"validation split ({how}) instead"
        )
        return "validation", splits.validation, note
    return split, getattr(splits, split), None


def sample_indices(num_examples: int, n: int = GRID_IMAGES) -> list[int]:
    """`n` evenly spaced, distinct indices: a deterministic spread over a split that is
    often stored class by class, so the figure shows several classes."""
    if num_examples <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, num_examples - 1, min(n, num_examples)).round()})


def predict_logits(
    model,
    dataset,
    keep: Sequence[int] = (),
    verbose: int = 1,
    total: int | None = None,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Runs `model` over a finite `(images, labels)` dataset in one pass.

    Args:
        model: a Keras model returning logits.
        dataset: finite, in-order batches of (normalised images, int labels).
        keep: example indices whose (normalised) input images to return.
        verbose: 1 shows a Keras progress bar.
        total: number of examples, for the progress bar.
        flip: test-time augmentation: the mean of the logits of each image and its mirror.

    Returns:
        (float32 logits [n, classes], int64 labels [n], {index: normalised image}).
    """
    import keras

    wanted = set(keep)
    logits, labels, kept = [], [], {}
    progress = keras.utils.Progbar(total, verbose=verbose, unit_name="image")
    seen = 0
    for images, batch_labels in dataset:
        # predict_on_batch runs the compiled predict function (no per-batch retracing).
        batch_logits = np.asarray(model.predict_on_batch(images), np.float32)
        if flip:
            mirrored = np.asarray(model.predict_on_batch(images[:, :, ::-1]), np.float32)
            batch_logits = (batch_logits + mirrored) / 2
        logits.append(batch_logits)
        labels.append(np.asarray(batch_labels, np.int64))
        for i in wanted.intersection(range(seen, seen + len(batch_labels))):
            kept[i] = np.asarray(images[i - seen])
        seen += len(batch_labels)
        progress.update(seen)
    if verbose:
        progress.update(seen, finalize=True)
    if not logits:
        raise UsageError("the split to evaluate holds no examples")
    return np.concatenate(logits), np.concatenate(labels), kept


def stored_batches(examples, batch_size: int):
    """Yields (uint8 RGB images as stored, int64 labels) in order, `batch_size` at a time;
    files and encoded bytes are decoded here, sizes may differ."""
    import tensorflow as tf

    from app.data.decode import decode_image

    for start in range(0, examples.num_examples, batch_size):
        stop = min(start + batch_size, examples.num_examples)
        if examples.images is not None:
            images = list(examples.images[start:stop])
        elif examples.files is not None:
            images = [decode_image(tf.io.read_file(f)).numpy() for f in examples.files[start:stop]]
        else:
            images = [decode_image(e).numpy() for e in examples.encoded[start:stop]]
        yield images, np.asarray(examples.labels[start:stop], np.int64)


def predict_probabilities(
    predictor,
    examples,
    keep: Sequence[int] = (),
    verbose: int = 1,
    batch_size: int = 128,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Runs an `app.inference.Predictor` (any format) over a split's stored images;
    with `flip`, the mean of the probabilities of each image and its mirror.

    Returns:
        (float32 probabilities [n, classes], int64 labels [n], {index: float 0..255 image
        at the model's input size, or `DISPLAY_SIZE` when the model does not say}).
    """
    import keras

    from models.preprocessing import resize

    wanted = set(keep)
    probabilities, labels, kept = [], [], {}
    progress = keras.utils.Progbar(examples.num_examples, verbose=verbose, unit_name="image")
    seen = 0
    for images, batch_labels in stored_batches(examples, batch_size):
        batch_probabilities = predictor.predict(images)
        if flip:
            mirrored = predictor.predict([image[:, ::-1] for image in images])
            batch_probabilities = (batch_probabilities + mirrored) / 2
        probabilities.append(batch_probabilities)
        labels.append(batch_labels)
        for i in wanted.intersection(range(seen, seen + len(images))):
            size = predictor.image_size or DISPLAY_SIZE
            kept[i] = keras.ops.convert_to_numpy(resize(images[i - seen], size))
        seen += len(images)
        progress.update(seen)
    if verbose:
        progress.update(seen, finalize=True)
    if not probabilities:
        raise UsageError("the split to evaluate holds no examples")
    return np.concatenate(probabilities), np.concatenate(labels), kept


def training_model(path: str) -> str:
    """The `.keras` model an exported model came from (the export's report.json says),
    so its training run's flags.txt gives the data to evaluate on; `path` itself otherwise."""
    from app.inference import KERAS_SUFFIX, export_folder

    if path.endswith(KERAS_SUFFIX) or not os.path.exists(path):
        return path
    report = os.path.join(export_folder(path), "report.json")
    try:
        with open(report) as f:
            source = json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        return path
    return source if isinstance(source, str) and os.path.isfile(source) else path


def write_outputs(
    result: EvalResult,
    output_dir: str,
    images: np.ndarray,
    labels: Sequence[int],
    predictions: Sequence[int],
    extra: dict | None = None,
    tag: str = "",
) -> dict[str, str]:
    """Writes `eval_<split><tag>.json`, `confusion_<split><tag>.png` and
    `predictions_<split><tag>.png`.

    Args:
        result: the metrics.
        output_dir: folder to write into (created if needed).
        images: float or uint8 0..255 RGB pixels of the figure's images.
        labels, predictions: their true and predicted class indices.
        extra: more fields for the JSON (model path, data source, ...).
        tag: added to the names ("_int8" for model_int8.tflite; "" for a Keras model).

    Returns:
        {"json": path, "confusion": path, "predictions": path}.
    """
    from app import plots

    split = result.split + tag
    paths = {
        "confusion": os.path.join(output_dir, f"confusion_{split}.png"),
        "predictions": os.path.join(output_dir, f"predictions_{split}.png"),
        "json": os.path.join(output_dir, f"eval_{split}.json"),
    }
    try:
        os.makedirs(output_dir, exist_ok=True)
        plots.save_confusion_matrix(result.confusion, result.class_names, paths["confusion"])
        plots.save_predictions_grid(
            images, labels, predictions, result.class_names, paths["predictions"], cols=GRID_COLS
        )
        document = {**(extra or {}), **result.to_dict()}
        write_text_atomic(paths["json"], json.dumps(document, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"cannot write results to {output_dir} ({e.strerror or e})") from e
    return paths


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    Attributes:
        model: the `.keras` file (labels.txt and preprocessing.json beside it), a `.tflite`
            file or a SavedModel folder (what app.export writes).
        data: the dataset to read (`app.data.DataConfig`).
        split: one of `SPLITS`; "test" falls back to "validation" when the data has none.
        output_dir: where the files go; None: the model's folder (for an exported model,
            its export folder).
        batch_size: images per batch.
        verbose: 1 shows a progress bar.
        flip: test-time augmentation, each image and its mirror (twice the cost).
    """

    model: str
    data: DataConfig
    split: str = "test"
    output_dir: str | None = None
    batch_size: int = 128
    verbose: int = 1
    flip: bool = False


def evaluate(config: EvalConfig) -> tuple[EvalResult, dict[str, str]]:
    """Evaluates the model on the split; prints and writes what `app.evaluate` does.

    A note on stderr says when --split=test fell back to validation; the metrics and the
    per-class table go to stdout, then the paths written.

    Returns:
        (the metrics, {"json": path, "confusion": path, "predictions": path}).

    Raises:
        UsageError: an unusable model, data whose classes differ from the model's, an
            empty split, or an output folder that cannot be written.
        app.data.DataError: the data cannot be read.
    """
    from app import data, inference
    from models.bundle import load_model_bundle

    # A Keras model runs over the tf.data pipeline in batches; every other format through
    # its predictor, on the images as stored (the same answers app.predict gives).
    keras_model = config.model.endswith(inference.KERAS_SUFFIX)
    if keras_model:
        bundle = load_model_bundle(config.model)
        class_names, folder = bundle.class_names, os.path.dirname(os.path.abspath(config.model))
    else:
        predictor = inference.load_predictor(config.model)
        class_names, folder = predictor.class_names, predictor.folder
    # Unless train is evaluated, load one training image only: the hold-out is chosen
    # before the limit, and decoding 45,000 unused images would cost most of the run.
    load_config = config.data
    if config.split != "train":
        load_config = dataclasses.replace(config.data, train_limit=1)
    splits = data.load(load_config)
    check_class_names(class_names, splits.class_names, splits.train.origin)
    split, examples, note = choose_split(splits, config.split)
    if note:
        print(f"note: {note}", file=sys.stderr)
    keep = sample_indices(examples.num_examples)
    if keras_model:
        dataset = data.eval_dataset(examples, bundle.preprocessing, config.batch_size)
        scores, labels, kept = predict_logits(
            bundle.model,
            dataset,
            keep,
            verbose=config.verbose,
            total=examples.num_examples,
            flip=config.flip,
        )
        figure = bundle.preprocessing.invert(np.stack([kept[i] for i in keep]))
        model_format, tag = "keras", ""
    else:
        scores, labels, kept = predict_probabilities(
            predictor, examples, keep, config.verbose, config.batch_size, flip=config.flip
        )
        figure = np.stack([kept[i] for i in keep])
        model_format, tag = predictor.name, f"_{predictor.name}"
    if config.flip:  # beside, not over, the plain evaluation's files
        tag += "_flip"
    result = compute_metrics(scores, labels, class_names, split, from_logits=keras_model)
    paths = write_outputs(
        result,
        config.output_dir or folder,
        images=figure,
        labels=[labels[i] for i in keep],
        predictions=[int(scores[i].argmax()) for i in keep],
        extra={
            "model": os.path.abspath(config.model),
            "format": model_format,
            "requested_split": config.split,
            "test_time_flip": config.flip,
            "data_source": splits.source,
            "data_origin": examples.origin,
            "data_config": dataclasses.asdict(config.data),
        },
        tag=tag,
    )
    print(format_report(result))
    print(f"wrote {paths['json']}, {paths['confusion']}, {paths['predictions']}")
    return result, paths
