"""The TF Serving SavedModel: two signatures, integer versions, published safely.

Layout under a model base path (what `tensorflow/serving --model_base_path` watches;
`python -m app.export --export_dir=DIR` makes `DIR/saved_model` the base path; local or a
bucket, `gs://...`):

    <base>/1/saved_model.pb  <base>/1/variables/  <base>/2/ ...   a new export adds max + 1
    <base>/<N>/assets.extra/tf_serving_warmup_requests            replayed by TF Serving on load
    <base>/<N>/assets.extra/labels.txt, preprocessing.json        so a version stands on its own

Signatures (the serving contract; names in `export`):
- `serving_default`: `images` uint8 [batch, height, width, 3], any height and width.
- `serving_bytes`: `image_bytes` string [batch] of encoded JPEG/PNG (also GIF, BMP, WebP).
Both refuse an image over `max_pixels` (default 40 megapixels; an encoded one from its header,
before decoding it) with INVALID_ARGUMENT; the limit is in `assets.extra/serving_limits.json`.
Both resize to the model's square input (`models.preprocessing.resize`, bilinear, as training
does) and normalise inside the graph, and return `probabilities` float32 [batch, classes],
`classes` int64 [batch] (the argmax) and `class_names` string [batch] (its label), so a client
needs neither the preprocessing nor labels.txt. Only uint8 RGB pixels or encoded images go in:
the graph refuses any other dtype or rank with an error naming the expected shape.

Example:

    from export import saved_model
    version_dir = saved_model.export_saved_model(model, class_names, preprocessing, "exp/sm")
    served = saved_model.load_serving("exp/sm")          # the latest version
    served.predict(uint8_images)["class_names"]
    served.class_names, served.preprocessing.image_size   # from assets.extra
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from common import files
from common.errors import UsageError, first_line
from common.pixel_limits import MAX_PIXELS, TOO_LARGE
from export import (
    INPUT_BYTES,
    INPUT_IMAGES,
    OUTPUTS,
    SIGNATURE_BYTES,
    SIGNATURE_IMAGES,
    client,
    graph,
    image_header,
)
from models.bundle import LABELS_FILE, read_labels, write_labels
from models.preprocessing import FILENAME as PREPROCESSING_FILE
from models.preprocessing import Preprocessing, resize

# Files TF Serving ignores but keeps with a version (it reads only the warmup file).
EXTRA_DIR = "assets.extra"
# TF Serving replays these requests when it loads a version, so the first real request
# does not pay for graph initialisation.
WARMUP_FILE = f"{EXTRA_DIR}/tf_serving_warmup_requests"
# The signatures' inputs: name -> (dtype, rank).
CONTRACT = {
    SIGNATURE_IMAGES: (INPUT_IMAGES, tf.uint8, 4),
    SIGNATURE_BYTES: (INPUT_BYTES, tf.string, 1),
}
EMPTY_BATCH = "empty batch: a request must hold at least one image"
# The limits the signatures enforce, for people and tools (TF Serving ignores the file).
LIMITS_FILE = f"{EXTRA_DIR}/serving_limits.json"
# Written last when a version is published into a bucket: TF Serving takes any integer folder
# for a version, and loads it once this file is there.
GRAPH_FILE = "saved_model.pb"


def _nonempty(batch: tf.Tensor) -> tf.Operation:
    """An op that fails (INVALID_ARGUMENT) when a request holds no images."""
    return tf.debugging.Assert(tf.shape(batch)[0] > 0, [EMPTY_BATCH])


def serving_archive(
    model: keras.Model,
    class_names: list[str],
    preprocessing: Preprocessing,
    max_pixels: int = MAX_PIXELS,
) -> keras.export.ExportArchive:
    """An `ExportArchive` holding the model and both serving signatures, which refuse
    images over `max_pixels` (encoded ones before decoding them)."""
    model = graph.float32_model(model)
    size = preprocessing.image_size
    names = tf.constant(class_names, dtype=tf.string)

    def outputs(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        probs = graph.probabilities(model, preprocessing, resize(pixels, size))
        classes = tf.argmax(probs, axis=-1, output_type=tf.int64)
        return {
            "probabilities": probs,
            "classes": classes,
            "class_names": tf.gather(names, classes),
        }

    def serve_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        # The signature's declared shape is not enforced when it is called (TF Serving passes
        # any shape through): check it here, so a bad request fails with the expected shape.
        images = tf.ensure_shape(images, [None, None, None, 3])
        # Already in memory, but resizing would take 4 bytes a pixel more: same limit.
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        message = tf.strings.format(TOO_LARGE, (width, height, max_pixels))
        checks = [
            _nonempty(images),
            tf.debugging.Assert(
                tf.cast(height, tf.int64) * tf.cast(width, tf.int64) <= max_pixels, [message]
            ),
        ]
        with tf.control_dependencies(checks):
            return outputs(tf.cast(images, tf.float32))

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        # Images in one request may differ in size: resize each before they form a batch.
        image = image_header.decode_image(encoded, max_pixels)
        image = resize(image[tf.newaxis], size)[0]
        return tf.ensure_shape(image, [size, size, 3])

    def serve_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        image_bytes = tf.ensure_shape(image_bytes, [None])
        with tf.control_dependencies([_nonempty(image_bytes)]):
            image_bytes = tf.identity(image_bytes)
        pixels = tf.map_fn(
            decode, image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32)
        )
        return outputs(pixels)

    # No `archive.track(model)`: the endpoints' variables are tracked anyway, and tracking the
    # model as well stores every weight twice (keras-team/keras#23553: 2x size on disk and
    # 2x variable memory in TF Serving).
    archive = keras.export.ExportArchive()
    # serving_default is registered by name: ExportArchive would otherwise alias whichever
    # endpoint came first.
    archive.add_endpoint(
        SIGNATURE_IMAGES,
        serve_images,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_IMAGES)],
    )
    archive.add_endpoint(
        SIGNATURE_BYTES,
        serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_BYTES)],
    )
    return archive


def versions(base_dir: str) -> list[int]:
    """The complete versions under a model base path, ascending: integer folders that hold a
    saved_model.pb (others, and one still being published, are ignored)."""
    if not files.isdir(base_dir):
        return []
    return sorted(
        int(name)
        for name in files.listdir(base_dir)
        if name.isdigit() and files.isfile(files.join(base_dir, name, GRAPH_FILE))
    )


def write_warmup_requests(path: str, image_size: int) -> str:
    """Writes TF Serving's warmup file: one request per signature (a grey image)."""
    from tensorflow_serving.apis import prediction_log_pb2

    grey = np.full((1, image_size, image_size, 3), 128, dtype=np.uint8)
    png = tf.io.encode_png(grey[0]).numpy()
    files.makedirs(files.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for request in (
            client.predict_request("warmup", images=grey),
            client.predict_request("warmup", image_bytes=[png]),
        ):
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(path: str) -> list:
    """The `PredictRequest`s in a warmup file (to check what TF Serving will replay)."""
    from tensorflow_serving.apis import prediction_log_pb2

    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        requests.append(log.predict_log.request)
    return requests


def export_saved_model(
    model: keras.Model,
    class_names: list[str],
    preprocessing: Preprocessing,
    base_dir: str,
    warmup: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> str:
    """Writes the next integer version under `base_dir` (local or a bucket); returns its path.

    The signatures refuse images over `max_pixels`; the limit is recorded in the version's
    `assets.extra/serving_limits.json`. A server never loads half a version, and existing
    versions are never touched: on a local disk the version is written into a hidden folder
    beside the versions (TF Serving ignores names that are not integers) and renamed into
    place when complete; in a bucket, where a folder rename is a copy object by object, it is
    written locally and published file by file with saved_model.pb last (`_publish`).
    """
    archive = serving_archive(model, class_names, preprocessing, max_pixels)

    def write(folder: str) -> None:
        archive.write_out(folder, verbose=False)
        extra = os.path.join(folder, EXTRA_DIR)
        os.makedirs(extra, exist_ok=True)
        write_labels(extra, class_names)
        preprocessing.save(extra)
        files.write_json(os.path.join(folder, LIMITS_FILE), {"max_pixels": max_pixels})
        if warmup:
            write_warmup_requests(os.path.join(folder, WARMUP_FILE), preprocessing.image_size)

    files.makedirs(base_dir)
    if files.is_remote(base_dir):
        with tempfile.TemporaryDirectory(prefix="export-") as local:
            write(local)
            return _publish(local, base_dir)
    return _rename_into_place(write, files.resolve(base_dir))


def _rename_into_place(write: Callable[[str], None], base_dir: str) -> str:
    """A new version on a local disk: written into a hidden folder, renamed to the next
    number (atomic; never a number any folder has)."""
    tmp = tempfile.mkdtemp(dir=base_dir, prefix=".export-")
    try:
        # mkdtemp makes the folder private (0700); a server running as another user must read it.
        os.chmod(tmp, 0o755)
        write(tmp)
        while True:  # another export may take a number meanwhile: then take the next one
            taken = [int(name) for name in os.listdir(base_dir) if name.isdigit()]
            target = os.path.join(base_dir, str(max(taken, default=0) + 1))
            if os.path.exists(target):
                continue
            try:
                os.rename(tmp, target)  # atomic; fails if the number was taken meanwhile
            except OSError:
                if not os.path.exists(target):
                    raise
                continue
            return target
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def _publish(local: str, base_dir: str) -> str:
    """Copies the version in local folder `local` to the next number under bucket path
    `base_dir`, file by file, each under a temporary name renamed into place, saved_model.pb
    last: TF Serving takes `<N>/` for a version as soon as any file is there, fails to load it
    until saved_model.pb is, and retries (`--max_num_load_retries`, every
    `--load_retry_interval_micros`); with saved_model.pb last it never loads half a version.

    The number follows the highest complete version, so a folder a killed export left
    without saved_model.pb (never served) is emptied and reused rather than skipped.
    """
    target = files.join(base_dir, str(max(versions(base_dir), default=0) + 1))
    files.rmtree(target)
    names = []
    for folder, _, found in files.walk(local):
        inside = os.path.relpath(folder, local).replace(os.sep, "/")
        inside = "" if inside == "." else inside
        files.makedirs(files.join(target, inside) if inside else target)  # empty ones too
        names += [f"{inside}/{name}".lstrip("/") for name in found]
    for name in sorted(names, key=lambda name: (name == GRAPH_FILE, name)):
        files.copy(os.path.join(local, name), files.join(target, name))
    return target


def resolve_version(path: str) -> str:
    """A SavedModel folder: `path` itself, or its latest integer version if it is a base path."""
    if files.isfile(files.join(path, GRAPH_FILE)):
        return path
    found = versions(path)
    if not found:
        hint = "as python -m app.export writes under <export_dir>/saved_model"
        if files.isdir(files.join(path, "saved_model")):
            hint = f"did you mean {files.join(path, 'saved_model')}?"
        raise UsageError(
            f"no SavedModel in {path}: expected saved_model.pb or integer version folders ({hint})"
        )
    return files.join(path, str(found[-1]))


def check_contract(path: str, signatures) -> None:
    """Refuses a SavedModel without this project's serving signatures (another program's).

    Raises:
        UsageError: naming the signature or input that is missing or of another type.
    """
    how = "export the model with python -m app.export"
    for name, (input_name, dtype, rank) in CONTRACT.items():
        if name not in signatures:
            found = ", ".join(sorted(signatures)) or "none"
            raise UsageError(f"{path} has no {name} signature (it has: {found}); {how}")
        inputs = signatures[name].structured_input_signature[1]
        spec = inputs.get(input_name)
        if spec is None or spec.dtype != dtype or spec.shape.rank != rank:
            found = ", ".join(f"{k}: {v.dtype.name} {v.shape}" for k, v in inputs.items())
            raise UsageError(
                f"{path}: signature {name} takes {found or 'nothing'}, not {input_name}: "
                f"{dtype.name} of rank {rank}; {how}"
            )
        missing = [out for out in OUTPUTS if out not in signatures[name].structured_outputs]
        if missing:
            raise UsageError(f"{path}: signature {name} lacks the output {missing[0]}; {how}")


@dataclasses.dataclass
class ServingModel:
    """A loaded serving SavedModel, called as TF Serving would call it."""

    path: str
    loaded: object
    class_names: list[str] | None = None
    preprocessing: Preprocessing | None = None

    @property
    def signatures(self):
        return self.loaded.signatures

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Runs `serving_default` on uint8 images [n, h, w, 3]; returns the outputs as NumPy."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UsageError(
                f"images must be uint8 [batch, height, width, 3], got {images.dtype} "
                f"{list(images.shape)}"
            )
        try:
            outputs = self.signatures[SIGNATURE_IMAGES](**{INPUT_IMAGES: tf.constant(images)})
        except tf.errors.InvalidArgumentError as e:
            raise UsageError(f"{self.path}: {first_line(e)}") from e
        return {name: outputs[name].numpy() for name in OUTPUTS}

    def predict_bytes(self, encoded: list[bytes]) -> dict[str, np.ndarray]:
        """Runs `serving_bytes` on encoded images (JPEG/PNG file contents)."""
        try:
            outputs = self.signatures[SIGNATURE_BYTES](
                **{INPUT_BYTES: tf.constant(list(encoded), dtype=tf.string)}
            )
        except tf.errors.InvalidArgumentError as e:
            raise UsageError(f"{self.path}: an input was refused ({first_line(e)})") from e
        return {name: outputs[name].numpy() for name in OUTPUTS}


def load_serving(path: str) -> ServingModel:
    """Loads a version folder, or the latest version under a model base path, with its
    labels and preprocessing from `assets.extra` (None for an export older than them).

    Raises:
        UsageError: no SavedModel there, one that does not load (a missing or truncated
            `variables/`, a corrupt `saved_model.pb`), or one without the serving signatures.
    """
    version_dir = resolve_version(path)
    if not files.isdir(files.join(version_dir, "variables")):
        raise UsageError(
            f"{version_dir} has no variables/ folder: the SavedModel was copied incompletely; "
            "copy the whole version folder or export it again with python -m app.export"
        )
    try:
        loaded = tf.saved_model.load(version_dir)
    except Exception as e:  # parse, restore and graph errors all mean "not usable"
        raise UsageError(
            f"{version_dir} is not a loadable SavedModel ({type(e).__name__}: {first_line(e)}); "
            "export it again with python -m app.export"
        ) from e
    check_contract(version_dir, loaded.signatures)
    extra = files.join(version_dir, EXTRA_DIR)
    class_names = preprocessing = None
    if files.isfile(files.join(extra, LABELS_FILE)):
        class_names = read_labels(extra)
    if files.isfile(files.join(extra, PREPROCESSING_FILE)):
        preprocessing = Preprocessing.load(extra)
    return ServingModel(version_dir, loaded, class_names, preprocessing)
