"""The .tflite models: builtin ops only, parity with Keras, the int8 contract, errors; the
shared float32 graph and the uint8 model input every format is compared on.

Uses an untrained, randomised ResNet-18 (the `resnet18` fixture) or a tiny conv net.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.errors import UsageError
from export import graph, tflite
from export.model_input import to_model_input
from models import preprocessing as preprocessing_lib
from tests.helpers import keras_reference, random_images, tiny_model

# Builtin LiteRT op types a ResNet classifier needs; anything else (Flex*, CUSTOM) fails.
RESNET_BUILTIN_OPS = {
    "ADD",
    "CONV_2D",
    "DEQUANTIZE",
    "FULLY_CONNECTED",
    "MAX_POOL_2D",
    "MEAN",
    "MUL",
    "PAD",
    "QUANTIZE",
    "STRIDED_SLICE",
    "SOFTMAX",
    "SUB",
}


def test_float32_tflite_matches_keras_with_builtin_ops_only(resnet18, tmp_path):
    blobs = tflite.convert(resnet18.model, resnet18.preprocessing, ["float32"])
    path = tmp_path / tflite.filename("float32")
    path.write_bytes(blobs["float32"])
    ops = tflite.op_names(str(path))
    assert ops <= RESNET_BUILTIN_OPS, ops - RESNET_BUILTIN_OPS

    classifier = tflite.TFLiteClassifier(str(path))
    assert (classifier.image_size, classifier.input_dtype, classifier.num_classes) == (
        32,
        np.float32,
        10,
    )
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    assert signatures == {"serving_default": {"inputs": ["images"], "outputs": ["probabilities"]}}

    images = random_images(16, 32, 32, seed=3)
    probabilities = classifier.predict(images)
    ref = keras_reference(resnet18.model, resnet18.preprocessing, images)
    np.testing.assert_array_equal(probabilities.argmax(-1), ref.argmax(-1))
    np.testing.assert_array_less(np.abs(probabilities - ref), 1e-4)


@pytest.mark.parametrize("normalization", ["cifar", "imagenet"])
def test_int8_tflite_takes_raw_uint8_pixels(normalization, tmp_path):
    # Calibration images spanning only 20..200 must not change the input contract.
    model, pre = tiny_model(), preprocessing_lib.by_name(normalization, 32)

    def dim(images: np.ndarray) -> np.ndarray:
        return (20 + images.astype(np.float32) * (180 / 255)).round().astype(np.uint8)

    blobs = tflite.convert(model, pre, ["float32", "int8"], dim(random_images(64, 32, 32)))
    assert tflite.input_quantization(blobs["int8"]) == (1.0, 0)
    for fmt, blob in blobs.items():
        assert tflite.op_names(blob) <= RESNET_BUILTIN_OPS
        (tmp_path / tflite.filename(fmt)).write_bytes(blob)
    int8 = tflite.TFLiteClassifier(str(tmp_path / tflite.filename("int8")))
    assert int8.input_dtype == np.uint8
    images = dim(random_images(8, 32, 32, seed=5))
    ref = keras_reference(model, pre, images)
    float32 = tflite.TFLiteClassifier(str(tmp_path / tflite.filename("float32")))
    np.testing.assert_array_less(np.abs(float32.predict(images) - ref), 1e-4)
    probabilities = int8.predict(images)
    np.testing.assert_array_less(np.abs(probabilities - ref), 0.1)

    # What a phone app does: the pixel bytes straight into the input tensor, nothing else.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=blobs["int8"])
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.set_tensor(inp["index"], images[:1])
    interpreter.invoke()
    np.testing.assert_array_equal(interpreter.get_tensor(out["index"])[0], probabilities[0])


def test_int8_ranges_are_each_tensors_own():
    # A residual ADD may write its output over its branch input; TensorFlow's calibrator then
    # records the branch with the sum's range (tensorflow/tensorflow#127842), here about 20x
    # too coarse. Every ADD input must be quantized over the range it really takes.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3), name="images")
    trunk = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="trunk")(inputs)
    branch = keras.layers.Conv2D(8, 1, name="branch")(trunk)
    x = keras.layers.Activation("relu")(keras.layers.Add()([trunk, branch]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="predictions")(x))
    kernel, bias = model.get_layer("branch").get_weights()
    model.get_layer("branch").set_weights([0.05 * kernel, bias])
    pre = preprocessing_lib.by_name("cifar", 16)
    calibration = random_images(32, 16, 16)
    blobs = tflite.convert(model, pre, ["float32", "int8"], calibration)

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    def interpreter(blob: bytes) -> Interpreter:
        it = Interpreter(
            model_content=blob,
            experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        it.allocate_tensors()
        return it

    float32 = interpreter(blobs["float32"])
    spans: dict[str, list[float]] = {}
    for image in calibration:
        float32.set_tensor(float32.get_input_details()[0]["index"], image[None].astype(np.float32))
        float32.invoke()
        for t in float32.get_tensor_details():
            values = float32.get_tensor(t["index"])
            low, high = spans.get(t["name"], (0.0, 0.0))  # quantized ranges include 0
            spans[t["name"]] = [min(low, float(values.min())), max(high, float(values.max()))]
    int8 = interpreter(blobs["int8"])
    tensors = {t["index"]: t for t in int8.get_tensor_details()}
    adds = [op for op in int8._get_ops_details() if op["op_name"] == "ADD"]
    assert len(adds) == 1
    checked = []
    for index in [*adds[0]["inputs"], *adds[0]["outputs"]]:
        scale, _ = tensors[index]["quantization"]
        low, high = spans[tensors[index]["name"]]
        assert scale * 255 == pytest.approx(high - low, rel=0.01), tensors[index]["name"]
        checked.append(high - low)
    assert min(checked) < max(checked) / 5  # the branch is much narrower than the sum


def test_int8_needs_calibration_images(resnet18):
    with pytest.raises(UsageError, match="needs calibration images"):
        tflite.convert(resnet18.model, resnet18.preprocessing, ["int8"], None)
    with pytest.raises(UsageError, match=r"uint8 \[n, 32, 32, 3\]"):
        tflite.convert(
            resnet18.model, resnet18.preprocessing, ["int8"], np.zeros((4, 64, 64, 3), np.uint8)
        )


def test_tflite_classifier_rejects_bad_files_and_images(tmp_path):
    with pytest.raises(UsageError, match="TFLite model not found"):
        tflite.TFLiteClassifier(str(tmp_path / "missing.tflite"))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(UsageError, match="is not a TFLite model"):
        tflite.TFLiteClassifier(str(junk))

    path = tmp_path / "model.tflite"
    path.write_bytes(
        tflite.convert(tiny_model(), preprocessing_lib.cifar(32), ["float32"])["float32"]
    )
    classifier = tflite.TFLiteClassifier(str(path))
    for bad in (np.zeros((1, 32, 32, 3), np.float64), np.zeros((1, 48, 48, 3), np.uint8)):
        with pytest.raises(UsageError, match=r"takes uint8 or float32 images \[n, 32, 32, 3\]"):
            classifier.predict(bad)
    images = random_images(2, 32, 32)
    np.testing.assert_array_equal(
        classifier.predict(images), classifier.predict(images.astype(np.float32))
    )


def test_float32_model_rebuilds_a_mixed_precision_model():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = tiny_model()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert mixed.layers[1].dtype_policy.compute_dtype == "bfloat16"
    rebuilt = graph.float32_model(mixed)
    assert all(layer.dtype_policy.compute_dtype == "float32" for layer in rebuilt.layers)
    for a, b in zip(mixed.get_weights(), rebuilt.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(rebuilt.predict(x, verbose=0), mixed.predict(x, verbose=0), atol=0.1)
    float32 = tiny_model()
    assert graph.float32_model(float32) is float32


def test_model_input_is_the_shared_resize_rounded_to_uint8():
    odd, native = random_images(1, 45, 27, seed=1)[0], random_images(1, 32, 32, seed=2)[0]
    out = to_model_input([odd, native], 32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    resized = tf.image.resize(tf.cast(odd, tf.float32), (32, 32), method="bilinear").numpy()
    np.testing.assert_array_equal(out[0], np.clip(np.round(resized), 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(out[1], native)  # the model's size: unchanged
    batch = random_images(3, 40, 40, seed=3)  # one array: resized a batch at a time
    np.testing.assert_array_equal(to_model_input(batch, 32), to_model_input(list(batch), 32))
    assert to_model_input(batch[:0], 32).shape == (0, 32, 32, 3)
