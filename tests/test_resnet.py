"""The ResNet family: parameter counts, stage shapes, weights, saving, learning."""

import ast
import pathlib

import h5py
import keras
import numpy as np
import pytest

from models import resnet, weights
from models.layers import FusedBatchNormalization, MatmulConv2D

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def trainable_params(model: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("arch", list(TORCHVISION_PARAMS))
def test_trainable_parameters_match_reference(arch):
    model = resnet.build(arch, num_classes=1000, input_shape=(None, None, 3))
    assert trainable_params(model) == TORCHVISION_PARAMS[arch]


def test_imagenet_stem_stage_shapes_on_32x32():
    model = resnet.resnet50(num_classes=10, input_shape=(32, 32, 3))
    shapes = {k: tuple(v.shape[1:]) for k, v in resnet.stage_outputs(model).items()}
    assert shapes == {
        "conv1": (16, 16, 64),
        "pool1": (8, 8, 64),
        "conv2": (8, 8, 256),
        "conv3": (4, 4, 512),
        "conv4": (2, 2, 1024),
        "conv5": (1, 1, 2048),
    }


def test_cifar_stem_stage_shapes_on_32x32():
    model = resnet.resnet50(num_classes=10, input_shape=(32, 32, 3), stem="cifar")
    shapes = {k: tuple(v.shape[1:3]) for k, v in resnet.stage_outputs(model).items()}
    assert shapes == {
        "conv1": (32, 32),
        "conv2": (32, 32),
        "conv3": (16, 16),
        "conv4": (8, 8),
        "conv5": (4, 4),
    }


def test_cifar_pool_stem_feeds_16x16_maps_into_conv2_on_32x32():
    model = resnet.resnet18(num_classes=10, input_shape=(32, 32, 3), stem="cifar_pool")
    shapes = {k: tuple(v.shape[1:]) for k, v in resnet.stage_outputs(model).items()}
    assert shapes == {
        "conv1": (32, 32, 64),
        "pool1": (16, 16, 64),
        "conv2": (16, 16, 64),
        "conv3": (8, 8, 128),
        "conv4": (4, 4, 256),
        "conv5": (2, 2, 512),
    }
    # Only the stem's conv differs from the ImageNet stem's: 3x3/1 instead of a padded 7x7/2.
    imagenet = resnet.resnet18(num_classes=10, input_shape=(32, 32, 3))
    assert model.get_layer("conv1_conv").kernel.shape == (3, 3, 3, 64)
    assert imagenet.get_layer("conv1_conv").kernel.shape == (7, 7, 3, 64)
    names = [layer.name for layer in imagenet.layers if layer.name != "conv1_pad"]
    assert [layer.name for layer in model.layers] == names


def test_unknown_stem_is_refused():
    with pytest.raises(ValueError, match="cifar_pool"):
        resnet.resnet18(num_classes=10, input_shape=(32, 32, 3), stem="tiny")


def test_layer_names_follow_keras_applications():
    model = resnet.resnet50(num_classes=10, input_shape=(32, 32, 3), stride_on="1x1")
    ours = {layer.name for layer in model.layers if layer.weights}
    ref = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    theirs = {layer.name for layer in ref.layers if layer.weights}
    assert ours == theirs


def test_stride_placement():
    v15 = resnet.resnet50(input_shape=(64, 64, 3))
    assert v15.get_layer("conv3_block1_2_conv").strides == (2, 2)
    assert v15.get_layer("conv3_block1_1_conv").strides == (1, 1)
    v1 = resnet.resnet50(input_shape=(64, 64, 3), stride_on="1x1")
    assert v1.get_layer("conv3_block1_1_conv").strides == (2, 2)
    assert v1.get_layer("conv3_block1_2_conv").strides == (1, 1)


def test_basic_block_projection_only_when_needed():
    model = resnet.resnet18(num_classes=10, input_shape=(32, 32, 3))
    names = {layer.name for layer in model.layers}
    assert "conv2_block1_0_conv" not in names  # 64 -> 64, stride 1: identity
    assert {"conv3_block1_0_conv", "conv4_block1_0_conv", "conv5_block1_0_conv"} <= names
    assert all(
        not layer.use_bias for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
    )


def _randomise_bn_statistics(model: keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                    rng.normal(0, 0.1, beta.shape).astype("float32"),
                    rng.normal(0, 0.1, mean.shape).astype("float32"),
                    rng.uniform(0.5, 1.5, var.shape).astype("float32"),
                ]
            )
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype("float32")])


