"""Reads an image-folder tree: `<class>/*.jpg|png`, or `train/`, `validation/` (or `val/`)
and `test/` folders of those (a tree without `train/` is evaluation data). Lists files
only; decoding happens later (`decode`)."""

from __future__ import annotations

import os

import numpy as np

from app.data.types import SOURCE_IMAGE_FOLDER, DataError, Examples, RawSplits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The split folders of a tree, by split; the first name present is used.
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def subdirs(path: str) -> list[str]:
    """Sorted names of the folders in `path`, hidden (`.x`) and private (`_x`) ones left out."""
    return sorted(
        e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith((".", "_"))
    )


def _split_dirs(root: str) -> dict[str, str]:
    """The split folders (`train/`, `validation/` or `val/`, `test/`) present in `root`."""
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if os.path.isdir(os.path.join(root, name)):
                found[split] = os.path.join(root, name)
                break
    return found


def looks_like_image_folder(root: str) -> bool:
    """`root` has split folders (`train/`, `test/`, ...), or a class folder with an image."""
    if _split_dirs(root):
        return True
    return any(
        any(_is_image_file(f) for f in os.listdir(os.path.join(root, d))) for d in subdirs(root)
    )


def _list_classes(split_dir: str) -> tuple[list[str], list[str], list[int]]:
    classes = subdirs(split_dir)
    if not classes:
        raise DataError(
            f"{split_dir} has no class folders; put images in {split_dir}/<class name>/*.jpg"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        names = sorted(f for f in os.listdir(folder) if _is_image_file(f))
        if not names:
            raise DataError(
                f"class folder {folder} has no .jpg/.jpeg/.png images; add some or remove it"
            )
        files += [os.path.join(folder, f) for f in names]
        labels += [label] * len(names)
    return classes, files, labels


def load_image_folder(root: str) -> RawSplits:
    """The tree's splits as file paths; class names are the sorted class-folder names.

    Only `<class>/` folders: they are train. Split folders without `train/` (only `test/`,
    say): evaluation data, with no train split.

    Raises:
        DataError: no class folders, an empty class folder, or splits whose classes differ.
    """
    split_dirs = _split_dirs(root) or {"train": root}
    raw, class_names, first = {}, None, None
    for split, split_dir in split_dirs.items():
        names, f, lab = _list_classes(split_dir)
        if class_names is not None and names != class_names:
            raise DataError(
                f"class folders of {split_dir} ({', '.join(names)}) differ from "
                f"those of {first} ({', '.join(class_names)}); make them match"
            )
        class_names, first = names, first or split_dir
        raw[split] = (f, lab)
    out = {
        split: Examples(
            np.asarray(lab, np.int64), files=np.asarray(f, dtype=object), origin=split_dirs[split]
        )
        for split, (f, lab) in raw.items()
    }
    return RawSplits(
        out.get("train"), out.get("validation"), out.get("test"), class_names, SOURCE_IMAGE_FOLDER
    )
