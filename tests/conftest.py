"""Shared fixtures: the real CIFAR-10 images in ../shared/data, quiet TensorFlow."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_DIR = SHARED_DATA / "cifar10"


@pytest.fixture
def cifar10_dir() -> pathlib.Path:
    """The real CIFAR-10 image-folder tree (train/<class>/*.jpg); skips when absent."""
    if not (CIFAR10_DIR / "train").is_dir():
        pytest.skip(f"real CIFAR-10 images not found at {CIFAR10_DIR} (set SHARED_DATA)")
    return CIFAR10_DIR


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    """Keeps layer-name counters and memory from leaking between tests."""
    yield
    keras.backend.clear_session()
