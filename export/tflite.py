"""`.tflite` models for LiteRT (phones): float32, float16, dynamic-range int8, full int8.

Every model has one signature, `serving_default`: input `images` [1, S, S, 3] RGB pixels
0..255 already resized to the model's size S (float32; uint8 for `model_int8.tflite`), output
`probabilities` float32 [1, classes]. Normalisation and softmax are inside, so an app feeds
camera pixels as they are. Only builtin LiteRT ops are allowed (no Select-TF/Flex ops, which
the phone runtime lacks): a model needing one fails at conversion, not on the phone.

The converter reads a SavedModel written by `keras.export.ExportArchive` with a fixed-shape
signature (`TFLiteConverter.from_keras_model` does not work with Keras 3 models). The full-int8
model is calibrated by the converter, then its activation ranges are measured again exactly
before quantizing (`_exact_activation_ranges`: the converter's calibrator records some inputs
of in-place ops with their output's range, tensorflow/tensorflow#127842).

Example:

    from export import tflite
    blobs = tflite.convert(model, preprocessing, ["float32", "int8"], calibration_images)
    classifier = tflite.TFLiteClassifier("export/model_int8.tflite")
    probabilities = classifier.predict(uint8_images)   # [n, classes]
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow.lite.python import convert as lite_convert
from tensorflow.lite.tools import flatbuffer_utils

from common import files
from common.errors import UsageError, first_line
from export import INPUT_IMAGES, SIGNATURE_IMAGES, TFLITE_FORMATS, graph
from models.preprocessing import Preprocessing

# Interpreter threads for measurements and `TFLiteClassifier` (LiteRT's default is 1).
NUM_THREADS = 2


def filename(fmt: str) -> str:
    """`model_<format>.tflite`."""
    return f"model_{fmt}.tflite"


def _write_lite_saved_model(
    model: keras.Model, preprocessing: Preprocessing, path: str, pin_input_range: bool
) -> None:
    """A SavedModel with the mobile signature: [1, S, S, 3] float32 pixels -> probabilities."""
    size = preprocessing.image_size

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        if pin_input_range:
            # Fixes the int8 input quantization at scale 1, zero point 0 whatever the
            # calibration images span, so the uint8 input takes raw pixels 0..255 unchanged.
            images = tf.quantization.fake_quant_with_min_max_args(images, min=0.0, max=255.0)
        return {"probabilities": graph.probabilities(model, preprocessing, images)}

    archive = keras.export.ExportArchive()  # no track(model): see export.saved_model
    archive.add_endpoint(
        SIGNATURE_IMAGES,
        serve,
        input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name=INPUT_IMAGES)],
    )
    archive.write_out(path, verbose=False)


def _check_calibration_images(images: np.ndarray | None, size: int) -> np.ndarray:
    if images is None or len(images) == 0:
        raise UsageError(
            "model_int8.tflite needs calibration images: pass --representative_data=DIR "
            "(a folder of training images), or leave int8 out of --formats"
        )
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
        raise UsageError(
            f"calibration images must be uint8 [n, {size}, {size}, 3] (resized like real "
            f"input), got {images.dtype} {list(images.shape)}"
        )
    return images


def _converter(saved_model_dir: str, fmt: str, calibration: np.ndarray | None):
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=[SIGNATURE_IMAGES]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if fmt == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "dynamic_int8":
        # Weights in int8, activations float (quantized on the fly): no calibration needed.
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif fmt == "int8":

        def representative_dataset() -> Iterable[list[np.ndarray]]:
            for image in calibration:
                yield [image[np.newaxis].astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        # Integer kernels only; the input is uint8 pixels; the output stays float32
        # probabilities (dequantized inside), the same output as every other format.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
    elif fmt != "float32":
        raise UsageError(f"unknown TFLite format {fmt!r}; choose from {', '.join(TFLITE_FORMATS)}")
    return converter


def _exact_activation_ranges(calibrated: bytes, calibration: np.ndarray) -> bytes:
    """The calibrated model with every recorded activation range replaced by the exact one.

    Why: TensorFlow's calibrator logs an op's inputs again after the op ran; when the memory
    planner lets the op write its output over an input (a residual ADD over its branch), the
    input is recorded with the output's range (tensorflow/tensorflow#127842). In ResNet-50
    that makes the last convolution of most blocks several times too coarse. Here the
    calibrated float model runs with every tensor kept in its own buffer over the same images,
    and each tensor's min/max is what it really took: the converter's min/max rule, measured
    right.
    """
    model = flatbuffer_utils.read_model_from_bytearray(calibrated)
    tensors = model.subgraphs[0].tensors
    recorded = [
        i
        for i, t in enumerate(tensors)
        if t.quantization is not None and t.quantization.min is not None
    ]
    interpreter = _interpreter(calibrated, delegates=False, preserve_all_tensors=True)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    low = np.full(len(recorded), np.inf, np.float32)
    high = np.full(len(recorded), -np.inf, np.float32)
    for image in calibration:
        interpreter.set_tensor(input_index, image[np.newaxis].astype(np.float32))
        interpreter.invoke()
        for k, i in enumerate(recorded):
            values = interpreter.get_tensor(i)
            low[k] = min(low[k], values.min())
            high[k] = max(high[k], values.max())
    for k, i in enumerate(recorded):
        tensors[i].quantization.min = np.array([low[k]], np.float32)
        tensors[i].quantization.max = np.array([high[k]], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _convert_int8(saved_model_dir: str, calibration: np.ndarray) -> bytes:
    """Full-int8 flatbuffer: the converter's calibration, exact ranges, its quantizer."""
    converter = _converter(saved_model_dir, "int8", calibration)
    converter._experimental_calibrate_only = True  # the float model with its recorded ranges
    calibrated = _exact_activation_ranges(converter.convert(), calibration)
    # What the converter runs after calibrating (TFLiteConverter._quantize), same settings.
    return lite_convert.mlir_quantize(
        calibrated,
        disable_per_channel=converter._experimental_disable_per_channel,
        input_data_type=converter.inference_input_type,
        output_data_type=tf.float32,
        disable_per_channel_for_dense_layers=(
            converter._experimental_disable_per_channel_quantization_for_dense_layers
        ),
    )


