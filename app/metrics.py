"""Classification metrics of one split: top-1, top-k, cross-entropy, per-class accuracy.

Pure functions over arrays (logits or probabilities and integer labels); `app.evaluate_lib`
computes them for a model on a dataset.

Example:

    from app import metrics
    result = metrics.compute_metrics(logits, labels, ["cat", "dog", "frog"], "validation")
    print(metrics.format_report(result))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

TOP_K = 5
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


def compute_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    split: str,
    from_logits: bool = True,
) -> EvalResult:
    """Top-1, top-k (k = 5 or fewer classes), mean cross-entropy and the confusion matrix.

    Args:
        logits: float [n, classes] scores: logits, or probabilities with `from_logits=False`
            (an exported model's output; the loss then clips them to [1e-7, 1 - 1e-7], as
            Keras does, so a quantized probability of exactly 0 gives a finite loss).
        labels: int [n] true classes.
        class_names: names by class index.
        split: the split's name, for the report.
        from_logits: whether `logits` are logits.
    """
    import keras

    logits = np.asarray(logits, np.float32)
    labels = np.asarray(labels, np.int64)
    num_classes = len(class_names)
    if logits.ndim != 2 or logits.shape[1] != num_classes or len(logits) != len(labels):
        raise ValueError(f"logits {logits.shape} do not fit {len(labels)} labels, {num_classes}")
    k = min(TOP_K, num_classes)
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=from_logits)
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
