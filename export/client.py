r"""A TF Serving client for the exported SavedModel, runnable where TensorFlow is not installed.

Sends image files to a `tensorflow/serving` server and prints each image's class:
- REST (port 8501): the Python standard library only. `serving_bytes` sends the files'
  bytes as `{"b64": ...}`; `serving_default` sends decoded uint8 pixels (needs Pillow).
- gRPC (port 8500): `grpcio` and `tensorflow-serving-api`'s `PredictRequest` protos. Those
  protos import the `tensorflow` package they live in, but no TensorFlow op runs here: the
  tensors are built and read as plain protos (`tensor_proto`, `tensor_values`).

Usage:

    python -m export.client --host=localhost --model_name=resnet cat.jpg dog.png
    python -m export.client --host=serving.example.com --protocol=grpc --model_name=resnet \
        --signature=serving_default --version=3 --json cat.jpg

As a library:

    from export import client
    body = client.rest_body(image_bytes=[open("cat.jpg", "rb").read()])
    outputs = client.rest_predict("http://localhost:8501/v1/models/resnet:predict", body)
    request = client.predict_request("resnet", image_bytes=[open("cat.jpg", "rb").read()])
    outputs = client.grpc_predict("localhost:8500", request)   # {"class_names": [...], ...}
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from common import files
from common.errors import UsageError, first_line
from export import INPUT_BYTES, INPUT_IMAGES, OUTPUTS, SIGNATURE_BYTES, SIGNATURE_IMAGES

SIGNATURES = (SIGNATURE_BYTES, SIGNATURE_IMAGES)
REST_PORT, GRPC_PORT = 8501, 8500  # tensorflow/serving's defaults (--rest_api_port, --port)
TIMEOUT_S = 30.0


class ServingError(RuntimeError):
    """The server refused a request or could not be reached: one line, what and where."""


# --- request bodies ----------------------------------------------------------------------


def rest_body(image_bytes: Sequence[bytes] | None = None, images=None) -> dict:
    """A REST predict body: encoded `image_bytes` for `serving_bytes` (one instance per image,
    bytes as `{"b64": ...}`), or uint8 `images` [n, h, w, 3] (nested lists or an array) for
    `serving_default` (columnar `inputs`). Give exactly one of them."""
    if (images is None) == (image_bytes is None):
        raise ValueError("give exactly one of images or image_bytes")
    if image_bytes is not None:
        return {
            "signature_name": SIGNATURE_BYTES,
            "instances": [
                {INPUT_BYTES: {"b64": base64.b64encode(data).decode("ascii")}}
                for data in image_bytes
            ],
        }
    pixels = images.tolist() if hasattr(images, "tolist") else images
    return {"signature_name": SIGNATURE_IMAGES, "inputs": {INPUT_IMAGES: pixels}}


def tensor_proto(values, dtype: str):
    """A `TensorProto` without TensorFlow: `dtype` "string" (a list of bytes, shape [n]) or
    "uint8" (a NumPy array, any shape)."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    if dtype == "string":
        values = list(values)
        shape = [len(values)]
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=values)
    elif dtype == "uint8":
        import numpy as np

        array = np.ascontiguousarray(values, dtype=np.uint8)
        shape = list(array.shape)
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, tensor_content=array.tobytes())
    else:
        raise ValueError(f"unsupported dtype {dtype!r}")
    proto.tensor_shape.CopyFrom(
        tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in shape]
        )
    )
    return proto


def tensor_values(proto):
    """A `TensorProto`'s values without TensorFlow: a NumPy array, or a list of bytes for
    strings. Reads both encodings TF Serving uses (`tensor_content` and the `*_val` fields)."""
    import numpy as np
    from tensorflow.core.framework import types_pb2

    shape = [d.size for d in proto.tensor_shape.dim]
    if proto.dtype == types_pb2.DT_STRING:
        return list(proto.string_val)
    dtypes = {
        types_pb2.DT_FLOAT: (np.float32, "float_val"),
        types_pb2.DT_INT64: (np.int64, "int64_val"),
        types_pb2.DT_INT32: (np.int32, "int_val"),
        types_pb2.DT_UINT8: (np.uint8, "int_val"),
    }
    if proto.dtype not in dtypes:
        raise ServingError(f"unexpected output dtype {types_pb2.DataType.Name(proto.dtype)}")
    dtype, field = dtypes[proto.dtype]
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, dtype=dtype)
    else:
        flat = np.asarray(getattr(proto, field), dtype=dtype)
        count = int(np.prod(shape)) if shape else 1
        if flat.size == 1 and count > 1:  # a repeated value is sent once
            flat = np.full(count, flat[0], dtype)
    return flat.reshape(shape)


def predict_request(
    model_name: str,
    images=None,
    image_bytes: Sequence[bytes] | None = None,
    version: int | None = None,
):
    """A gRPC `PredictRequest`: uint8 `images` [n, h, w, 3] for `serving_default`, or encoded
    `image_bytes` for `serving_bytes` (exactly one of them)."""
    from tensorflow_serving.apis import predict_pb2

    if (images is None) == (image_bytes is None):
        raise ValueError("give exactly one of images or image_bytes")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    if version is not None:
        request.model_spec.version.value = version
    if images is not None:
        request.model_spec.signature_name = SIGNATURE_IMAGES
        request.inputs[INPUT_IMAGES].CopyFrom(tensor_proto(images, "uint8"))
    else:
        request.model_spec.signature_name = SIGNATURE_BYTES
        request.inputs[INPUT_BYTES].CopyFrom(tensor_proto(image_bytes, "string"))
    return request


