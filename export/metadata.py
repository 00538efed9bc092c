"""TFLite model metadata: what MediaPipe Tasks, Android Studio and the LiteRT Support Library read.

Every exported `.tflite` carries a `TFLITE_METADATA` buffer (the published metadata flatbuffer
schema, `metadata_schema.fbs`, file identifier `M001`) and, appended as a zip, the class
names as `labels.txt` (an associated `TENSOR_AXIS_LABELS` file). The metadata says:
- model name, description, version, author, license;
- input `image`: RGB, normalisation mean 0 / std 1 (the graph takes pixels 0..255 and
  normalises inside; a float input so takes the pixels unchanged, a uint8 input takes them
  as they are too: its quantization is scale 1, zero point 0, in the tensor itself), and
  the pixel range 0..255;
- output `probability`: softmax probabilities (range 0..1, no score calibration), one per
  label.

The classes come from the schema's generated Python code that `mediapipe` ships
(`mediapipe.tasks.metadata.metadata_schema_py_generated`, with its `metadata_info`
helpers); the model flatbuffer is edited with TensorFlow's own `flatbuffer_utils`.
The operators and tensors are not touched: a model with metadata computes bit for bit what
it computed without (tests/test_export_metadata.py).

Example:

    from export import metadata
    blob = metadata.add_metadata(blob, class_names, metadata.ModelInfo("resnet18", "1"))
    info = metadata.read_metadata("export/model_int8.tflite")
    print(info.labels, info.mean, info.std)
    top = metadata.mediapipe_top1("export/model_int8.tflite", pixels)  # as an app sees it
    print(top.indices, top.names, top.scores)
"""

from __future__ import annotations

import dataclasses
import io
import zipfile

import flatbuffers
import numpy as np
from tensorflow.lite.python import schema_py_generated as tflite_schema
from tensorflow.lite.tools import flatbuffer_utils

from common import files
from common.errors import UsageError

