"""Reads an image-folder tree: `<class>/*.jpg|png`, or `train/`, `validation/` (or `val/`)
and `test/` folders of those (a tree without `train/` is evaluation data). Lists files
only (local or on any TensorFlow file system, through `common.files`); decoding happens
later (`decode`). Each file costs its path and an int64 label in memory."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.data.types import SOURCE_IMAGE_FOLDER, DataError, Examples, RawSplits
from common import files

# Parallel listings and folder checks: in a bucket each is a request.
LIST_THREADS = 16

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The split folders of a tree, by split; the first name present is used.
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _parallel(function, items: list) -> list:
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        return list(pool.map(function, items))


def subdirs(path: str) -> list[str]:
    """Sorted names of the folders in `path`, hidden (`.x`) and private (`_x`) ones left out.

    Names that look like image files are taken for files without asking."""
    names = [
        n
        for n in files.listdir(path)
        if not n.startswith((".", "_")) and not n.lower().endswith(IMAGE_EXTENSIONS)
    ]
    is_dir = _parallel(lambda n: files.isdir(files.join(path, n)), names)
    return [n for n, d in zip(names, is_dir, strict=True) if d]


def _split_dirs(root: str) -> dict[str, str]:
    """The split folders (`train/`, `validation/` or `val/`, `test/`) present in `root`."""
    present = set(subdirs(root))
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if name in present:
                found[split] = files.join(root, name)
                break
    return found


def looks_like_image_folder(root: str) -> bool:
    """`root` has split folders (`train/`, `test/`, ...), or a class folder with an image."""
    if _split_dirs(root):
        return True
    return any(
        any(_is_image_file(f) for f in files.listdir(files.join(root, d))) for d in subdirs(root)
    )


def _list_classes(split_dir: str) -> tuple[list[str], list[str], list[int]]:
    classes = subdirs(split_dir)
    if not classes:
        raise DataError(
            f"{split_dir} has no class folders; put images in {split_dir}/<class name>/*.jpg"
        )
    folders = [files.join(split_dir, name) for name in classes]
    listings = _parallel(lambda f: [n for n in files.listdir(f) if _is_image_file(n)], folders)
    paths, labels = [], []
    for label, (folder, names) in enumerate(zip(folders, listings, strict=True)):
        if not names:
            raise DataError(
                f"class folder {folder} has no .jpg/.jpeg/.png images; add some or remove it"
            )
        paths += [files.join(folder, f) for f in names]
        labels += [label] * len(names)
    return classes, paths, labels


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