def response_outputs(response) -> dict:
    """The outputs of a gRPC `PredictResponse`: arrays, or lists of bytes for strings."""
    return {name: tensor_values(proto) for name, proto in response.outputs.items()}


# --- talking to a server -----------------------------------------------------------------


def with_port(host: str, port: int) -> str:
    """`host:port`, unless `host` names its port already."""
    return host if ":" in host else f"{host}:{port}"


def rest_url(host: str, model_name: str, port: int = REST_PORT, version: int | None = None):
    """`http://host:port/v1/models/<name>[/versions/<v>]:predict`; `host` may name its scheme
    (`https://...`) and port."""
    scheme, _, address = host.rpartition("://")
    base = f"{scheme or 'http'}://{with_port(address, port)}"
    path = f"/v1/models/{model_name}" + (f"/versions/{version}" if version is not None else "")
    return f"{base}{path}:predict"


def rest_predict(url: str, body: dict, timeout: float = TIMEOUT_S) -> dict[str, list]:
    """POSTs `body` to a TF Serving REST predict URL; returns the outputs by name, one
    entry per image (row `predictions` and columnar `outputs` answers alike).

    Raises:
        ServingError: the server answered with an error, or cannot be reached.
    """
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = _error_text(e.read().decode(errors="replace"))
        raise ServingError(f"{url} answered HTTP {e.code}: {first_line(detail)}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ServingError(f"cannot reach {url} ({reason}); is TF Serving running?") from e
    if "predictions" in answer:  # row format: one dict (several outputs) per instance
        rows = answer["predictions"]
        return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}
    if "outputs" in answer:
        return dict(answer["outputs"])
    raise ServingError(f"{url} answered without predictions: {first_line(json.dumps(answer))}")


def _error_text(body: str) -> str:
    """TF Serving's `{"error": "..."}` message, else the body as it is."""
    try:
        document = json.loads(body)
    except ValueError:
        return body
    return str(document.get("error", body)) if isinstance(document, dict) else body


def grpc_predict(target: str, request, timeout: float = TIMEOUT_S) -> dict:
    """Sends a `PredictRequest` to `host:port`; returns `response_outputs` of the answer.

    Raises:
        ServingError: the server refused the request or cannot be reached.
    """
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout)
        except grpc.RpcError as e:
            raise ServingError(f"{target}: {e.code().name}: {first_line(e.details() or '')}") from e
    return response_outputs(response)


# --- the program -------------------------------------------------------------------------


def read_pixels(path: str):
    """uint8 RGB [1, h, w, 3] of an image file (Pillow), for `serving_default`."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(_read_bytes(path))) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)[np.newaxis]
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{path}: not a readable image ({first_line(e)})") from e


def _read_bytes(path: str) -> bytes:
    try:
        return files.read_bytes(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from e


def classify(args: argparse.Namespace) -> list[dict]:
    """One `{"image", "class_name", "probability", "outputs"}` per image, in order."""
    answers = []
    if args.signature == SIGNATURE_BYTES:  # every image in one request
        batches = [(args.images, {"image_bytes": [_read_bytes(p) for p in args.images]})]
    else:  # pixels: one request per image, since sizes may differ
        batches = [([p], {"images": read_pixels(p)}) for p in args.images]
    for paths, inputs in batches:
        if args.protocol == "rest":
            url = rest_url(args.host, args.model_name, args.rest_port, args.version)
            outputs = rest_predict(url, rest_body(**inputs), args.timeout)
        else:
            target = with_port(args.host.rpartition("://")[2], args.grpc_port)
            request = predict_request(args.model_name, version=args.version, **inputs)
            outputs = grpc_predict(target, request, args.timeout)
        missing = [name for name in OUTPUTS if name not in outputs]
        if missing:
            raise ServingError(f"the answer lacks {', '.join(missing)}: not this project's model?")
        for i, path in enumerate(paths):
            row = {name: _plain(outputs[name][i]) for name in OUTPUTS}
            answers.append(
                {
                    "image": path,
                    "class_name": row["class_names"],
                    "probability": row["probabilities"][row["classes"]],
                    "outputs": row,
                }
            )
    return answers


def _plain(value):
    """JSON-ready: bytes -> str, NumPy -> lists and numbers."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value.tolist() if hasattr(value, "tolist") else value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.client", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP, WebP)")
    parser.add_argument("--host", default="localhost", help="server name or address")
    parser.add_argument("--model_name", required=True, help="TF Serving's --model_name")
    parser.add_argument("--signature", choices=SIGNATURES, default=SIGNATURE_BYTES)
    parser.add_argument("--protocol", choices=("rest", "grpc"), default="rest")
    parser.add_argument("--rest_port", type=int, default=REST_PORT)
    parser.add_argument("--grpc_port", type=int, default=GRPC_PORT)
    parser.add_argument("--version", type=int, default=None, help="default: the latest")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print every output as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the client; returns the exit code (0, or 2 with one `error:` line)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        answers = classify(args)
    except (UsageError, ServingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answers, indent=2))
    else:
        for answer in answers:
            print(f"{answer['image']}\t{answer['class_name']}\t{answer['probability']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
