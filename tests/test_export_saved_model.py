"""The TF Serving SavedModel: signatures, parity with Keras, requests, versions, errors.

Uses an untrained ResNet-18 (CIFAR stem, 32x32; the `resnet18` fixture) whose batch-norm
statistics and head are randomised so its probabilities are far from uniform (parity then
means something), or a tiny conv net where only the plumbing matters. Slow: the SavedModel
served from a separate process with plain TensorFlow.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from common.errors import UsageError
from export import client, saved_model
from models import preprocessing as preprocessing_lib
from tests.helpers import encode, keras_reference, random_images, tiny_model
from tests.serving_stand_in import serve_predict_request

CLASSES = [f"class_{i}" for i in range(10)]  # the resnet18 fixture's


@pytest.fixture(scope="module")
def served(resnet18, tmp_path_factory):
    """The ResNet-18 exported as version 1 of a SavedModel base path, loaded by TF."""
    base = tmp_path_factory.mktemp("serving") / "saved_model"
    version_dir = saved_model.export_saved_model(
        resnet18.model, resnet18.class_names, resnet18.preprocessing, str(base)
    )
    assert version_dir == str(base / "1")
    return saved_model.load_serving(str(base))


def test_signatures_follow_the_serving_contract(served):
    sigs = served.signatures
    assert set(sigs) == {"serving_default", "serving_bytes"}
    images = sigs["serving_default"].structured_input_signature[1]
    assert list(images) == ["images"]
    assert images["images"].dtype == tf.uint8
    assert images["images"].shape.as_list() == [None, None, None, 3]
    encoded = sigs["serving_bytes"].structured_input_signature[1]
    assert list(encoded) == ["image_bytes"]
    assert encoded["image_bytes"].dtype == tf.string
    assert encoded["image_bytes"].shape.as_list() == [None]
    for name in sigs:
        outputs = sigs[name].structured_outputs
        assert {k: v.dtype for k, v in outputs.items()} == {
            "probabilities": tf.float32,
            "classes": tf.int64,
            "class_names": tf.string,
        }
        assert outputs["probabilities"].shape.as_list() == [None, 10]


@pytest.mark.parametrize("height,width", [(32, 32), (45, 27), (16, 64)])
def test_serving_default_equals_keras_at_any_size(served, resnet18, height, width):
    images = random_images(6, height, width, seed=height)
    out = served.predict(images)
    ref = keras_reference(resnet18.model, resnet18.preprocessing, images)
    assert ref.max(-1).mean() > 0.4  # peaked probabilities, not a uniform blur
    np.testing.assert_array_less(np.abs(out["probabilities"] - ref), 1e-5)
    np.testing.assert_array_equal(out["classes"], ref.argmax(-1))
    assert [n.decode() for n in out["class_names"]] == [CLASSES[i] for i in ref.argmax(-1)]


def test_serving_bytes_decodes_jpeg_and_png_of_mixed_sizes(served, resnet18):
    shapes = [(32, 32), (40, 56), (24, 24), (64, 48)]
    images = [random_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(shapes)]
    encoded = [
        encode(im, fmt) for im, fmt in zip(images, ["png", "jpeg", "jpeg", "png"], strict=True)
    ]
    out = served.predict_bytes(encoded)
    for i, data in enumerate(encoded):
        pixels = tf.io.decode_image(data, channels=3).numpy()[np.newaxis]
        ref = keras_reference(resnet18.model, resnet18.preprocessing, pixels)[0]
        np.testing.assert_array_less(np.abs(out["probabilities"][i] - ref), 1e-5)
        assert out["classes"][i] == ref.argmax()
        assert out["class_names"][i].decode() == CLASSES[ref.argmax()]


def _rest_instances(body: dict) -> dict[str, tf.Tensor]:
    """TF Serving's REST row format: a list of instances, `{"b64": ...}` for binary strings."""
    rows = json.loads(json.dumps(body))["instances"]
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    return {
        name: tf.constant([base64.b64decode(v["b64"]) if isinstance(v, dict) else v for v in vals])
        for name, vals in columns.items()
    }


