"""Shared fixtures: the real CIFAR-10 images (see tests/helpers.py), quiet TensorFlow."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pytest

from tests.helpers import require_cifar10


@pytest.fixture
def cifar10_dir() -> pathlib.Path:
    """The real CIFAR-10 image-folder tree (train/<class>/*.jpg); skips when absent."""
    return require_cifar10()


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    """Keeps layer-name counters and memory from leaking between tests."""
    yield
    keras.backend.clear_session()