@pytest.fixture(scope="module")
def keras_apps_h5(tmp_path_factory) -> tuple[pathlib.Path, np.ndarray, np.ndarray]:
    """keras.applications.ResNet50 with random BN statistics and conv biases, saved as
    legacy .h5 (the layout of the downloaded ImageNet file), plus its outputs on images."""
    rng = np.random.default_rng(0)
    ref = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=1000)
    _randomise_bn_statistics(ref, rng)
    path = tmp_path_factory.mktemp("weights") / "resnet50_keras_apps.h5"
    ref.save(path)
    images = rng.uniform(-1, 1, (4, 64, 64, 3)).astype("float32")
    features = keras.Model(ref.input, ref.get_layer("conv5_block3_out").output)
    expected = np.asarray(ref.predict(images, verbose=0))
    expected_features = np.asarray(features.predict(images, verbose=0))
    keras.backend.clear_session()
    return path, images, (expected, expected_features)


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def test_keras_applications_weights_give_the_same_function(keras_apps_h5):
    path, images, (expected, expected_features) = keras_apps_h5
    with h5py.File(path) as f:  # the file really is the legacy layout with conv biases
        assert "conv1_conv" in f["model_weights"].attrs["layer_names"].astype(str)
    model = resnet.resnet50(num_classes=1000, input_shape=(64, 64, 3), weights=str(path))
    assert model.get_layer("conv3_block1_1_conv").strides == (2, 2)  # 1x1 by default
    logits = np.asarray(model.predict(images, verbose=0))
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    assert _rel_err(probs, expected) < 1e-4
    backbone = resnet.resnet50(
        include_top=False, input_shape=(64, 64, 3), weights=str(path), num_classes=10
    )
    assert _rel_err(np.asarray(backbone.predict(images, verbose=0)), expected_features) < 1e-4


def test_fine_tuning_head_is_fresh(keras_apps_h5):
    path, _, _ = keras_apps_h5
    model = resnet.resnet50(num_classes=10, input_shape=(32, 32, 3), weights=str(path))
    assert model.get_layer("predictions").kernel.shape == (2048, 10)
    src = weights.read_layer_weights(str(path))
    np.testing.assert_array_equal(
        model.get_layer("conv2_block1_1_conv").kernel.numpy(), src["conv2_block1_1_conv"][0]
    )


def test_wrong_architecture_names_file_and_layer(keras_apps_h5):
    path, _, _ = keras_apps_h5
    with pytest.raises(weights.WeightsError, match=r"resnet50_keras_apps\.h5.*conv2_block1_1_conv"):
        resnet.resnet18(num_classes=10, input_shape=(32, 32, 3), weights=str(path))
    with pytest.raises(weights.WeightsError, match=r"conv4_block7_1_conv"):
        resnet.resnet101(num_classes=10, input_shape=(32, 32, 3), weights=str(path))


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    with pytest.raises(weights.WeightsError, match=r"corrupt\.h5"):
        resnet.resnet18(num_classes=10, input_shape=(32, 32, 3), weights=str(bad))
    with pytest.raises(weights.WeightsError, match="not found"):
        resnet.resnet18(weights=str(tmp_path / "missing.h5"))
    with pytest.raises(weights.WeightsError, match="no ImageNet weights for 'resnet18'"):
        resnet.resnet18(weights="imagenet")


def test_unknown_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown model 'resnet51'"):
        resnet.build("resnet51")
    with pytest.raises(ValueError, match="stem"):
        resnet.resnet18(stem="tiny")


def test_keras_file_roundtrip_and_weights_from_it(tmp_path):
    model = resnet.resnet18(num_classes=10, input_shape=(32, 32, 3), stem="cifar", dropout=0.2)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), reloaded.predict(x, verbose=0))
    warm = resnet.resnet18(num_classes=10, input_shape=(32, 32, 3), stem="cifar", weights=str(path))
    np.testing.assert_allclose(model.predict(x, verbose=0), warm.predict(x, verbose=0), atol=1e-6)


def test_one_training_step_lowers_the_loss():
    keras.utils.set_random_seed(0)
    model = resnet.resnet18(num_classes=10, input_shape=(16, 16, 3), stem="cifar")
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 8)
    before = model.evaluate(x, y, verbose=0)
    model.train_on_batch(x, y)
    assert model.evaluate(x, y, verbose=0) < before


def test_mixed_precision_logits_are_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = resnet.resnet18(num_classes=10, input_shape=(16, 16, 3), stem="cifar")
        assert model.get_layer("conv1_conv").compute_dtype == "bfloat16"
        assert model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_models_package_imports_no_tensorflow():
    """`models` builds with Keras alone: no module imports TensorFlow at import time (the
    fused batch norm imports it inside its TensorFlow-backend branch only)."""

    def module_level(nodes):
        for node in nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            yield node
            if isinstance(node, ast.ClassDef | ast.If | ast.Try | ast.With):
                yield from module_level(ast.iter_child_nodes(node))

    for path in pathlib.Path(resnet.__file__).parent.glob("*.py"):
        for node in module_level(ast.parse(path.read_text()).body):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "tensorflow" for n in names), path
    source = (pathlib.Path(resnet.__file__).parent / "layers.py").read_text()
    assert source.count("import tensorflow") == 1  # the one, after the backend check