def test_grpc_request_and_rest_body_give_the_same_classes(served):
    images = random_images(5, 32, 32, seed=7)
    direct = served.predict(images)

    request = client.predict_request("resnet", images=images, version=1)
    assert request.model_spec.signature_name == "serving_default"
    outputs = client.response_outputs(serve_predict_request(served.signatures, request))
    np.testing.assert_array_equal(outputs["classes"], direct["classes"])
    np.testing.assert_array_equal(outputs["class_names"], direct["class_names"])
    np.testing.assert_allclose(outputs["probabilities"], direct["probabilities"], atol=1e-6)

    pngs = [encode(image, "png") for image in images]  # lossless: the same pixels
    body = client.rest_body(pngs)
    assert body["signature_name"] == "serving_bytes"
    assert set(body["instances"][0]["image_bytes"]) == {"b64"}
    rest = served.signatures[body["signature_name"]](**_rest_instances(body))
    np.testing.assert_array_equal(rest["classes"].numpy(), direct["classes"])
    np.testing.assert_array_equal(rest["class_names"].numpy(), direct["class_names"])

    grpc_bytes = client.predict_request("resnet", image_bytes=pngs)
    outputs = client.response_outputs(serve_predict_request(served.signatures, grpc_bytes))
    np.testing.assert_array_equal(outputs["classes"], direct["classes"])


def test_grpc_predict_over_the_wire(served):
    """A real gRPC PredictionService on localhost answering from the SavedModel's signatures,
    called through the stub as a TF Serving client would."""
    from concurrent import futures

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            return serve_predict_request(served.signatures, request)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            images = random_images(3, 48, 40, seed=9)
            response = stub.Predict(client.predict_request("resnet", images=images), 30.0)
    finally:
        server.stop(None)
    outputs = client.response_outputs(response)
    direct = served.predict(images)
    np.testing.assert_array_equal(outputs["classes"], direct["classes"])
    np.testing.assert_array_equal(outputs["class_names"], direct["class_names"])


def test_warmup_requests_replay_through_both_signatures(served):
    path = os.path.join(served.path, saved_model.WARMUP_FILE)
    requests = saved_model.read_warmup_requests(path)
    assert sorted(r.model_spec.signature_name for r in requests) == [
        "serving_bytes",
        "serving_default",
    ]
    for request in requests:
        outputs = client.response_outputs(serve_predict_request(served.signatures, request))
        assert outputs["probabilities"].shape == (1, 10)


@pytest.mark.parametrize(
    "images,expected",
    [
        (np.zeros((32, 32, 3), np.uint8), "is not compatible with expected shape [?,?,?,3]"),
        (np.zeros((1, 32, 32, 4), np.uint8), "is not compatible with expected shape [?,?,?,3]"),
        (np.zeros((1, 32, 32, 3), np.float32), "expected to be a uint8 tensor but is a float"),
    ],
    ids=["rank3", "rgba", "float32"],
)
def test_serving_default_rejects_wrong_rank_or_dtype(served, images, expected):
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError)) as caught:
        served.signatures["serving_default"](images=tf.constant(images))
    assert expected in str(caught.value)
    with pytest.raises(UsageError, match=r"images must be uint8 \[batch, height, width, 3\]"):
        served.predict(images)


def test_serving_bytes_rejects_bytes_that_are_not_an_image(served):
    good = encode(random_images(1, 32, 32)[0], "png")
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF, BMP or WebP"):
        served.signatures["serving_bytes"](image_bytes=tf.constant([good, b"not an image"]))
    with pytest.raises(UsageError) as caught:
        served.predict_bytes([b"GIF89a\x01\x00\x01\x00 broken"])
    message = str(caught.value)
    assert "\n" not in message and "an input was refused" in message and "GIF" in message
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected shape"):
        served.signatures["serving_bytes"](image_bytes=tf.constant([[good]]))


