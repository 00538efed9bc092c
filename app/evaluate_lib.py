"""Evaluation of a trained model of any format on one split: metrics, per-class accuracy,
pictures.

`evaluate(EvalConfig)` is what `python -m app.evaluate` runs: load the model (any format
`app.inference` loads: `.keras`, a SavedModel, a `.tflite`, `model.onnx`) and the data,
refuse data with other classes, run the model over the split (`run_over`: one loop for every
format, fed a batch at a time by the predictor's own input pipeline), print the metrics and
write `eval_<split>.json`, `confusion_<split>.png` and `predictions_<split>.png`. The metrics
are `app.metrics`.

A Keras model is fed by the `tf.data` pipeline and scored by its logits; an exported model
takes the images as stored (the SavedModel resizes inside its graph; a `.tflite` gets them
resized as `app.predict` does) and is scored by its probabilities, with the class names from
the export itself. Its files are named after the format (`eval_<split>_int8.json`, ...) and
go into the export folder.

Example:

    from app import data, evaluate_lib
    config = evaluate_lib.EvalConfig(
        model="runs/cpu_quick/best.keras",
        data=data.DataConfig(data_dir="~/data/cifar10"),
        split="validation",
    )
    result, paths = evaluate_lib.evaluate(config)
    print(result.top1, paths["json"])

Or step by step, for any format:

    from app import inference
    predictor = inference.load_predictor("runs/cpu_quick/export/model_int8.tflite")
    splits = data.load(data.DataConfig(data_dir="~/data/cifar10"))
    evaluate_lib.check_class_names(predictor.class_names, splits.class_names, "the data")
    name, examples, note = evaluate_lib.choose_split(splits, "validation")
    scores, labels, kept = evaluate_lib.run_over(
        predictor, predictor.batches(examples, 128), keep=[0, 1, 2]
    )
    result = evaluate_lib.compute_metrics(
        scores, labels, predictor.class_names, name, from_logits=predictor.scores_are_logits
    )
    print(evaluate_lib.format_report(result))
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from app import data
from app.data import SPLITS
from app.inference import KERAS_SUFFIX, Predictor, export_folder, load_predictor
from app.metrics import EvalResult, compute_metrics, format_report
from common import files
from common.errors import UsageError

if TYPE_CHECKING:
    from app.data import DataConfig

# The reference tutorial's prediction figure: 2 rows of 3 images.
GRID_IMAGES = 6
GRID_COLS = 3


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


def run_over(
    predictor: Predictor,
    batches: Iterable[tuple[Any, Any]],
    keep: Sequence[int] = (),
    verbose: int = 1,
    total: int | None = None,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Runs `predictor` over a split's batches in one pass (the one evaluation loop).

    Args:
        predictor: a model of any format (`app.inference`).
        batches: `(inputs, labels)` in order, in the predictor's input form
            (`predictor.batches(examples, batch_size)`); consumed as they come, so the split
            may be streamed.
        keep: example indices whose images to return, for the prediction picture.
        verbose: 1 shows a Keras progress bar.
        total: number of examples, for the progress bar.
        flip: test-time augmentation: the mean of the scores of each image and its mirror.

    Returns:
        (float32 scores [n, classes]: logits when `predictor.scores_are_logits`, else
        probabilities; int64 labels [n]; {index: float 0..255 RGB image at the model's size}).

    Raises:
        UsageError: the split holds no examples.
    """
    import keras

    wanted = set(keep)
    scores, labels, kept = [], [], {}
    progress = keras.utils.Progbar(total, verbose=verbose, unit_name="image")
    seen = 0
    for inputs, batch_labels in batches:
        batch_scores = predictor.scores(inputs)
        if flip:
            batch_scores = (batch_scores + predictor.scores(predictor.mirror(inputs))) / 2
        scores.append(batch_scores)
        labels.append(np.asarray(batch_labels, np.int64))
        for i in wanted.intersection(range(seen, seen + len(batch_scores))):
            kept[i] = predictor.figure_image(inputs, i - seen)
        seen += len(batch_scores)
        progress.update(seen)
    if verbose:
        progress.update(seen, finalize=True)
    if not scores:
        raise UsageError("the split to evaluate holds no examples")
    return np.concatenate(scores).astype(np.float32), np.concatenate(labels), kept


def source_model_path(path: str) -> str:
    """The `.keras` model an exported model came from (the export's report.json says),
    so its training run's flags.txt gives the data to evaluate on; `path` itself otherwise."""

    if path.endswith(KERAS_SUFFIX) or not files.exists(path):
        return path
    report = files.join(export_folder(path), "report.json")
    try:
        source = json.loads(files.read_text(report)).get("model")
    except (OSError, ValueError, AttributeError):
        return path
    return source if isinstance(source, str) and files.isfile(source) else path


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
        "confusion": files.join(output_dir, f"confusion_{split}.png"),
        "predictions": files.join(output_dir, f"predictions_{split}.png"),
        "json": files.join(output_dir, f"eval_{split}.json"),
    }
    try:
        files.makedirs(output_dir)
        plots.save_confusion_matrix(result.confusion, result.class_names, paths["confusion"])
        plots.save_predictions_grid(
            images, labels, predictions, result.class_names, paths["predictions"], cols=GRID_COLS
        )
        document = {**(extra or {}), **result.to_dict()}
        files.write_text(paths["json"], json.dumps(document, indent=2) + "\n")
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
    predictor = load_predictor(config.model)
    # Unless train is evaluated, load one training image only: the hold-out is chosen
    # before the limit, and decoding 45,000 unused images would cost most of the run.
    load_config = config.data
    if config.split != "train":
        load_config = dataclasses.replace(config.data, train_limit=1)
    splits = data.load(load_config)
    check_class_names(predictor.class_names, splits.class_names, splits.train.origin)
    split, examples, note = choose_split(splits, config.split)
    if note:
        print(f"note: {note}", file=sys.stderr)
    keep = sample_indices(examples.num_examples)
    scores, labels, kept = run_over(
        predictor,
        predictor.batches(examples, config.batch_size),
        keep,
        verbose=config.verbose,
        total=examples.num_examples,
        flip=config.flip,
    )
    # A Keras model's files keep their plain names; an exported one's name their format.
    tag = "" if predictor.kind == "keras" else f"_{predictor.name}"
    if config.flip:  # beside, not over, the plain evaluation's files
        tag += "_flip"
    result = compute_metrics(
        scores, labels, predictor.class_names, split, from_logits=predictor.scores_are_logits
    )
    paths = write_outputs(
        result,
        config.output_dir or predictor.folder,
        images=np.stack([kept[i] for i in keep]),
        labels=[labels[i] for i in keep],
        predictions=[int(scores[i].argmax()) for i in keep],
        extra={
            "model": files.resolve(config.model),
            "format": predictor.name,
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
