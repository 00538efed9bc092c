"""Evaluation of a trained model on one split: metrics, per-class accuracy, pictures.

`evaluate(EvalConfig)` is what `python -m app.evaluate` runs: load the model and the data,
refuse data with other classes, run the model over the split, print the metrics and write
`eval_<split>.json`, `confusion_<split>.png` and `predictions_<split>.png`. Its steps are
pure functions over plain arguments (a Keras model, a `tf.data` dataset, arrays).

Example:

    from app import data, evaluation
    config = evaluation.EvalConfig(
        model="runs/cpu_quick/best.keras",
        data=data.DataConfig(data_dir="~/data/cifar10"),
        split="validation",
    )
    result, paths = evaluation.evaluate(config)
    print(result.top1, paths["json"])

Or step by step:

    from models.bundle import load_model_bundle
    bundle = load_model_bundle("runs/cpu_quick/best.keras")
    splits = data.load(data.DataConfig(data_dir="~/data/cifar10"))
    evaluation.check_class_names(bundle.class_names, splits.class_names, "the data")
    name, examples, note = evaluation.choose_split(splits, "validation")
    ds = data.eval_dataset(examples, bundle.preprocessing, 128)
    logits, labels, samples = evaluation.predict_logits(bundle.model, ds, [0, 1, 2])
    result = evaluation.compute_metrics(logits, labels, bundle.class_names, name)
    print(evaluation.format_report(result))
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
from common.errors import UsageError
from common.files import write_text_atomic

if TYPE_CHECKING:
    from app.data import DataConfig

TOP_K = 5
# The reference tutorial's prediction figure: 2 rows of 3 images.
GRID_IMAGES = 6
GRID_COLS = 3
# Most-confused (true, predicted) pairs listed in the report.
CONFUSED_PAIRS = 3


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Metrics of one split.

    Attributes:
        split: the split evaluated.
        class_names: names by class index.
        num_examples: images evaluated.
        top1: top-1 accuracy.
        topk: top-k accuracy, k = `k` (5, or the number of classes when fewer).
        k: the k of `topk`.
        loss: mean softmax cross-entropy.
        confusion: int64 [classes, classes]; rows true class, columns predicted.
    """

    split: str
    class_names: list[str]
    num_examples: int
    top1: float
    topk: float
    k: int
    loss: float
    confusion: np.ndarray

    @property
    def class_counts(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def class_accuracy(self) -> np.ndarray:
        """Recall per class; NaN for a class with no examples in the split."""
        counts = self.class_counts
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, np.diag(self.confusion) / counts, np.nan)

    def most_confused(self, n: int = CONFUSED_PAIRS) -> list[tuple[str, str, int]]:
        """The `n` largest off-diagonal cells: (true name, predicted name, count)."""
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(-off, axis=None, kind="stable")[:n]
        pairs = [np.unravel_index(i, off.shape) for i in order]
        return [
            (self.class_names[t], self.class_names[p], int(off[t, p]))
            for t, p in pairs
            if off[t, p] > 0
        ]

    def to_dict(self) -> dict:
        accuracy = self.class_accuracy
        return {
            "split": self.split,
            "num_examples": self.num_examples,
            "top1_accuracy": self.top1,
            f"top{self.k}_accuracy": self.topk,
            "loss": self.loss,
            "class_names": list(self.class_names),
            "per_class": {
                name: {
                    "examples": int(self.class_counts[i]),
                    "correct": int(self.confusion[i, i]),
                    "accuracy": None if np.isnan(accuracy[i]) else float(accuracy[i]),
                }
                for i, name in enumerate(self.class_names)
            },
            "most_confused": [
                {"true": t, "predicted": p, "count": c} for t, p, c in self.most_confused()
            ],
            "confusion_matrix": self.confusion.tolist(),
        }


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
    model, dataset, keep: Sequence[int] = (), verbose: int = 1, total: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Runs `model` over a finite `(images, labels)` dataset in one pass.

    Args:
        model: a Keras model returning logits.
        dataset: finite, in-order batches of (normalised images, int labels).
        keep: example indices whose (normalised) input images to return.
        verbose: 1 shows a Keras progress bar.
        total: number of examples, for the progress bar.

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
        logits.append(np.asarray(model.predict_on_batch(images), np.float32))
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