def _tree_digest(path: str) -> str:
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(full.encode())
            digest.update(str(os.stat(full).st_mtime_ns).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_versions_increment_and_leave_existing_ones_alone(tmp_path, monkeypatch):
    model, pre = tiny_model(), preprocessing_lib.cifar(32)
    base = tmp_path / "saved_model"
    (base / "v0.1").mkdir(parents=True)  # not an integer: TF Serving ignores it, so do we
    first = saved_model.export_saved_model(model, CLASSES, pre, str(base))
    before = _tree_digest(first)
    second = saved_model.export_saved_model(model, CLASSES, pre, str(base))
    assert (first, second) == (str(base / "1"), str(base / "2"))
    assert _tree_digest(first) == before
    assert saved_model.versions(str(base)) == [1, 2]
    assert saved_model.resolve_version(str(base)) == second
    assert oct(os.stat(second).st_mode & 0o777) == oct(0o755)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saved_model, "write_warmup_requests", broken)
    with pytest.raises(OSError, match="disk full"):
        saved_model.export_saved_model(model, CLASSES, pre, str(base))
    assert sorted(os.listdir(base)) == ["1", "2", "v0.1"]  # no version 3, no temp folder
    with pytest.raises(UsageError, match="no SavedModel in"):
        saved_model.resolve_version(str(base / "v0.1"))


# --------------------------------------------------------------------------------------
# Slow: a separate plain-TensorFlow process

PLAIN_TF_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    base, inputs, outputs = sys.argv[1:4]
    data = np.load(inputs, allow_pickle=False)
    versions = sorted(int(name) for name in tf.io.gfile.listdir(base) if name.strip("/").isdigit())
    loaded = tf.saved_model.load(f"{base}/{versions[-1]}")
    by_images = loaded.signatures["serving_default"](images=tf.constant(data["images"]))
    by_bytes = loaded.signatures["serving_bytes"](image_bytes=tf.constant(list(data["encoded"])))
    np.savez(
        outputs,
        images_probabilities=by_images["probabilities"].numpy(),
        images_classes=by_images["classes"].numpy(),
        bytes_probabilities=by_bytes["probabilities"].numpy(),
        bytes_class_names=by_bytes["class_names"].numpy().astype(bytes),
        project_modules=np.array(
            sorted(m for m in sys.modules if m.split(".")[0] in {"app", "models", "export"})
        ),
    )
    """
)


@pytest.mark.slow
def test_saved_model_equals_keras_in_a_plain_tensorflow_process(served, resnet18, tmp_path):
    images = random_images(8, 40, 40, seed=11)
    encoded = np.array(
        [encode(im, "jpeg") for im in images[:4]] + [encode(im, "png") for im in images[4:]],
        dtype=object,
    )
    np.savez(tmp_path / "in.npz", images=images, encoded=encoded.astype(bytes))
    script = tmp_path / "serve.py"
    script.write_text(PLAIN_TF_SCRIPT)
    base = os.path.dirname(served.path)
    # -I: isolated mode, neither the repository nor PYTHONPATH is importable.
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(script),
            base,
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert out["project_modules"].tolist() == []

    ref = keras_reference(resnet18.model, resnet18.preprocessing, images)
    np.testing.assert_array_less(np.abs(out["images_probabilities"] - ref), 1e-5)
    np.testing.assert_array_equal(out["images_classes"], ref.argmax(-1))
    decoded = np.stack([tf.io.decode_image(e, channels=3).numpy() for e in encoded])
    ref_bytes = keras_reference(resnet18.model, resnet18.preprocessing, decoded)
    np.testing.assert_array_less(np.abs(out["bytes_probabilities"] - ref_bytes), 1e-5)
    assert [n.decode() for n in out["bytes_class_names"]] == [
        CLASSES[i] for i in ref_bytes.argmax(-1)
    ]