METADATA_NAME = "TFLITE_METADATA"  # the Model.metadata entry readers look for
METADATA_IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
# Every field written here is in schema 1.0.0 (metadata_schema.fbs's change log: the later
# versions add tokenizers, audio, tensor groups, file versions and custom metadata).
MIN_PARSER_VERSION = "1.0.0"
INPUT_NAME = "image"
OUTPUT_NAME = "probability"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The general part of the metadata.

    Attributes:
        name: the model's name (shown by Android Studio and the MediaPipe model card).
        version: the export's version.
        author: who made it; empty: not said.
        license: its license; empty: not said.
        description: what it does; empty: a sentence written from the classes.
    """

    name: str
    version: str
    author: str = ""
    license: str = ""
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Metadata:
    """What `read_metadata` finds in a `.tflite` file.

    Attributes:
        name, description, version, author, license: the general information.
        min_parser_version: the oldest metadata parser that reads it.
        color_space: of the input image, "RGB".
        mean, std: the input's normalisation options, per channel.
        input_range: (min, max) the input takes: (0, 255).
        input_type: "FLOAT32" or "UINT8".
        labels: the class names of the associated TENSOR_AXIS_LABELS file, index order.
        output_range: (min, max) of the scores: (0, 1), probabilities.
    """

    name: str
    description: str
    version: str
    author: str
    license: str
    min_parser_version: str
    color_space: str
    mean: list[float]
    std: list[float]
    input_range: tuple[float, float]
    input_type: str
    labels: list[str]
    output_range: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class TopOne:
    """What MediaPipe's ImageClassifier answers per image: its best category.

    Attributes:
        indices: int64 [n], the class index.
        names: the category names, as MediaPipe read them from the metadata's labels ("" if
            it found none).
        scores: float32 [n], the score (the model's probability of that class).
    """

    indices: np.ndarray
    names: list[str]
    scores: np.ndarray


def mediapipe_top1(path: str, images: np.ndarray) -> TopOne:
    """Top-1 of a `.tflite` classifier as MediaPipe Tasks' ImageClassifier gives it.

    The C++ task that Android and iOS apps run: it reads the input normalisation and the
    labels from the metadata, resizes and feeds the image, and names the category.

    Args:
        path: a `.tflite` file with metadata (`add_metadata`).
        images: uint8 RGB [n, S, S, 3] at the model's size (`export.model_input.to_model_input`).
    """
    import mediapipe as mp
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.vision import image_classifier

    options = image_classifier.ImageClassifierOptions(
        base_options=BaseOptions(model_asset_path=path), max_results=1
    )
    indices, names, scores = [], [], []
    with image_classifier.ImageClassifier.create_from_options(options) as classifier:
        for image in images:
            picture = mp.Image(image_format=mp.ImageFormat.SRGB, data=image.copy())
            (top,) = classifier.classify(picture).classifications[0].categories
            indices.append(top.index)
            names.append(top.category_name or "")
            scores.append(top.score)
    return TopOne(np.asarray(indices, np.int64), names, np.asarray(scores, np.float32))


def _schema():
    # Imported late: the generated classes come with mediapipe (see the module docstring).
    from mediapipe.tasks.metadata import metadata_schema_py_generated as schema
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info

    return schema, metadata_info


def _tensor_type(model, index: int) -> int:
    return model.subgraphs[0].tensors[index].type


def _description(class_names: list[str], input_type: int, size: int) -> str:
    pixels = "uint8" if input_type == tflite_schema.TensorType.UINT8 else "float32"
    shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
    return (
        f"Image classifier, {len(class_names)} classes ({shown}). Input: {size}x{size} RGB "
        f"{pixels} pixels 0..255 (normalised inside the model); output: softmax probabilities."
    )


def add_metadata(blob: bytes, class_names: list[str], info: ModelInfo) -> bytes:
    """The `.tflite` flatbuffer `blob` with metadata and labels.txt added (replaced if present).

    Args:
        blob: a classifier from `export.tflite.convert` (one [1, S, S, 3] image input, one
            [1, classes] float32 probabilities output).
        class_names: the labels, index order.
        info: name, version, author, license, description.
    """
    schema, metadata_info = _schema()
    model = flatbuffer_utils.read_model_from_bytearray(blob)
    subgraph = model.subgraphs[0]
    (input_index,), (output_index,) = subgraph.inputs, subgraph.outputs
    input_type, output_type = _tensor_type(model, input_index), _tensor_type(model, output_index)
    classes = subgraph.tensors[output_index].shape[-1]
    if classes != len(class_names):
        raise UsageError(f"the model has {classes} outputs but {len(class_names)} class names")
    size = int(subgraph.tensors[input_index].shape[1])

    general = metadata_info.GeneralMd(
        name=info.name,
        version=info.version,
        description=info.description or _description(class_names, input_type, size),
        author=info.author or None,
        licenses=info.license or None,
    ).create_metadata()
    image = metadata_info.InputImageTensorMd(
        name=INPUT_NAME,
        description=f"{size}x{size} RGB pixels 0..255, resized (bilinear) to the model's size.",
        norm_mean=[0.0, 0.0, 0.0],
        norm_std=[1.0, 1.0, 1.0],
        color_space_type=schema.ColorSpaceType.RGB,
        tensor_type=input_type,
    ).create_metadata()
    scores = metadata_info.ClassificationTensorMd(
        name=OUTPUT_NAME,
        description="Softmax probabilities of the classes in labels.txt (sum 1).",
        label_files=[metadata_info.LabelFileMd(LABELS_FILE)],
        tensor_type=output_type,
    ).create_metadata()
    subgraph_metadata = schema.SubGraphMetadataT()
    subgraph_metadata.inputTensorMetadata = [image]
    subgraph_metadata.outputTensorMetadata = [scores]
    general.subgraphMetadata = [subgraph_metadata]
    general.minParserVersion = MIN_PARSER_VERSION
    builder = flatbuffers.Builder(0)
    builder.Finish(general.Pack(builder), METADATA_IDENTIFIER)

    # What the reference populator (tflite-support's MetadataPopulator) does: the metadata
    # in a buffer named by Model.metadata, the associated files in a zip after the model.
    buffer = tflite_schema.BufferT()
    buffer.data = np.frombuffer(bytes(builder.Output()), np.uint8)
    entries = [m for m in (model.metadata or []) if m.name.decode() == METADATA_NAME]
    if entries:
        model.buffers[entries[0].buffer] = buffer
    else:
        model.buffers.append(buffer)
        entry = tflite_schema.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        model.metadata = [*(model.metadata or []), entry]
    out = io.BytesIO(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    with zipfile.ZipFile(out, "a") as archive:
        archive.writestr(LABELS_FILE, "".join(f"{name}\n" for name in class_names))
    return out.getvalue()


def read_metadata(model: str | bytes) -> Metadata:
    """The metadata of a `.tflite` file (path) or flatbuffer.

    Raises:
        UsageError: the file is missing or not a TFLite model, or it has no metadata (a
            model exported before metadata was added: export it again).
    """
    schema, _ = _schema()
    where = model if isinstance(model, str) else "the model"
    if isinstance(model, str):
        if not files.isfile(model):
            raise UsageError(f"TFLite model not found: {model}")
        model = files.read_bytes(model)
    try:
        parsed = flatbuffer_utils.read_model_from_bytearray(model)
    except Exception as e:  # flatbuffers raises anything on garbage
        raise UsageError(f"{where} is not a TFLite model ({type(e).__name__})") from e
    entries = [m for m in (parsed.metadata or []) if m.name.decode() == METADATA_NAME]
    if not entries:
        raise UsageError(
            f"{where} has no TFLite metadata (no labels, no normalisation options): it was "
            "exported before metadata was added; export it again with python -m app.export"
        )
    try:
        return _parse(schema, parsed, parsed.buffers[entries[0].buffer].data, model)
    except (
        StopIteration,
        AttributeError,
        IndexError,
        KeyError,
        TypeError,
        zipfile.BadZipFile,
    ) as e:
        raise UsageError(
            f"{where} has TFLite metadata but not an image classifier's (RGB image input with "
            f"normalisation options, labels on the output): {type(e).__name__}"
        ) from e


def _parse(schema, parsed, data: np.ndarray, model: bytes) -> Metadata:
    """`Metadata` from the model's metadata buffer `data` and its labels zip."""
    root = schema.ModelMetadataT.InitFromObj(schema.ModelMetadata.GetRootAs(bytes(data), 0))
    subgraph = root.subgraphMetadata[0]
    image, scores = subgraph.inputTensorMetadata[0], subgraph.outputTensorMetadata[0]
    normalization = next(
        u.options
        for u in image.processUnits or []
        if u.optionsType == schema.ProcessUnitOptions.NormalizationOptions
    )
    color_names = {v: k for k, v in vars(schema.ColorSpaceType).items() if k.isupper()}
    type_names = {v: k for k, v in vars(tflite_schema.TensorType).items() if k.isupper()}
    label_file = next(
        f.name.decode()
        for f in scores.associatedFiles
        if f.type == schema.AssociatedFileType.TENSOR_AXIS_LABELS
    )
    with zipfile.ZipFile(io.BytesIO(model)) as archive:
        labels = archive.read(label_file).decode().splitlines()

    def text(value: bytes | None) -> str:
        return value.decode() if value else ""

    return Metadata(
        name=text(root.name),
        description=text(root.description),
        version=text(root.version),
        author=text(root.author),
        license=text(root.license),
        min_parser_version=text(root.minParserVersion),
        color_space=color_names[image.content.contentProperties.colorSpace],
        mean=[float(v) for v in normalization.mean],
        std=[float(v) for v in normalization.std],
        input_range=(float(image.stats.min[0]), float(image.stats.max[0])),
        input_type=type_names[_tensor_type(parsed, parsed.subgraphs[0].inputs[0])],
        labels=labels,
        output_range=(float(scores.stats.min[0]), float(scores.stats.max[0])),
    )
