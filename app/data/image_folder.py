"""Reads an image-folder tree: `<class>/*.jpg|png`, or `train/`, `validation/` (or `val/`)
and `test/` folders of those. Lists files only; decoding happens later (`decode`)."""

from __future__ import annotations

import os

import numpy as np

from app.data.types import SOURCE_IMAGE_FOLDER, DataError, Examples, RawSplits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def subdirs(path: str) -> list[str]:
    """Sorted names of the folders in `path`, hidden (`.x`) and private (`_x`) ones left out."""
    return sorted(
        e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith((".", "_"))
    )


def looks_like_image_folder(root: str) -> bool:
    """`root` has a `train/` folder, or a class folder with an image file in it."""
    if os.path.isdir(os.path.join(root, "train")):
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

    Raises:
        DataError: no class folders, an empty class folder, or splits whose classes differ.
    """
    split_dirs = {"train": os.path.join(root, "train")}
    if not os.path.isdir(split_dirs["train"]):
        split_dirs = {"train": root}
    else:
        for split, names in (("validation", ("validation", "val")), ("test", ("test",))):
            for name in names:
                if os.path.isdir(os.path.join(root, name)):
                    split_dirs[split] = os.path.join(root, name)
                    break
    class_names, files, labels = _list_classes(split_dirs["train"])
    raw = {"train": (files, labels)}
    for split in ("validation", "test"):
        if split in split_dirs:
            names, f, lab = _list_classes(split_dirs[split])
            if names != class_names:
                raise DataError(
                    f"class folders of {split_dirs[split]} ({', '.join(names)}) differ from "
                    f"those of {split_dirs['train']} ({', '.join(class_names)}); make them match"
                )
            raw[split] = (f, lab)
    out = {
        split: Examples(
            np.asarray(lab, np.int64), files=np.asarray(f, dtype=object), origin=split_dirs[split]
        )
        for split, (f, lab) in raw.items()
    }
    return RawSplits(
        out["train"], out.get("validation"), out.get("test"), class_names, SOURCE_IMAGE_FOLDER
    )