def convert(
    model: keras.Model,
    preprocessing: Preprocessing,
    formats: Sequence[str] = TFLITE_FORMATS,
    calibration_images: np.ndarray | None = None,
    exact_int8_ranges: bool = True,
) -> dict[str, bytes]:
    """Converts the Keras model to each TFLite format; returns the flatbuffers by format.

    Args:
        model: the Keras classifier (logits head).
        preprocessing: its input normalisation and size.
        formats: some of `export.TFLITE_FORMATS`.
        calibration_images: for "int8": uint8 [n, S, S, 3] real training images, resized
            exactly as an app would resize its input (a few hundred are enough).
        exact_int8_ranges: False quantizes "int8" with the converter's calibration as it is,
            for comparison only (`_exact_activation_ranges` says what it gets wrong).
    """
    unknown = [fmt for fmt in formats if fmt not in TFLITE_FORMATS]
    if unknown:
        raise UsageError(f"unknown TFLite format {unknown[0]!r}; choose from {TFLITE_FORMATS}")
    size = preprocessing.image_size
    calibration = None
    if "int8" in formats:
        calibration = _check_calibration_images(calibration_images, size)
    model = graph.float32_model(model)
    blobs = {}
    with tempfile.TemporaryDirectory(prefix="tflite-") as tmp:
        for fmt in formats:
            pin = fmt == "int8"
            saved_model_dir = os.path.join(tmp, "int8" if pin else "float")
            if not os.path.isdir(saved_model_dir):
                _write_lite_saved_model(model, preprocessing, saved_model_dir, pin)
            try:
                if fmt == "int8" and exact_int8_ranges:
                    blobs[fmt] = _convert_int8(saved_model_dir, calibration)
                else:
                    blobs[fmt] = _converter(saved_model_dir, fmt, calibration).convert()
            except Exception as e:  # ConverterError and friends: one line, which format
                raise UsageError(
                    f"converting to {filename(fmt)} failed ({first_line(e)}); the model may use "
                    "an op LiteRT builtins lack: leave this format out of --formats"
                ) from e
    if "int8" in blobs:
        scale, zero_point = input_quantization(blobs["int8"])
        if (scale, zero_point) != (1.0, 0):  # the uint8-pixels contract would not hold
            raise AssertionError(f"int8 input quantization is {scale}, {zero_point}, not 1, 0")
    return blobs


