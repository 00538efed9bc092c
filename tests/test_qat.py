"""Quantization-aware fine-tuning (`models.qat`, `app.train --qat`)."""

import json
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from app.training import recipe
from export import tflite
from models import preprocessing as preprocessing_lib
from models import qat, resnet
from tests.helpers import (
    final_digest,
    random_images,
    randomise,
    run_train,
    start_train,
    wait_for_backup,
)

# Ops of a full-int8 model that store their output in a scale of their own (the rest keep
# their input's: PAD, RESHAPE, MAX_POOL_2D, STRIDED_SLICE; or are the fixed-scale ends).
STORING_OPS = {"CONV_2D", "FULLY_CONNECTED", "ADD", "MEAN", "MUL", "SUB"}


def _rounding_layers(twin: keras.Model) -> list[qat.ActivationFakeQuant]:
    body = [layer for layer in twin.layers if isinstance(layer, keras.Model)]
    everything = twin.layers + [layer for model in body for layer in model.layers]
    return [layer for layer in everything if isinstance(layer, qat.ActivationFakeQuant)]


def test_twin_rounds_exactly_the_tensors_int8_litert_stores():
    keras.utils.set_random_seed(0)
    model = randomise(resnet.build("resnet18", num_classes=10, input_shape=(16, 16, 3)))
    pre = preprocessing_lib.by_name("cifar", 16)
    calibration = random_images(32, 16, 16, seed=1)
    recipe.freeze_batch_norm(model)
    twin = qat.quantized_twin(model)
    rounding = _rounding_layers(twin)
    for layer in rounding:
        layer.momentum = 0.0  # one batch sets each range to its min/max over the batch
    twin(pre(calibration.astype(np.float32)), training=True)

    from ai_edge_litert.interpreter import Interpreter

    int8 = Interpreter(model_content=tflite.convert(model, pre, ["int8"], calibration)["int8"])
    int8.allocate_tensors()
    stored = {}  # output tensor name -> width of its int8 range
    for op in int8._get_ops_details():
        if op["op_name"] in STORING_OPS:
            tensor = int8._get_tensor_details(op["outputs"][0], 0)
            stored[tensor["name"]] = 255 * tensor["quantization"][0]
    # The normalisation (x - mean) / std is two ops in LiteRT; the twin rounds its result only.
    stored.pop(next(name for name in stored if name == "sub"))
    widths = sorted(float(layer.range_max - layer.range_min) for layer in rounding)
    assert len(widths) == len(stored) == 31  # 20 convolutions, 8 adds, pool, logits, input
    # The same tensors (each range within a few % of the one LiteRT calibrated: the twin
    # measures it on rounded inputs, the converter on float ones).
    np.testing.assert_allclose(widths, sorted(stored.values()), rtol=0.03)
    assert {layer.name for layer in rounding} >= {
        "input_fq",
        "conv1_relu_fq",
        "conv2_block1_2_bn_fq",  # the residual branch before its ADD
        "conv3_block1_0_bn_fq",  # the projection shortcut
        "conv2_block1_out_fq",  # ADD + ReLU, fused
        "avg_pool_fq",
        "predictions_fq",
    }
    assert not {"conv1_conv_fq", "conv1_bn_fq", "pool1_pool_fq", "conv2_block1_add_fq"} & {
        layer.name for layer in rounding
    }


def test_twin_shares_every_weight_with_the_float_model():
    keras.utils.set_random_seed(0)
    model = randomise(resnet.build("resnet18", num_classes=10, input_shape=(16, 16, 3)))
    twin = qat.quantized_twin(model)
    assert {id(v) for v in twin.trainable_variables} == {id(v) for v in model.trainable_variables}
    images = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    twin(images, training=True)  # sets the ranges
    before = np.asarray(twin(images))
    conv = model.get_layer("conv2_block1_1_conv")
    conv.kernel.assign(-conv.kernel)  # in the float model
    assert np.abs(np.asarray(twin(images)) - before).max() > 0.1  # the twin computes with it


def test_kernels_round_per_output_channel_with_the_gradient_passed_through():
    rng = np.random.default_rng(0)
    dense = keras.layers.Dense(3, use_bias=False)
    dense.build((None, 4))
    kernel = rng.normal(size=(4, 3)).astype(np.float32) * np.array([1.0, 0.01, 100.0])
    dense.set_weights([kernel])
    wrapped = qat.Int8Kernel(dense)
    step = np.abs(kernel).max(axis=0) / 127  # each output channel its own scale
    rounded = np.round(kernel / step) * step
    x = np.eye(4, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(wrapped(x)), rounded, rtol=1e-6)
    assert not np.allclose(rounded, kernel, rtol=1e-4)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(wrapped(x))
    np.testing.assert_allclose(tape.gradient(total, dense.kernel.value), np.ones((4, 3)))


