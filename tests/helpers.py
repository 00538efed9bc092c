"""Helpers shared by the test modules: real data, subprocess runs, tiny models, images.

Fixtures live in conftest.py; plain functions live here, imported as `from tests import helpers`
or by name.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from types import ModuleType

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from app.training.backup import backup_path, read_state
from app.training.callbacks import read_history_csv
from models.bundle import write_labels

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_DIR = SHARED_DATA / "cifar10"
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
# The files a finished training run leaves in its model_dir (beside `logs/`).
RUN_FILES = (
    "best.keras",
    "flags.txt",
    "labels.txt",
    "preprocessing.json",
    "history.csv",
    "metrics.json",
    "curves.png",
    "samples.png",
)


def require_cifar10() -> pathlib.Path:
    """The real CIFAR-10 image-folder tree (train/<class>/*.jpg); skips the test when absent."""
    if not (CIFAR10_DIR / "train").is_dir():
        pytest.skip(f"real CIFAR-10 images not found at {CIFAR10_DIR} (set SHARED_DATA)")
    return CIFAR10_DIR


# --- programs in a subprocess ------------------------------------------------------------


def run_program(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root, output captured."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- programs in this process (ram:// lives only in the process that wrote it) -------------


@contextlib.contextmanager
def program_flags(module: str, *args: str) -> Iterator[tuple[ModuleType, list[str]]]:
    """`python -m module args...`'s flags, defined and parsed in this process: yields the
    program module and its positional arguments (argv). The program's flags are removed
    afterwards, so another program (another `--model`) can define its own."""
    from absl import flags

    program = importlib.reload(importlib.import_module(module))  # fresh module-level state
    before = set(flags.FLAGS)
    program.define_flags()
    try:
        yield program, flags.FLAGS([module, *args])
    finally:
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)


def run_main(module: str, *args: str) -> subprocess.CompletedProcess:
    """Runs a program's `main` in this process as `python -m module args...` would (its paths
    checked, user errors as one `error:` line and exit code 2); output captured."""
    from app import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with (
        program_flags(module, *args) as (program, argv),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            cli.guarded(program.main)(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


# --- training runs -----------------------------------------------------------------------


def train_command(model_dir, *flags: str) -> list[str]:
    return [sys.executable, "-m", "app.train", f"--model_dir={model_dir}", *flags]


def run_train(model_dir, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        train_command(model_dir, *flags),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_train(model_dir, *flags: str, log=None) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        train_command(model_dir, *flags),
        cwd=REPO,
        env=env,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_backup(model_dir, after: tuple[int, int], proc, timeout: float = 240) -> tuple:
    """Polls the backup until its (epoch, step) passes `after`; returns it."""
    path = backup_path(str(model_dir))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(path)
        if state is not None and (state.epoch, state.step) > after:
            return state.epoch, state.step
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before a new backup")
        time.sleep(0.05)
    raise AssertionError(f"no backup past {after} within {timeout} s")


def history_rows(model_dir) -> list[dict[str, float]]:
    return read_history_csv(os.path.join(model_dir, "history.csv"))


def final_digest(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if "Final weights sha256" in line]
    assert lines, stdout
    return lines[-1].split()[-1]


# --- models and images -------------------------------------------------------------------


def randomise(model: keras.Model, seed: int = 0) -> keras.Model:
    """Non-trivial batch-norm statistics and a head with spread-out logits."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n),
                    rng.normal(0.0, 0.2, n),
                    rng.normal(0.0, 0.5, n),
                    rng.uniform(0.5, 2.0, n),
                ]
            )
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            layer.set_weights([rng.normal(0.0, 0.3, kernel.shape), bias])
    return model


def tiny_model(num_classes: int = 10, size: int = 32, seed: int = 0) -> keras.Model:
    """A small conv net with the project's input/head conventions (logits out)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name="images")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="predictions")(x)
    return randomise(keras.Model(inputs, outputs), seed)


def save_bundle(directory: pathlib.Path, model: keras.Model, pre, class_names) -> str:
    """What app.train leaves in a model directory: best.keras, labels.txt, preprocessing.json."""
    directory.mkdir(parents=True, exist_ok=True)
    path = str(directory / "best.keras")
    model.save(path)
    write_labels(str(directory), class_names)
    pre.save(str(directory))
    return path


def keras_reference(model: keras.Model, pre, pixels: np.ndarray) -> np.ndarray:
    """Probabilities the Keras model gives for uint8 images of any size (the contract:
    bilinear resize of float pixels, Preprocessing, softmax of the logits)."""
    x = tf.image.resize(tf.cast(pixels, tf.float32), (pre.image_size, pre.image_size))
    logits = model(pre(x), training=False)
    return tf.nn.softmax(logits).numpy()


def random_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random pictures (noise upsampled), so JPEG keeps them close to themselves."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, max(2, height // 4), max(2, width // 4), 3))
    smooth = tf.image.resize(coarse, (height, width), method="bilinear").numpy()
    return np.clip(np.round(smooth), 0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str) -> bytes:
    if fmt == "png":
        return tf.io.encode_png(image).numpy()
    return tf.io.encode_jpeg(image, quality=95).numpy()


# --- data: image folders -----------------------------------------------------------------


def write_png(path: pathlib.Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def write_folder(root, classes=("cat", "dog"), per_class: int = 5, size: int = 8, ext="png"):
    """An image-folder tree `root/<class>/<i>.<ext>` of seeded random images."""
    rng = np.random.default_rng(1)
    for c in classes:
        for i in range(per_class):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            write_png(root / c / f"{i}.{ext}", image)


# --- data: TFRecord shards ---------------------------------------------------------------


def numbered_image(i: int, size: int = 8) -> np.ndarray:
    """An image that says which example it is: pixel (0, 0) holds (i % 256, i // 256, 7)."""
    image = np.full((size, size, 3), 7, np.uint8)
    image[..., 0], image[..., 1] = i % 256, i // 256
    return image


def image_number(pixels) -> np.ndarray:
    """The example numbers of images (uint8 or float, [..., h, w, 3]) of `numbered_image`."""
    pixels = np.asarray(pixels)
    return (np.round(pixels[..., 0, 0, 0]) + 256 * np.round(pixels[..., 0, 0, 1])).astype(int)


def shard_record(encoded: bytes, label: int, extra_bytes: int = 0, **features) -> bytes:
    """A `tf.train.Example` with Model Garden's keys (and `extra_bytes` of filler)."""
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    if extra_bytes:
        filler = np.random.default_rng(label).bytes(extra_bytes)
        feature["filler"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[filler]))
    for key, value in features.items():
        feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(
    root, sizes, split: str = "train", first: int = 0, classes: int = 3, size: int = 8,
    extra_bytes: int = 0, labels_txt: bool = True,
) -> list[int]:  # fmt: skip
    """Shards `<split>-0000k-of-0000n` of `sizes[k]` numbered PNG images each (numbers from
    `first`, label = number % classes), and labels.txt; no shards.json. Returns the numbers."""
    from common import files

    numbers, n = [], first
    for k, count in enumerate(sizes):
        path = files.join(str(root), f"{split}-{k:05d}-of-{len(sizes):05d}")
        files.makedirs(str(root))
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(count):
                encoded = tf.io.encode_png(numbered_image(n, size)).numpy()
                writer.write(shard_record(encoded, n % classes, extra_bytes))
                numbers.append(n)
                n += 1
    if labels_txt:
        files.write_text(
            files.join(str(root), "labels.txt"), "".join(f"c{i}\n" for i in range(classes))
        )
    return numbers


def corrupt_record(path, index: int) -> None:
    """Flips a payload byte of record `index` of a TFRecord file: its CRC fails."""
    raw = bytearray(path.read_bytes())
    offset = 0
    for _ in range(index):  # each record: a length, its CRC, the payload, the payload's CRC
        offset += 16 + int.from_bytes(raw[offset : offset + 8], "little")
    raw[offset + 12 + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
