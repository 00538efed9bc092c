"""TFLite metadata: read back, outputs unchanged, and MediaPipe's ImageClassifier (the C++
task Android and iOS apps run) classifying with every exported `.tflite` as Keras does.

Uses a tiny conv net with a confident head, so that quantization does not flip top-1s.
"""

from __future__ import annotations

import numpy as np
import pytest
from tensorflow.lite.tools import flatbuffer_utils

from common.errors import UsageError
from export import TFLITE_FORMATS, all_formats, metadata, model_input, tflite
from models import preprocessing as preprocessing_lib
from models.bundle import load_model_bundle
from tests.helpers import keras_reference, random_images, save_bundle, tiny_model

CLASSES = [f"class_{i}" for i in range(10)]


def confident_model(size: int = 32):
    model = tiny_model(size=size)
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    head.set_weights([20 * kernel, bias])  # clear leads: the test checks top-1, not ties
    return model


def test_metadata_reads_back_and_leaves_outputs_bit_identical(tmp_path):
    model, pre = confident_model(16), preprocessing_lib.cifar(16)
    blobs = tflite.convert(model, pre, ["float32", "int8"], random_images(16, 16, 16))
    info = metadata.ModelInfo("tiny", "7", author="Someone", license="Apache-2.0")
    pixels = random_images(6, 16, 16, seed=2)
    for fmt, blob in blobs.items():
        plain, tagged = tmp_path / f"plain_{fmt}.tflite", tmp_path / f"tagged_{fmt}.tflite"
        plain.write_bytes(blob)
        tagged.write_bytes(metadata.add_metadata(blob, CLASSES, info))
        np.testing.assert_array_equal(
            tflite.TFLiteClassifier(str(tagged)).predict(pixels),
            tflite.TFLiteClassifier(str(plain)).predict(pixels),
        )
        found = metadata.read_metadata(str(tagged))
        assert (found.name, found.version, found.author, found.license) == (
            "tiny",
            "7",
            "Someone",
            "Apache-2.0",
        )
        assert "10 classes" in found.description and found.min_parser_version == "1.0.0"
        assert found.labels == CLASSES
        assert (found.color_space, found.mean, found.std) == ("RGB", [0.0] * 3, [1.0] * 3)
        assert found.input_range == (0.0, 255.0) and found.output_range == (0.0, 1.0)
        assert found.input_type == ("UINT8" if fmt == "int8" else "FLOAT32")
        if fmt == "int8":  # the uint8 quantization the metadata's 0..255 relies on
            assert tflite.input_quantization(str(tagged)) == (1.0, 0)

        # Written again (new version, other labels): replaced, not added twice.
        other = metadata.ModelInfo("tiny", "8")
        again = metadata.add_metadata(tagged.read_bytes(), CLASSES[::-1], other)
        found = metadata.read_metadata(again)
        assert (found.version, found.labels) == ("8", CLASSES[::-1])
        assert again == metadata.add_metadata(blob, CLASSES[::-1], other)

    # An older export, without metadata, and a file that is no model: one clear error each.
    with pytest.raises(UsageError, match=r"has no TFLite metadata.*export it again"):
        metadata.read_metadata(str(tmp_path / "plain_float32.tflite"))
    (tmp_path / "junk.tflite").write_bytes(b"not a model" * 20)
    with pytest.raises(UsageError, match="is not a TFLite model"):
        metadata.read_metadata(str(tmp_path / "junk.tflite"))
    # Metadata whose labels file was lost (the zip after the flatbuffer cut off).
    tagged = metadata.add_metadata(blobs["float32"], CLASSES, info)
    cut = bytes(
        flatbuffer_utils.convert_object_to_bytearray(
            flatbuffer_utils.read_model_from_bytearray(tagged)
        )
    )
    with pytest.raises(UsageError, match="has TFLite metadata but not an image classifier's"):
        metadata.read_metadata(cut)
    with pytest.raises(UsageError, match="10 outputs but 3 class names"):
        metadata.add_metadata(blobs["float32"], CLASSES[:3], info)


def test_mediapipe_image_classifier_agrees_with_keras(tmp_path):
    pytest.importorskip("mediapipe")
    model, pre = confident_model(32), preprocessing_lib.cifar(32)
    bundle = load_model_bundle(save_bundle(tmp_path / "run", model, pre, CLASSES))
    config = all_formats.ExportConfig(
        str(tmp_path / "export"),
        formats=TFLITE_FORMATS,
        calibration=model_input.Sample(random_images(32, 32, 32), None, "random"),
    )
    all_formats.export_all(bundle, config)
    pixels = random_images(12, 32, 32, seed=7)
    reference = keras_reference(model, pre, pixels)
    assert len(set(reference.argmax(-1))) > 2  # not one class for everything
    for fmt in TFLITE_FORMATS:
        path = str(tmp_path / "export" / tflite.filename(fmt))
        ours = tflite.TFLiteClassifier(path).predict(pixels)
        top = metadata.mediapipe_top1(path, pixels)
        np.testing.assert_array_equal(top.indices, reference.argmax(-1), err_msg=fmt)
        assert top.names == [CLASSES[i] for i in top.indices], fmt  # names from the metadata
        np.testing.assert_allclose(
            top.scores, ours[np.arange(len(pixels)), top.indices], atol=1e-6, err_msg=fmt
        )