@pytest.mark.parametrize(
    "size, kernel, strides, padding",
    [
        (4, 1, 1, "same"),  # plain 1x1
        (5, 1, 2, "valid"),  # strided 1x1 on an odd size
        (3, 3, 2, "valid"),  # one 3x3 patch: a 1x1 output
        (1, 3, 1, "same"),  # only the centre tap meets data
        (6, 3, 1, "same"),  # ordinary convolution
    ],
)
def test_matmul_conv_is_the_same_arithmetic_as_conv2d(size, kernel, strides, padding):
    """Outputs and gradients (input and kernel) equal the stock layer's."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, size, size, 8)).astype("float32"))
    plain = keras.layers.Conv2D(5, kernel, strides=strides, padding=padding, use_bias=False)
    fast = MatmulConv2D(5, kernel, strides=strides, padding=padding, use_bias=False)
    plain.build(x.shape)
    fast.build(x.shape)
    fast.set_weights(plain.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_plain, y_fast = plain(x), fast(x)
        weights = tf.range(1.0, 6.0)
        loss_plain, loss_fast = tf.reduce_sum(y_plain * weights), tf.reduce_sum(y_fast * weights)
    np.testing.assert_allclose(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        tape.gradient(loss_fast, [x, fast.kernel]),
        tape.gradient(loss_plain, [x, plain.kernel]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_trains_exactly_like_keras_batch_norm(policy):
    """Training outputs, gradients and moving statistics (biased variance) equal the stock
    layer's; inference is the stock code."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    keras.mixed_precision.set_global_policy(policy)
    try:
        plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1.001e-5)
        fused = FusedBatchNormalization(momentum=0.9, epsilon=1.001e-5)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = tf.constant(rng.standard_normal((8, 4, 4, 6)) * 3 + 1, plain.compute_dtype)
    plain.build(x.shape)
    fused.build(x.shape)
    start = [rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in plain.get_weights()]
    plain.set_weights(start)
    fused.set_weights(start)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_plain, y_fused = plain(x, training=True), fused(x, training=True)
        weights = tf.range(1.0, 7.0)
        loss_plain = tf.reduce_sum(tf.cast(y_plain, tf.float32) * weights)
        loss_fused = tf.reduce_sum(tf.cast(y_fused, tf.float32) * weights)
    assert y_fused.dtype == y_plain.dtype == x.dtype
    tol = 1e-5 if policy == "float32" else 2e-2  # bfloat16 outputs: 8 bits of mantissa
    np.testing.assert_allclose(np.float32(y_fused), np.float32(y_plain), rtol=tol, atol=tol)
    for a, b in zip(fused.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        tape.gradient(loss_fused, [x, *fused.trainable_weights]),
        tape.gradient(loss_plain, [x, *plain.trainable_weights]),
        strict=True,
    ):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(
        np.float32(fused(x, training=False)), np.float32(plain(x, training=False)), rtol=tol
    )


def test_fast_layers_save_and_reload_in_safe_mode(tmp_path):
    model = resnet.resnet18(num_classes=10, input_shape=(32, 32, 3))
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)  # safe mode: both classes are registered
    assert [type(layer) for layer in reloaded.layers] == [type(layer) for layer in model.layers]
    assert isinstance(reloaded.get_layer("conv2_block1_1_bn"), FusedBatchNormalization)
    assert isinstance(reloaded.get_layer("conv2_block1_1_conv"), MatmulConv2D)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_blocks_start_as_the_identity(arch):
    """zero_init_last: each block's last batch norm starts with gamma 0, so an identity block
    passes its input through; without it, every gamma starts at 1."""
    model = resnet.build(arch, num_classes=10, input_shape=(32, 32, 3))
    last = "conv2_block2_2_bn" if arch == "resnet18" else "conv2_block2_3_bn"
    assert not np.any(model.get_layer(last).gamma.numpy())
    assert np.all(model.get_layer("conv2_block2_1_bn").gamma.numpy() == 1)
    taps = keras.Model(
        model.input,
        [model.get_layer("conv2_block1_out").output, model.get_layer("conv2_block2_out").output],
    )
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    before, after = taps(x, training=False)
    np.testing.assert_array_equal(after, before)
    plain = resnet.build(arch, num_classes=10, input_shape=(32, 32, 3), zero_init_last=False)
    assert np.all(plain.get_layer(last).gamma.numpy() == 1)
