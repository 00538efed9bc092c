"""`model.onnx`: Keras' ONNX export of the serving computation, run with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from app import inference
from common.errors import UsageError
from export import onnx
from models import preprocessing as preprocessing_lib
from models.bundle import write_labels
from tests.helpers import keras_reference, random_images, tiny_model


def test_onnx_matches_keras_and_keeps_the_contract(tmp_path):
    model, pre = tiny_model(size=16), preprocessing_lib.imagenet(16)
    path = tmp_path / onnx.FILENAME
    path.write_bytes(onnx.convert(model, pre))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ((name, kind, shape),) = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    assert (name, kind, shape[1:]) == ("images", "tensor(uint8)", [16, 16, 3])
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    images = random_images(5, 16, 16, seed=1)
    batch = session.run(None, {"images": images})[0]  # any batch size
    classifier = onnx.ONNXClassifier(str(path))
    probabilities = classifier.predict(images)
    np.testing.assert_allclose(batch, probabilities, atol=1e-6)
    reference = keras_reference(model, pre, images)
    np.testing.assert_array_equal(probabilities.argmax(-1), reference.argmax(-1))
    np.testing.assert_array_less(np.abs(probabilities - reference), 1e-5)

    # app.predict / app.evaluate take it as --model, labels.txt beside it.
    write_labels(str(tmp_path), [f"class_{i}" for i in range(10)])
    predictor = inference.load_predictor(str(path))
    assert (predictor.kind, predictor.image_size) == ("onnx", 16)
    np.testing.assert_array_equal(predictor.predict(list(images)), probabilities)

    with pytest.raises(UsageError, match=r"takes uint8 images \[n, 16, 16, 3\]"):
        classifier.predict(images.astype(np.float32))
    with pytest.raises(UsageError, match="ONNX model not found"):
        onnx.ONNXClassifier(str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model" * 10)
    with pytest.raises(UsageError, match="is not an ONNX model"):
        onnx.ONNXClassifier(str(tmp_path / "junk.onnx"))
