"""Every picture the programs write: PNG files via matplotlib's Agg backend, written atomically."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np

from common.files import atomic_path

RIGHT_COLOR = "blue"
WRONG_COLOR = "red"


def _save(fig, path: str) -> str:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def save_samples_grid(
    images: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    path: str,
    cols: int = 3,
) -> str:
    """A grid of images titled with their class names (the tutorial's first figure).

    Args:
        images: uint8 or float 0..255 RGB images, [n, h, w, 3].
        labels: class index of each image.
        class_names: names by index.
        path: PNG file to write.
        cols: images per row.

    Returns:
        `path`.
    """
    rows, cols = _grid(len(images), cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels, strict=False):
        ax.imshow(np.clip(np.asarray(image), 0, 255).astype("uint8"))
        ax.set_title(class_names[int(label)], fontsize=10)
    return _save(fig, path)


def save_predictions_grid(
    images: np.ndarray,
    labels: Sequence[int],
    predictions: Sequence[int],
    class_names: Sequence[str],
    path: str,
    cols: int = 3,
) -> str:
    """Images titled `predict:<class>`, blue when right and red when wrong (the tutorial's)."""
    rows, cols = _grid(len(images), cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, pred in zip(axes.flat, images, labels, predictions, strict=False):
        ax.imshow(np.clip(np.asarray(image), 0, 255).astype("uint8"))
        color = RIGHT_COLOR if int(label) == int(pred) else WRONG_COLOR
        ax.set_title(f"predict:{class_names[int(pred)]}", color=color, fontsize=10)
    return _save(fig, path)


def save_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str) -> str:
    """A labelled confusion matrix: rows are true classes, columns predicted, counts in cells."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black",
                )
    return _save(fig, path)


def save_curves(history: Mapping[str, Sequence[float]], path: str) -> str:
    """Loss and accuracy per epoch, train and validation, side by side.

    Args:
        history: Keras-style history, e.g. {"loss": [...], "val_loss": [...],
            "accuracy": [...], "val_accuracy": [...]}; missing keys are skipped.
        path: PNG file to write.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = list(history.get(key, []))
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend()
    return _save(fig, path)
