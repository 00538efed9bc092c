"""Stand-ins for TF Serving in the tests: its gRPC `Predict` and its REST API, answered by the
signatures of a SavedModel loaded in-process (the real server needs Docker and a network)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import threading

import tensorflow as tf

from common.errors import first_line


def serve_predict_request(signatures, request):
    """What TF Serving does with a gRPC `PredictRequest`: TensorProtos in, the named
    signature of a loaded SavedModel, TensorProtos out (a `PredictResponse`)."""
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    signature = signatures[request.model_spec.signature_name or "serving_default"]
    inputs = {name: tf.constant(tf.make_ndarray(t)) for name, t in request.inputs.items()}
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(request.model_spec)
    for name, value in signature(**inputs).items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
    return response


# --- a stand-in for TF Serving's REST API --------------------------------------------------


def rest_answer(signatures, body: dict) -> dict:
    """TF Serving's REST predict: row (`instances`) or columnar (`inputs`) requests, decoded
    as TF Serving decodes them (`{"b64": ...}` for strings), answered by the signature."""
    signature = signatures[body.get("signature_name", "serving_default")]
    specs = signature.structured_input_signature[1]

    def tensor(name, value):
        if specs[name].dtype == tf.string:
            value = [base64.b64decode(v["b64"]) if isinstance(v, dict) else v for v in value]
        return tf.constant(value, dtype=specs[name].dtype)

    if "instances" in body:
        rows = body["instances"]
        inputs = {name: tensor(name, [row[name] for row in rows]) for name in rows[0]}
    else:
        inputs = {name: tensor(name, value) for name, value in body["inputs"].items()}
    outputs = {
        name: [v.decode() if isinstance(v, bytes) else v for v in value.numpy().tolist()]
        for name, value in signature(**inputs).items()
    }
    if "instances" in body:
        count = len(body["instances"])
        return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(count)]}
    return {"outputs": outputs}


@contextlib.contextmanager
def serving_rest(served, model_name: str, port: int = 0):
    """Serves `served` (`export.saved_model.load_serving`) as TF Serving's REST API would on
    127.0.0.1:`port` (0: any free one): `/v1/models/<model_name>[/versions/<its version>]:predict`,
    404 for other paths, 400 with TF's message for a bad request. Yields `127.0.0.1:<port>`."""
    version = os.path.basename(served.path)
    base = f"/v1/models/{model_name}"
    paths = {f"{base}:predict", f"{base}/versions/{version}:predict"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status = 200
            if self.path not in paths:
                status, answer = 404, {"error": f"Servable not found for request: {self.path}"}
            else:
                try:
                    answer = rest_answer(served.signatures, body)
                except tf.errors.InvalidArgumentError as e:
                    status, answer = 400, {"error": first_line(e)}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
