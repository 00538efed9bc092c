"""The benchmark helpers count and compute what they claim (no timing is asserted here)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from app.common import UsageError
from bench import bench_train, common, fused_bn, matmul_conv


def test_forward_flops_counts_conv_depthwise_and_dense_exactly():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8x8 out
    x = keras.layers.Conv2D(6, 1, strides=2)(x)  # 4x4 out
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)  # 4x4x12
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(5)(x)
    model = keras.Model(inputs, x)
    expected = 2 * (64 * 9 * 3 * 4 + 16 * 1 * 4 * 6 + 16 * 9 * 12 + 12 * 5)
    assert common.forward_flops(model) == expected
    assert common.training_flops(model) == 3 * expected


def test_forward_flops_of_resnet50_matches_the_published_figure():
    # keras.applications.ResNet50 at 224x224: 3.86 G multiply-adds (conv + dense).
    model = keras.applications.ResNet50(weights=None)
    assert common.forward_flops(model) / 2e9 == pytest.approx(3.858, abs=0.002)


@pytest.mark.parametrize(
    "size, kernel, strides, padding",
    [
        (4, 1, 1, "same"),  # plain 1x1
        (5, 1, 2, "same"),  # strided 1x1 on an odd size
        (4, 1, 2, "valid"),
        (4, 3, 2, "valid"),  # one output position: a single patch
        (1, 3, 1, "same"),  # 1x1 input: only the centre tap meets data
        (6, 3, 1, "same"),  # not matmul-shaped: the ordinary convolution
    ],
)
def test_matmul_conv_is_the_same_arithmetic_as_conv2d(size, kernel, strides, padding):
    inputs = keras.Input((size, size, 5))
    conv = keras.Model(inputs, keras.layers.Conv2D(7, kernel, strides, padding)(inputs))
    fast = matmul_conv.convert(conv)
    assert isinstance(fast.layers[-1], matmul_conv.MatmulConv2D)
    fast.set_weights(conv.get_weights())
    x = tf.constant(np.random.default_rng(0).standard_normal((3, size, size, 5)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_conv, y_fast = conv(x), fast(x)
        loss_conv = tf.reduce_sum(y_conv * tf.range(1.0, 1.0 + y_conv.shape[-1]))
        loss_fast = tf.reduce_sum(y_fast * tf.range(1.0, 1.0 + y_fast.shape[-1]))
    np.testing.assert_allclose(y_fast, y_conv, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        tape.gradient(loss_fast, [x, *fast.trainable_weights]),
        tape.gradient(loss_conv, [x, *conv.trainable_weights]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_matmul_resnet50_matches_the_convolution_model():
    from models import resnet

    model = resnet.resnet50(num_classes=10, input_shape=(32, 32, 3))
    fast = matmul_conv.convert(model)
    fast.set_weights(model.get_weights())
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        fast(x, training=False), model(x, training=False), rtol=1e-4, atol=1e-4
    )


def test_matmul_conv_model_saves_and_reloads_in_safe_mode(tmp_path):
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(4, 1, strides=2)(inputs)
    fast = matmul_conv.convert(keras.Model(inputs, keras.layers.Conv2D(5, 2)(x)))
    path = str(tmp_path / "fast.keras")
    fast.save(path)
    reloaded = keras.saving.load_model(path)  # safe mode: the layer class is registered
    assert [type(layer) for layer in reloaded.layers] == [type(layer) for layer in fast.layers]
    x = np.random.default_rng(2).standard_normal((2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(reloaded(x), fast(x), rtol=1e-6)


def test_fused_batch_norm_trains_exactly_like_keras_batch_norm():
    inputs = keras.Input((4, 4, 6))
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1.001e-5)
    model = keras.Model(inputs, keras.layers.Activation("relu")(bn(inputs)))
    fused = fused_bn.convert(model)
    assert isinstance(fused.layers[1], fused_bn.FusedBatchNormalization)
    rng = np.random.default_rng(3)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in model.get_weights()]
    model.set_weights(weights)
    fused.set_weights(weights)
    x = tf.constant(rng.standard_normal((8, 4, 4, 6)) * 3 + 1, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_plain, y_fused = model(x, training=True), fused(x, training=True)
        loss_plain = tf.reduce_sum(y_plain * tf.range(1.0, 7.0))
        loss_fused = tf.reduce_sum(y_fused * tf.range(1.0, 7.0))
    np.testing.assert_allclose(y_fused, y_plain, rtol=1e-5, atol=1e-5)
    # Moving mean and variance (the biased one, as Keras keeps it) after one training call.
    for a, b in zip(fused.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(
        tape.gradient(loss_fused, [x, *fused.trainable_weights]),
        tape.gradient(loss_plain, [x, *model.trainable_weights]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        fused(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-6
    )


def test_case_names_parse_and_bad_ones_fail_with_one_line():
    case = bench_train.Case.parse("ours-imagenet-bf16+spe8+mm")
    assert (case.model, case.stem, case.policy) == ("ours", "imagenet", "mixed_bfloat16")
    assert case.steps_per_execution == 8 and case.matmul_convs and not case.jit_compile
    assert bench_train.Case.parse("keras-up128-f32+xla").jit_compile
    assert bench_train.Case.parse("ours18-cifar-f32").model == "ours18"
    for bad in (
        "ours-imagenet",
        "keras-cifar-f32",
        "ours-up128-f32",
        "ours-imagenet-f32+fast",
        "keras-imagenet-f32+v1",
    ):
        with pytest.raises(UsageError, match="bad case"):
            bench_train.Case.parse(bad)


def test_table_and_stats():
    stats = common.Stats.of([3.0, 1.0, 2.0])
    assert (stats.median, stats.low, stats.high, stats.n) == (2.0, 1.0, 3.0, 3)
    assert common.median_range(stats, scale=10) == "20 (10–30)"
    text = common.table(["a", "b"], [(1, 2.5), ("x", 1234.0)])
    assert text.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 2.5 |", "| x | 1234 |"]
    with pytest.raises(ValueError):
        common.Stats.of([])


def test_peak_rss_is_the_childs_own_not_its_parents():
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    parent = np.ones(800 * 2**20 // 8)  # touched: the parent's peak is >= 800 MiB
    child = (
        "import numpy as np; from bench import bench_memory; "
        "a = np.ones(300 * 2**20 // 8); del a; print(bench_memory.peak_rss_bytes())"
    )
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, check=True, cwd=repo
    )
    peak_mib = int(done.stdout.split()[-1]) / 2**20
    assert 300 <= peak_mib < 700, peak_mib
    del parent
