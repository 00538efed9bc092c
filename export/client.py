"""TF Serving requests for the exported SavedModel: gRPC `PredictRequest`, REST JSON, warmup.

Example (gRPC, with `grpcio` installed on the client):

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel("host:8500"))
    response = stub.Predict(client.predict_request("resnet", images=uint8_batch), 10.0)
    client.response_outputs(response)["class_names"]

REST: `POST http://host:8501/v1/models/resnet:predict` with `json=client.rest_body(...)`.
"""

from __future__ import annotations

import base64
import os

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from export import INPUT_BYTES, INPUT_IMAGES, SIGNATURE_BYTES, SIGNATURE_IMAGES


def predict_request(
    model_name: str,
    images: np.ndarray | None = None,
    image_bytes: list[bytes] | None = None,
    version: int | None = None,
) -> predict_pb2.PredictRequest:
    """A gRPC request: uint8 `images` [n, h, w, 3] for `serving_default`, or encoded
    `image_bytes` for `serving_bytes` (exactly one of them)."""
    if (images is None) == (image_bytes is None):
        raise ValueError("give exactly one of images or image_bytes")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    if version is not None:
        request.model_spec.version.value = version
    if images is not None:
        request.model_spec.signature_name = SIGNATURE_IMAGES
        tensor = tf.make_tensor_proto(np.asarray(images, dtype=np.uint8))
        request.inputs[INPUT_IMAGES].CopyFrom(tensor)
    else:
        request.model_spec.signature_name = SIGNATURE_BYTES
        tensor = tf.make_tensor_proto(list(image_bytes), dtype=tf.string)
        request.inputs[INPUT_BYTES].CopyFrom(tensor)
    return request


def rest_body(image_bytes: list[bytes]) -> dict:
    """A REST predict body for `serving_bytes`: one instance per image, bytes as `{"b64": ...}`."""
    return {
        "signature_name": SIGNATURE_BYTES,
        "instances": [
            {INPUT_BYTES: {"b64": base64.b64encode(data).decode("ascii")}} for data in image_bytes
        ],
    }


def response_outputs(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    """The outputs of a gRPC `PredictResponse` as NumPy arrays."""
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def write_warmup_requests(path: str, image_size: int) -> str:
    """Writes TF Serving's `assets.extra/tf_serving_warmup_requests` (one request per signature)."""
    grey = np.full((1, image_size, image_size, 3), 128, dtype=np.uint8)
    png = tf.io.encode_png(grey[0]).numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for request in (
            predict_request("warmup", images=grey),
            predict_request("warmup", image_bytes=[png]),
        ):
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(path: str) -> list[predict_pb2.PredictRequest]:
    """The requests in a warmup file (to check what TF Serving will replay)."""
    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        requests.append(log.predict_log.request)
    return requests
