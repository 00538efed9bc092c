"""The benchmark helpers count and compute what they claim (no timing is asserted here)."""

import json

import keras
import numpy as np
import pytest

from bench import bench_int8, common, train_cases, variants
from common.errors import UsageError
from tests.helpers import run_program


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


def test_variants_swap_the_layers_both_ways_and_keep_the_function():
    from models import resnet
    from models.layers import FusedBatchNormalization, MatmulConv2D

    model = resnet.resnet18(num_classes=10, input_shape=(32, 32, 3))  # built with both
    plain = variants.convert(model, matmul_convs=False, fused_bn=False)
    kinds = {type(layer) for layer in plain.layers}
    assert keras.layers.Conv2D in kinds and keras.layers.BatchNormalization in kinds
    assert not kinds & {MatmulConv2D, FusedBatchNormalization}
    assert [layer.name for layer in plain.layers] == [layer.name for layer in model.layers]
    plain.set_weights(model.get_weights())
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(plain(x), model(x), rtol=1e-4, atol=1e-4)
    # keras.applications (a model nested in the case's wrapper) gets the fast layers too.
    inputs = keras.Input((32, 32, 3))
    net = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    fast = variants.convert(keras.Model(inputs, net(inputs)), matmul_convs=True, fused_bn=True)
    inner = {type(layer) for layer in fast.layers[-1].layers}
    assert {MatmulConv2D, FusedBatchNormalization} <= inner
    assert keras.layers.BatchNormalization not in inner


def test_case_names_parse_and_bad_ones_fail_with_one_line():
    case = train_cases.Case.parse("ours-imagenet-bf16+spe8+mm")
    assert (case.model, case.stem, case.policy) == ("ours", "imagenet", "mixed_bfloat16")
    assert case.steps_per_execution == 8 and case.matmul_convs and not case.jit_compile
    assert train_cases.Case.parse("keras-up128-f32+xla").jit_compile
    assert train_cases.Case.parse("ours18-cifar-f32").model == "ours18"
    pooled = train_cases.Case.parse("ours18-cifar_pool-bf16+mm+fbn+fsgd")
    assert pooled.stem == "cifar_pool" and pooled.fused_sgd and pooled.fused_bn
    assert not train_cases.Case.parse("ours-imagenet-f32").fused_sgd
    for bad in (
        "ours-imagenet",
        "keras-cifar-f32",
        "keras-cifar_pool-f32",
        "ours-up128-f32",
        "ours-imagenet-f32+fast",
        "keras-imagenet-f32+v1",
    ):
        with pytest.raises(UsageError, match="bad case"):
            train_cases.Case.parse(bad)


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


def test_int8_table_pairs_each_calibration_set():
    rows = [
        bench_int8.Row(-1, "weights only", 0.995, 10, 0.01, 0.8, 6),
        bench_int8.Row(0, "converter", 0.98, 40, 0.034, 0.8, 30),
        bench_int8.Row(0, "exact", 0.985, 30, 0.031, 0.8, 22),
        bench_int8.Row(1, "exact", 0.99, 20, 0.029, None),
        bench_int8.Row(1, "converter", 0.975, 50, 0.035, None),
    ]
    lines = bench_int8.report_table(rows).splitlines()
    assert lines[2] == (
        "| set 1 | 98.00% (40 differ, 30 where Keras is wrong) "
        "| 98.50% (30 differ, 22 where Keras is wrong) | 0.0340 -> 0.0310 |"
    )
    assert lines[3] == "| set 2 | 97.50% (50 differ) | 99.00% (20 differ) | 0.0350 -> 0.0290 |"
    assert lines[5] == (
        "Weights alone rounded to int8 (activations float): "
        "99.50% (10 differ, 6 where Keras is wrong), mean L1 0.0100."
    )


def test_weights_rounded_to_int8_per_output_channel_and_nothing_else():
    from tensorflow.lite.tools import flatbuffer_utils

    from export import tflite
    from models import preprocessing as preprocessing_lib

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="predictions")(x))
    kernel, bias = model.get_layer("conv").get_weights()
    kernel[..., 0] *= 100.0  # channels far apart in scale: one scale for all would show
    model.get_layer("conv").set_weights([kernel, bias])
    float32 = tflite.convert(model, preprocessing_lib.cifar(8), ["float32"])["float32"]
    rounded = bench_int8.round_weights_to_int8(float32)

    def constants(blob: bytes) -> dict[str, np.ndarray]:
        m = flatbuffer_utils.read_model_from_bytearray(blob)
        found = {}
        for t in m.subgraphs[0].tensors:
            data = m.buffers[t.buffer].data
            if data is not None and t.type == 0:  # float32 constants
                found[t.name] = np.frombuffer(bytes(data), np.float32).reshape(t.shape)
        return found

    before, after = constants(float32), constants(rounded)
    assert before.keys() == after.keys()
    kernels = [name for name, value in before.items() if value.ndim >= 2]
    assert len(kernels) == 2  # conv and dense; biases and the normalisation stay as they were
    for name, old in before.items():
        new = after[name]
        if name not in kernels:
            np.testing.assert_array_equal(new, old)
            continue
        assert not np.array_equal(old, new)
        for channel_old, channel_new in zip(old, new, strict=True):  # output channel first
            step = np.abs(channel_old).max() / 127
            assert np.abs(channel_new - channel_old).max() <= step / 2 + 1e-7
            np.testing.assert_allclose(channel_new / step, np.round(channel_new / step), atol=1e-3)


@pytest.mark.slow
def test_profile_fit_stamps_every_step_through_the_callbacks_of_train(tmp_path, cifar10_dir):
    """bench.profile_fit adds its callback through `training.train(callbacks=...)` and takes
    the fitted model and dataset from the result: no patching of the training library."""
    model_dir = tmp_path / "run"
    proc = run_program(
        "bench.profile_fit",
        "--flagfile=app/configs/cifar10_cpu_quick.flags",
        f"--data_dir={cifar10_dir}",
        f"--model_dir={model_dir}",
        "--model=resnet18",
        "--image_size=16",
        "--train_limit=288",
        "--eval_limit=64",
        "--batch_size=32",
        "--epochs=2",
        "--step_only_steps=10",
        "--mixed_precision=none",
        "--verbose=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((model_dir / "metrics.json").read_text())["steps_per_epoch"]
    assert f"{steps} steps in epoch 2 of 2" in proc.stdout
    assert "| the bare step (8 cached real batches, no callbacks) |" in proc.stdout