def test_activation_range_starts_at_the_first_batch_then_moves_slowly():
    layer = qat.ActivationFakeQuant(momentum=0.9)
    first = np.linspace(1.0, 3.0, 12, dtype=np.float32).reshape(3, 4)
    layer(first, training=True)
    # Widened to hold 0, as the converter does.
    assert (float(layer.range_min), float(layer.range_max)) == (0.0, 3.0)
    layer(first * 11.0, training=True)
    assert float(layer.range_max) == pytest.approx(0.9 * 3.0 + 0.1 * 33.0)
    stored = float(layer.range_max)
    out = np.asarray(layer(np.array([[1e6, 1.01, -5.0]], np.float32)))  # inference: no update
    assert float(layer.range_max) == stored
    step = stored / 255
    assert out[0, 0] == pytest.approx(stored, abs=step)  # clipped to the range
    assert out[0, 1] == pytest.approx(round(1.01 / step) * step, abs=1e-5)  # on the grid
    assert out[0, 2] == 0.0


def test_agreement_loss_is_cross_entropy_plus_kl_to_the_float_probabilities():
    rng = np.random.default_rng(0)
    labels = np.array([0, 2, 1])
    float_logits = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    int8_logits = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    loss = qat.AgreementLoss(weight=2.0)
    cross_entropy = keras.losses.sparse_categorical_crossentropy(
        labels, float_logits, from_logits=True
    )
    same = loss.call(labels, tf.stack([float_logits, float_logits], 1))
    np.testing.assert_allclose(same, cross_entropy, rtol=1e-5)  # no KL between equals
    smoothed = qat.AgreementLoss(label_smoothing=0.1).call(labels, tf.stack([float_logits] * 2, 1))
    training_loss = recipe.SparseCategoricalCrossentropyWithSmoothing(0.1).call(
        labels, float_logits
    )
    np.testing.assert_allclose(smoothed, training_loss, rtol=1e-5)  # the training loss's CE
    p, q = tf.nn.softmax(float_logits), tf.nn.softmax(int8_logits)
    kl = tf.reduce_sum(p * (tf.math.log(p) - tf.math.log(q)), -1)
    got = loss.call(labels, tf.stack([float_logits, int8_logits], 1))
    np.testing.assert_allclose(got, cross_entropy + 2.0 * kl, rtol=1e-5)
    # The KL term trains the int8 side only: the float logits get the cross-entropy's gradient.
    with tf.GradientTape() as tape:
        tape.watch(float_logits)
        total = tf.reduce_sum(loss.call(labels, tf.stack([float_logits, int8_logits], 1)))
    np.testing.assert_allclose(
        tape.gradient(total, float_logits), p - tf.one_hot(labels, 4), atol=1e-6
    )


@pytest.mark.slow
def test_qat_fine_tunes_a_run_into_a_plain_float_model(tmp_path, cifar10_dir):
    common = (
        f"--data_dir={cifar10_dir}",
        "--model=resnet18",
        "--batch_size=32",
        "--train_limit=256",
        "--eval_limit=64",
        "--verbose=0",
        "--deterministic",
    )
    base, tuned = tmp_path / "base", tmp_path / "qat"
    result = run_train(base, *common, "--epochs=1", "--lr=0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    qat_flags = (
        *common,
        f"--pretrained={base / 'best.keras'}",
        "--qat",
        "--epochs=2",
        "--lr=0.005",
        "--mixed_precision=none",
        "--backup_every_steps=4",
    )
    result = run_train(tuned, *qat_flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Val int8 Agreement:" in result.stdout

    # Killed mid-epoch and resumed (the twin's ranges are in the backup): the same weights.
    killed = tmp_path / "killed"
    proc = start_train(killed, *qat_flags)
    wait_for_backup(killed, (0, 3), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_train(killed, *qat_flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout
    assert final_digest(resumed.stdout) == final_digest(result.stdout)
    history = json.loads((tuned / "metrics.json").read_text())["history"]
    for row in history:
        for key in ("int8_accuracy", "agreement", "val_int8_accuracy", "val_agreement"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
    header = (tuned / "history.csv").read_text().splitlines()[0]
    assert header.endswith("int8_accuracy,agreement,val_int8_accuracy,val_agreement")

    before = keras.saving.load_model(base / "best.keras", compile=False)
    after = keras.saving.load_model(tuned / "best.keras", compile=False)
    # A plain float model: the same layers, no rounding layers, float32 compute.
    assert [layer.name for layer in after.layers] == [layer.name for layer in before.layers]
    assert all(layer.dtype_policy.compute_dtype == "float32" for layer in after.layers)
    # Convolutions fine-tuned; batch norm frozen (int8 folds its moving statistics).
    conv, bn = "conv2_block1_1_conv", "conv2_block1_1_bn"
    assert not np.allclose(after.get_layer(conv).kernel, before.get_layer(conv).kernel)
    for mine, theirs in zip(after.get_layer(bn).weights, before.get_layer(bn).weights, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert os.path.isfile(tuned / "flags.txt")
    assert "--qat\n" in (tuned / "flags.txt").read_text()
