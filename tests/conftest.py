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


# --- export, evaluation and prediction ---------------------------------------------------

# The class names of the `resnet18` bundle.
RESNET18_CLASSES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """A saved ResNet-18 bundle (CIFAR stem, 32x32, randomised so its probabilities are far
    from uniform), loaded back as `models.bundle.ModelBundle`."""
    from models import preprocessing, resnet
    from models.bundle import load_model_bundle
    from tests.helpers import randomise, save_bundle

    keras.utils.set_random_seed(1)
    model = randomise(
        resnet.build("resnet18", num_classes=10, input_shape=(32, 32, 3), stem="cifar")
    )
    path = save_bundle(
        tmp_path_factory.mktemp("resnet18"), model, preprocessing.cifar(32), RESNET18_CLASSES
    )
    return load_model_bundle(path)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> pathlib.Path:
    """A model directory as `python -m app.train` writes it (best.keras, labels.txt,
    preprocessing.json, flags.txt, ...): a ResNet-18 at 16x16 trained on 200 real CIFAR-10
    images for 4 epochs with the quick recipe's optimizer.

    Session-scoped: training takes about a minute, and the files are only read (or added to).
    """
    from tests.helpers import run_train

    cifar10 = require_cifar10()
    directory = tmp_path_factory.mktemp("model") / "run"
    proc = run_train(
        directory,
        "--flagfile=app/configs/cifar10_cpu_quick.flags",
        f"--model_dir={directory}",  # after the recipe, which names its own
        f"--data_dir={cifar10}",
        "--train_limit=200",
        "--eval_limit=50",
        "--model=resnet18",
        "--stem=cifar",
        "--image_size=16",
        "--epochs=4",
        "--batch_size=25",
        "--lr=0.05",
        "--warmup_epochs=0",
        "--mixed_precision=none",
        "--backup_every_steps=0",
        "--verbose=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return directory
