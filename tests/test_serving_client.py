"""TF Serving short of the server: the documented base path, and `export.client`'s REST JSON
and gRPC `PredictRequest` answered by the SavedModel's own signatures.

A tiny conv net is exported once per module with `export_all` into `<tmp>/srv/models/resnet`
(the `--export_dir` of app.export's docstring). A local HTTP server and a local gRPC
PredictionService stand in for TF Serving: they decode each request as TF Serving does (REST
row/columnar JSON with `{"b64": ...}`; `tf.make_ndarray` of the request's TensorProtos), call
the signature and send its outputs back, so the client's requests and its reading of the
answers are what is tested. The REST client runs in a process where TensorFlow, NumPy and
Pillow cannot be imported.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
from concurrent import futures

import numpy as np
import pytest
import tensorflow as tf

from common.errors import UsageError, first_line
from export import all_formats, client, saved_model
from export.image_header import UNKNOWN_FORMAT as NOT_AN_IMAGE
from models import preprocessing
from models.bundle import load_model_bundle
from tests.helpers import (
    REPO,
    encode,
    random_images,
    save_bundle,
    tiny_model,
)
from tests.serving_stand_in import serve_predict_request, serving_rest

CLASSES = [f"class_{i}" for i in range(10)]
MODEL_NAME = "resnet"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """What `python -m app.export --formats=saved_model --export_dir=<tmp>/srv/models/resnet`
    writes for a tiny 16x16 model."""
    root = tmp_path_factory.mktemp("client")
    path = save_bundle(root / "model", tiny_model(size=16), preprocessing.cifar(16), CLASSES)
    directory = root / "srv" / "models" / "resnet"
    config = all_formats.ExportConfig(str(directory), formats=("saved_model",))
    all_formats.export_all(load_model_bundle(path), config)
    return directory


@pytest.fixture(scope="module")
def served(export_dir):
    return saved_model.load_serving(str(export_dir / all_formats.SAVED_MODEL_DIR))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """PNG and JPEG files of different sizes."""
    out = tmp_path_factory.mktemp("images")
    files = []
    for i, (h, w, fmt) in enumerate([(16, 16, "png"), (40, 24, "jpeg"), (20, 33, "png")]):
        path = out / f"image{i}.{'jpg' if fmt == 'jpeg' else fmt}"
        path.write_bytes(encode(random_images(1, h, w, seed=i)[0], fmt))
        files.append(str(path))
    return files


def test_the_documented_base_path_holds_versions_with_saved_model_pb(export_dir):
    """app.export's docstring: --export_dir=D gives TF Serving --model_base_path=D/saved_model,
    whose children are `<version>/saved_model.pb`; the compose file mounts that folder."""
    import app.export

    doc = app.export.__doc__
    export_flag = re.search(r"--export_dir=(\S+)", doc).group(1)
    base_flag = re.search(r"--model_base_path=(\S+)", doc).group(1)
    relative = os.path.relpath(base_flag, export_flag)
    assert relative == all_formats.SAVED_MODEL_DIR
    base = export_dir / relative
    assert sorted(os.listdir(base)) == ["1"]
    assert (base / "1" / "saved_model.pb").is_file()
    assert (base / "1" / "variables").is_dir()
    assert (base / "1" / saved_model.WARMUP_FILE).is_file()
    extra = base / "1" / saved_model.EXTRA_DIR
    assert (extra / "labels.txt").read_text().split() == CLASSES
    assert json.loads((extra / "preprocessing.json").read_text())["image_size"] == 16
    compose = (REPO / "deploy" / "serving-compose.yaml").read_text()
    source = re.search(r"source: \$\{MODEL_BASE_PATH:-(\S+)\}", compose).group(1)
    assert source.endswith(f"/export/{all_formats.SAVED_MODEL_DIR}")
    assert "--model_base_path=/models/resnet" in compose and "target: /models/resnet" in compose


# --------------------------------------------------------------------------------------
# Stand-ins for TF Serving: decode the request, call the signature, encode the answer.


@pytest.fixture(scope="module")
def rest_server(served):
    with serving_rest(served, MODEL_NAME) as address:
        yield address


@pytest.fixture(scope="module")
def grpc_server(served):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    seen = []

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            seen.append(request)
            try:
                return serve_predict_request(served.signatures, request)
            except tf.errors.InvalidArgumentError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, first_line(e))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", seen
    server.stop(None)


# --------------------------------------------------------------------------------------
# The client


def _expected(served, files: list[str], signature: str) -> dict:
    if signature == "serving_bytes":
        return served.predict_bytes([pathlib.Path(f).read_bytes() for f in files])
    rows = [served.predict(client.read_pixels(f)) for f in files]
    return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}


def _check(answers: list[dict], expected: dict, files: list[str]) -> None:
    assert [a["image"] for a in answers] == files
    names = [n.decode() for n in expected["class_names"]]
    assert [a["class_name"] for a in answers] == names
    assert [a["outputs"]["classes"] for a in answers] == expected["classes"].tolist()
    probabilities = np.array([a["outputs"]["probabilities"] for a in answers])
    np.testing.assert_allclose(probabilities, expected["probabilities"], atol=1e-6)
    assert len(set(names)) > 1  # the images are told apart


# `python -m export.client` where TensorFlow, NumPy and Pillow cannot be imported.
NO_TF = (
    "import runpy, sys\n"
    "for name in ('tensorflow', 'numpy', 'PIL', 'keras'):\n"
    "    sys.modules[name] = None\n"
    "runpy.run_module('export.client', run_name='__main__', alter_sys=True)\n"
)


def test_rest_client_needs_no_tensorflow(served, rest_server, image_files):
    args = [f"--host={rest_server}", "--model_name=resnet", "--json", *image_files]
    result = subprocess.run(
        [sys.executable, "-c", NO_TF, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check(json.loads(result.stdout), _expected(served, image_files, "serving_bytes"), image_files)


def test_rest_pixels_and_a_version(served, rest_server, image_files, capsys):
    args = ["--signature=serving_default", "--version=1", "--json"]
    code = client.main([f"--host=http://{rest_server}", "--model_name=resnet", *args, *image_files])
    assert code == 0, capsys.readouterr().err
    expected = _expected(served, image_files, "serving_default")
    _check(json.loads(capsys.readouterr().out), expected, image_files)


@pytest.mark.parametrize("signature", ["serving_bytes", "serving_default"])
def test_grpc_client(served, grpc_server, image_files, signature, capsys):
    target, seen = grpc_server
    args = ["--protocol=grpc", f"--signature={signature}", "--version=1", "--json"]
    code = client.main([f"--host={target}", "--model_name=resnet", *args, *image_files])
    assert code == 0, capsys.readouterr().err
    _check(
        json.loads(capsys.readouterr().out), _expected(served, image_files, signature), image_files
    )
    request = seen[-1]
    assert (request.model_spec.name, request.model_spec.version.value) == ("resnet", 1)
    assert request.model_spec.signature_name == signature


def test_table_output_and_one_line_errors(rest_server, grpc_server, image_files, tmp_path, capsys):
    assert client.main([f"--host={rest_server}", "--model_name=resnet", image_files[0]]) == 0
    path, name, probability = capsys.readouterr().out.strip().split("\t")
    assert (path, name in CLASSES, 0 < float(probability) <= 1) == (image_files[0], True, True)

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = [
        (
            [f"--host={rest_server}", str(text)],
            "HTTP 400: assertion failed: [not a JPEG, PNG, GIF, BMP or WebP image",
        ),
        ([f"--host={rest_server}", "--version=7", image_files[0]], "HTTP 404: Servable not found"),
        (["--host=127.0.0.1:1", image_files[0]], "cannot reach http://127.0.0.1:1/v1/models"),
        (["--host=x", str(tmp_path / "missing.png")], "missing.png: cannot read"),
        (["--host=x", "--signature=serving_default", str(text)], "notes.txt: not a readable"),
        (
            [f"--host={grpc_server[0]}", "--protocol=grpc", str(text)],
            f"INVALID_ARGUMENT: assertion failed: [{NOT_AN_IMAGE}",
        ),
    ]
    for args, message in cases:
        assert client.main(["--model_name=resnet", "--timeout=20", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_curl_body_script_matches_the_client(image_files, tmp_path):
    """deploy/rest_body.sh (the curl example's body) reads the images through a pipe and
    writes what the client sends."""
    result = subprocess.run(
        ["sh", str(REPO / "deploy" / "rest_body.sh"), *image_files],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body == client.rest_body(image_bytes=[pathlib.Path(f).read_bytes() for f in image_files])
    missing = subprocess.run(
        ["sh", str(REPO / "deploy" / "rest_body.sh"), str(tmp_path / "nope.jpg")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr and not missing.stdout


def test_tensor_values_reads_both_encodings():
    content = tf.make_tensor_proto(np.array([[0.25, 0.75]], np.float32))
    assert content.tensor_content  # packed bytes
    np.testing.assert_array_equal(client.tensor_values(content), [[0.25, 0.75]])
    listed = tf.make_tensor_proto([3, 4], dtype=tf.int64)
    listed.ClearField("tensor_content")
    listed.int64_val.extend([3, 4])
    np.testing.assert_array_equal(client.tensor_values(listed), [3, 4])
    strings = client.tensor_proto([b"a", b"bc"], "string")
    assert tf.make_ndarray(strings).tolist() == [b"a", b"bc"]
    assert client.tensor_values(strings) == [b"a", b"bc"]
    pixels = np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3)
    np.testing.assert_array_equal(tf.make_ndarray(client.tensor_proto(pixels, "uint8")), pixels)
    assert client.rest_url("h", "m") == "http://h:8501/v1/models/m:predict"
    assert client.rest_url("https://h:443", "m", version=2) == (
        "https://h:443/v1/models/m/versions/2:predict"
    )


def test_a_version_folder_stands_on_its_own(export_dir, served, image_files, tmp_path):
    """A version copied alone (as onto a server) still predicts with its class names and
    image size (assets.extra); an older export without them reads the export folder's."""
    import shutil

    from app import inference

    alone = tmp_path / "server" / "resnet"
    shutil.copytree(export_dir / "saved_model" / "1", alone / "7")
    predictor = inference.load_predictor(str(alone))
    assert (predictor.path, predictor.class_names) == (str(alone / "7"), CLASSES)
    assert predictor.image_size == 16
    pixels = [client.read_pixels(f)[0] for f in image_files]
    expected = np.concatenate([served.predict(p[np.newaxis])["probabilities"] for p in pixels])
    np.testing.assert_allclose(predictor.predict(pixels), expected, atol=1e-6)

    older = tmp_path / "older"
    shutil.copytree(export_dir, older)
    shutil.rmtree(older / "saved_model" / "1" / saved_model.EXTRA_DIR)
    predictor = inference.load_predictor(str(older / "saved_model"))
    assert (predictor.class_names, predictor.image_size) == (CLASSES, 16)
    assert predictor.folder == str(older)
    shutil.rmtree(alone / "7" / saved_model.EXTRA_DIR)
    with pytest.raises(UsageError, match=r"labels\.txt not found in"):
        inference.load_predictor(str(alone))