def _interpreter(
    model: str | bytes,
    num_threads: int = NUM_THREADS,
    delegates: bool = True,
    preserve_all_tensors: bool = False,
):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = {"num_threads": num_threads}
    if preserve_all_tensors:
        kwargs["experimental_preserve_all_tensors"] = True
    if not delegates:
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if isinstance(model, bytes):
        return Interpreter(model_content=model, **kwargs)
    return Interpreter(model_path=model, **kwargs)


def input_quantization(model: str | bytes) -> tuple[float, int]:
    """(scale, zero point) of the model's input; (0.0, 0) for a float input."""
    interpreter = _interpreter(model, delegates=False)
    scale, zero_point = interpreter.get_input_details()[0]["quantization"]
    return float(scale), int(zero_point)


def op_names(model: str | bytes) -> set[str]:
    """The op types in a `.tflite` model (before any delegate takes them over)."""
    interpreter = _interpreter(model, delegates=False)
    interpreter.allocate_tensors()
    return {op["op_name"] for op in interpreter._get_ops_details()}


class TFLiteClassifier:
    """Runs an exported `.tflite` classifier with the LiteRT interpreter (XNNPACK on CPU).

    The project's one LiteRT runner (the report, benchmarks and `app.predict_lib` use it).
    It takes uint8 or float32 pixels: a float model gets float pixels exactly as given
    (an app's resize need not be rounded), the int8 model gets them rounded to uint8.

    Attributes:
        path: the model file.
        image_size: S of the model's [1, S, S, 3] input.
        input_dtype: numpy.float32, or numpy.uint8 for the full-int8 model.
        num_classes: length of the probabilities.
    """

    def __init__(self, path: str, num_threads: int = NUM_THREADS):
        if not files.isfile(path):
            raise UsageError(f"TFLite model not found: {path}")
        # The interpreter reads a local file itself; a bucket's is read for it.
        model = files.read_bytes(path) if files.is_remote(path) else path
        try:
            self._interpreter = _interpreter(model, num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"{path} is not a TFLite model ({first_line(e)})") from e
        self.path = path
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        shape = self._input["shape"]
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise UsageError(f"{path} takes input {list(shape)}, not [1, size, size, 3]")
        self.image_size = int(shape[1])
        self.input_dtype = self._input["dtype"]
        self.num_classes = int(self._output["shape"][-1])

    def _quantize(self, image: np.ndarray) -> np.ndarray:
        scale, zero_point = self._input["quantization"]
        if self.input_dtype == np.float32 or scale == 0.0:
            return image.astype(self.input_dtype)
        info = np.iinfo(self.input_dtype)
        quantized = np.round(image.astype(np.float32) / scale + zero_point)
        return np.clip(quantized, info.min, info.max).astype(self.input_dtype)

    def _dequantize(self, values: np.ndarray) -> np.ndarray:
        scale, zero_point = self._output["quantization"]
        if values.dtype == np.float32 or scale == 0.0:
            return values.astype(np.float32)
        return (values.astype(np.float32) - zero_point) * scale

    def predict_timed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [n, classes] and the seconds each `invoke` took (batch 1).

        `images`: pixels 0..255 resized to S x S, uint8 or float32 [n, S, S, 3] (float pixels
        go to a float model unrounded; the int8 model rounds them to its uint8 input).
        """
        images = np.asarray(images)
        size = self.image_size
        if (
            images.dtype not in (np.uint8, np.float32)
            or images.ndim != 4
            or images.shape[1:] != (size, size, 3)
        ):
            raise UsageError(
                f"{self.path} takes uint8 or float32 images [n, {size}, {size}, 3] (pixels "
                f"0..255 resized to {size}x{size}), got {images.dtype} {list(images.shape)}"
            )
        probabilities = np.empty((len(images), self.num_classes), dtype=np.float32)
        seconds = np.empty(len(images), dtype=np.float64)
        for i, image in enumerate(images):
            self._interpreter.set_tensor(self._input["index"], self._quantize(image[np.newaxis]))
            start = time.perf_counter()
            self._interpreter.invoke()
            seconds[i] = time.perf_counter() - start
            out = self._interpreter.get_tensor(self._output["index"])
            probabilities[i] = self._dequantize(out)[0]
        return probabilities, seconds

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities float32 [n, classes] for images [n, S, S, 3] (see `predict_timed`)."""
        return self.predict_timed(images)[0]
