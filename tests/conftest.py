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
# The `trained_model_dir` model: ResNet-18 at 16x16 fitted on 200 real CIFAR-10 images.
TRAINED_IMAGE_SIZE, TRAINED_IMAGES, TRAINED_EPOCHS = 16, 200, 4


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
    """A model directory as app.train leaves it: best.keras, labels.txt,
    preprocessing.json and flags.txt, from a ResNet-18 fitted on real CIFAR-10 images.

    Session-scoped: training takes about a minute, and the files are only read (or copied).
    """
    from app import data
    from models import preprocessing, resnet
    from models.bundle import write_labels

    cifar10 = require_cifar10()
    directory = tmp_path_factory.mktemp("model")
    config = data.DataConfig(
        data_dir=str(cifar10), train_limit=TRAINED_IMAGES, eval_limit=1, seed=0
    )
    splits = data.load(config)
    prep = preprocessing.cifar(TRAINED_IMAGE_SIZE)
    keras.utils.set_random_seed(0)
    model = resnet.resnet18(
        num_classes=len(splits.class_names),
        input_shape=(TRAINED_IMAGE_SIZE, TRAINED_IMAGE_SIZE, 3),
        stem="cifar",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batch = 25
    model.fit(
        data.train_dataset(splits.train, prep, batch, seed=0, augment=False),
        steps_per_epoch=data.steps_per_epoch(splits.train, batch),
        epochs=TRAINED_EPOCHS,
        shuffle=False,  # the pipeline orders each epoch itself
        verbose=0,
    )
    model.save(directory / "best.keras")
    write_labels(str(directory), splits.class_names)
    prep.save(str(directory))
    (directory / "flags.txt").write_text(
        f"# training run\n--data_dir={cifar10}\n--validation_split=0.1\n--seed=0\n"
    )
    keras.backend.clear_session()
    return directory