def compute_metrics(
    logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], split: str
) -> EvalResult:
    """Top-1, top-k (k = 5 or fewer classes), mean cross-entropy and the confusion matrix."""
    import keras

    logits = np.asarray(logits, np.float32)
    labels = np.asarray(labels, np.int64)
    num_classes = len(class_names)
    if logits.ndim != 2 or logits.shape[1] != num_classes or len(logits) != len(labels):
        raise ValueError(f"logits {logits.shape} do not fit {len(labels)} labels, {num_classes}")
    k = min(TOP_K, num_classes)
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    in_top_k = keras.metrics.sparse_top_k_categorical_accuracy(labels, logits, k=k)
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return EvalResult(
        split=split,
        class_names=list(class_names),
        num_examples=len(labels),
        top1=float(np.mean(predicted == labels)),
        topk=float(np.mean(keras.ops.convert_to_numpy(in_top_k), dtype=np.float64)),
        k=k,
        loss=float(np.mean(keras.ops.convert_to_numpy(loss))),
        confusion=confusion,
    )


def format_report(result: EvalResult) -> str:
    """The printed summary: headline metrics, a per-class table, the worst confusions."""
    width = max(len("class"), *(len(n) for n in result.class_names))
    lines = [
        f"{result.split}: {result.num_examples} images",
        f"  top-1 accuracy  {result.top1:.4f}",
        f"  top-{result.k} accuracy  {result.topk:.4f}",
        f"  loss            {result.loss:.4f}",
        "",
        f"{'class':<{width}}  {'images':>6}  {'correct':>7}  {'accuracy':>8}",
    ]
    for i, name in enumerate(result.class_names):
        acc = result.class_accuracy[i]
        shown = "-" if np.isnan(acc) else f"{acc:.4f}"
        lines.append(
            f"{name:<{width}}  {result.class_counts[i]:>6}  {result.confusion[i, i]:>7}  {shown:>8}"
        )
    confused = result.most_confused()
    if confused:
        lines.append("")
        lines.append("most confused: " + ", ".join(f"{t} as {p} ({c})" for t, p, c in confused))
    return "\n".join(lines)


def write_outputs(
    result: EvalResult,
    output_dir: str,
    images: np.ndarray,
    labels: Sequence[int],
    predictions: Sequence[int],
    extra: dict | None = None,
) -> dict[str, str]:
    """Writes `eval_<split>.json`, `confusion_<split>.png` and `predictions_<split>.png`.

    Args:
        result: the metrics.
        output_dir: folder to write into (created if needed).
        images: float or uint8 0..255 RGB pixels of the figure's images.
        labels, predictions: their true and predicted class indices.
        extra: more fields for the JSON (model path, data source, ...).

    Returns:
        {"json": path, "confusion": path, "predictions": path}.
    """
    from app import plots

    split = result.split
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
        model: the `.keras` file (labels.txt and preprocessing.json beside it).
        data: the dataset to read (`app.data.DataConfig`).
        split: one of `SPLITS`; "test" falls back to "validation" when the data has none.
        output_dir: where the files go; None: the model's folder.
        batch_size: images per batch.
        verbose: 1 shows a progress bar.
    """

    model: str
    data: DataConfig
    split: str = "test"
    output_dir: str | None = None
    batch_size: int = 128
    verbose: int = 1


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
    from app import data
    from models.bundle import load_model_bundle

    bundle = load_model_bundle(config.model)
    # Unless train is evaluated, load one training image only: the hold-out is chosen
    # before the limit, and decoding 45,000 unused images would cost most of the run.
    load_config = config.data
    if config.split != "train":
        load_config = dataclasses.replace(config.data, train_limit=1)
    splits = data.load(load_config)
    check_class_names(bundle.class_names, splits.class_names, splits.train.origin)
    split, examples, note = choose_split(splits, config.split)
    if note:
        print(f"note: {note}", file=sys.stderr)
    dataset = data.eval_dataset(examples, bundle.preprocessing, config.batch_size)
    keep = sample_indices(examples.num_examples)
    logits, labels, kept = predict_logits(
        bundle.model, dataset, keep, verbose=config.verbose, total=examples.num_examples
    )
    result = compute_metrics(logits, labels, bundle.class_names, split)
    output_dir = config.output_dir or os.path.dirname(os.path.abspath(config.model))
    paths = write_outputs(
        result,
        output_dir,
        images=bundle.preprocessing.invert(np.stack([kept[i] for i in keep])),
        labels=[labels[i] for i in keep],
        predictions=[int(logits[i].argmax()) for i in keep],
        extra={
            "model": os.path.abspath(config.model),
            "requested_split": config.split,
            "data_source": splits.source,
            "data_origin": examples.origin,
            "data_config": dataclasses.asdict(config.data),
        },
    )
    print(format_report(result))
    print(f"wrote {paths['json']}, {paths['confusion']}, {paths['predictions']}")
    return result, paths
