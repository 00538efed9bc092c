"""`model.onnx`: the classifier for ONNX Runtime, Triton and OpenVINO.

One graph, written by Keras' own ONNX export (`model.export(format="onnx")`, tf2onnx under
the TensorFlow backend): input `images` uint8 [batch, S, S, 3] RGB pixels 0..255 already
resized to the model's size S, output `probabilities` float32 [batch, classes]; normalisation
and softmax are inside (`export.graph`), as in every other format. Class names: labels.txt
beside it.

Example:

    from export import onnx
    blob = onnx.convert(model, preprocessing)
    classifier = onnx.ONNXClassifier("export/model.onnx")
    probabilities = classifier.predict(uint8_images)   # [n, classes]
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from common import files
from common.errors import UsageError, first_line
from export import INPUT_IMAGES, graph
from models.preprocessing import Preprocessing

FILENAME = "model.onnx"
OUTPUT = "probabilities"
# onnxruntime intra-op threads for measurements, as LiteRT's (export.tflite.NUM_THREADS).
NUM_THREADS = 2


class _Serving(keras.Model):
    """uint8 pixels -> probabilities: the serving computation as one Keras model to export."""

    def __init__(self, model: keras.Model, preprocessing: Preprocessing):
        super().__init__(name="serving")
        self.classifier = model
        self.preprocessing = preprocessing

    def call(self, pixels):
        return graph.probabilities(self.classifier, self.preprocessing, tf.cast(pixels, tf.float32))


def convert(model: keras.Model, preprocessing: Preprocessing) -> bytes:
    """The ONNX model (serialized `ModelProto`) of the Keras classifier with its preprocessing.

    Raises:
        UsageError: the conversion failed (an op tf2onnx cannot map).
    """
    import onnx

    size = preprocessing.image_size
    serving = _Serving(graph.float32_model(model), preprocessing)
    serving(np.zeros((1, size, size, 3), np.uint8))  # builds it
    signature = [tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_IMAGES)]
    with tempfile.TemporaryDirectory(prefix="onnx-") as tmp:
        path = os.path.join(tmp, FILENAME)
        try:
            with warnings.catch_warnings():  # Keras' numpy-2 patch of tf2onnx sets np.object
                warnings.simplefilter("ignore", FutureWarning)
                serving.export(path, format="onnx", verbose=False, input_signature=signature)
        except Exception as e:  # tf2onnx raises anything
            raise UsageError(
                f"converting to {FILENAME} failed ({first_line(e)}); leave onnx out of --formats"
            ) from e
        proto = onnx.load(path)
    # tf2onnx names the output after the graph's last op ("Identity:0"): the contract's name.
    (output,) = proto.graph.output
    for node in proto.graph.node:
        node.output[:] = [OUTPUT if name == output.name else name for name in node.output]
    output.name = OUTPUT
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


class ONNXClassifier:
    """Runs `model.onnx` with ONNX Runtime on the CPU.

    Attributes:
        path: the model file.
        image_size: S of the model's [batch, S, S, 3] uint8 input.
        num_classes: length of the probabilities.
    """

    def __init__(self, path: str, num_threads: int = NUM_THREADS):
        import onnxruntime

        if not files.isfile(path):
            raise UsageError(f"ONNX model not found: {path}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(
                files.read_bytes(path) if files.is_remote(path) else path,  # ORT reads local files
                options,
                providers=["CPUExecutionProvider"],
            )
        except Exception as e:  # onnxruntime's InvalidProtobuf / Fail
            raise UsageError(f"{path} is not an ONNX model ({first_line(e)})") from e
        self.path = path
        (self._input,) = self._session.get_inputs()
        shape = self._input.shape
        if self._input.type != "tensor(uint8)" or len(shape) != 4 or shape[1] != shape[2]:
            raise UsageError(f"{path} takes {self._input.type} {shape}, not uint8 [n, S, S, 3]")
        self.image_size = int(shape[1])
        self.num_classes = int(self._session.get_outputs()[0].shape[-1])

    def predict_timed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [n, classes] and the seconds each batch-1 run took.

        `images`: uint8 [n, S, S, 3], pixels 0..255 resized to S x S.
        """
        images = np.asarray(images)
        size = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise UsageError(
                f"{self.path} takes uint8 images [n, {size}, {size}, 3], got "
                f"{images.dtype} {list(images.shape)}"
            )
        probabilities = np.empty((len(images), self.num_classes), np.float32)
        seconds = np.empty(len(images), np.float64)
        for i, image in enumerate(images):
            start = time.perf_counter()
            (out,) = self._session.run([OUTPUT], {self._input.name: image[np.newaxis]})
            seconds[i] = time.perf_counter() - start
            probabilities[i] = out[0]
        return probabilities, seconds

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities float32 [n, classes] for uint8 images [n, S, S, 3]."""
        return self.predict_timed(images)[0]
