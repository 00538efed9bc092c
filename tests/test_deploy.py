"""Containers and manifests (no Docker engine or cluster here): what can be checked without
one. The Dockerfile installs what `make venv` installs and copies files that exist; the
TFJob manifest runs that image with real `app.train` flags; the TF Serving compose file pins
the release of the pinned `tensorflow-serving-api` and mounts the export's base path.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess

from tests.helpers import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
TFJOB = (REPO / "deploy" / "tfjob.yaml").read_text()
TFJOB_BUCKET = (REPO / "deploy" / "tfjob-bucket.yaml").read_text()
COMPOSE = (REPO / "deploy" / "serving-compose.yaml").read_text()


def _pins() -> dict[str, str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def _instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def _flow_list(text: str, key: str) -> list[str]:
    """A `key: [...]` flow sequence of double-quoted strings (valid JSON) in a YAML file."""
    return json.loads(re.search(rf"^\s*{key}: (\[.*\])\s*$", text, re.M).group(1))


def test_dockerfile_installs_what_make_venv_installs():
    makefile = (REPO / "Makefile").read_text()
    make_line = re.search(r"^\t\$\(PY\) (-m pip install .*-r requirements\.txt)$", makefile, re.M)
    run = next(i for i in _instructions(DOCKERFILE) if i.startswith("RUN") and "pip" in i)
    assert f"python {make_line.group(1)}" in run
    # The GPU variant adds the CUDA wheels at the pinned TensorFlow version.
    sed = re.search(r"\$\((sed [^)]*)\)", run).group(1)
    version = subprocess.run(
        ["sh", "-c", sed], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert version == _pins()["tensorflow"]
    assert '"tensorflow[and-cuda]==$(' in run and 'if [ "$DEVICE" = gpu ]' in run
    assert "ARG DEVICE=cpu" in DOCKERFILE  # CPU by default
    python = re.search(r"ARG PYTHON_VERSION=(\d+)\.(\d+)", DOCKERFILE).groups()
    pyproject = (REPO / "pyproject.toml").read_text()
    least = re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject).groups()
    assert tuple(map(int, python)) >= tuple(map(int, least))


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    ignored = [
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [shlex.split(i)[1:-1] for i in _instructions(DOCKERFILE) if i.startswith("COPY")]
    sources = [source for sources in copies for source in sources]
    assert "requirements.txt" in sources and "app/" in sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") not in ignored, source
    # Every package the programs import is copied.
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests"}
    assert {s.rstrip("/") for s in sources} >= packages - {"bench"}
    assert (REPO / "app" / "configs" / "cifar10_cpu_quick.flags").is_file()  # the CMD's recipe


def test_tfjob_runs_the_gpu_image_of_the_dockerfile():
    image = re.search(r"^\s*image: (\S+)$", TFJOB, re.M).group(1)
    built = re.findall(r"docker build (?:--build-arg DEVICE=(\w+) )?-t (\S+) \.", DOCKERFILE)
    tags = {tag.split("/")[-1]: device or "cpu" for device, tag in built}
    assert tags == {"resnet-keras:1.0": "cpu", "resnet-keras:1.0-gpu": "gpu"}
    assert tags[image.split("/")[-1]] == "gpu" and "nvidia.com/gpu: 1" in TFJOB
    assert f"-t {image} ." in TFJOB  # the manifest's comment builds exactly that image
    assert "- name: tensorflow" in TFJOB and "kind: TFJob" in TFJOB


def test_tfjob_command_is_an_app_train_command_line():
    """Every flag is one app.train defines (a TrainConfig field or a data flag), with a value
    it accepts; the recipe exists; the model_dir is on the shared volume."""
    import dataclasses

    from app.training import TrainConfig

    command = _flow_list(TFJOB, "command")
    assert command[:3] == ["python", "-m", "app.train"]
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    data_flags = {"dataset", "data_dir", "validation_split", "train_limit", "eval_limit"}
    given = dict(arg[2:].split("=", 1) for arg in command[3:])
    assert set(given) <= set(fields) | data_flags | {"flagfile"}, given
    assert (REPO / given["flagfile"]).is_file()
    assert given["strategy"] in fields["strategy"].metadata["choices"]
    mount = re.search(r"\{name: runs, mountPath: (\S+)\}", TFJOB).group(1)
    assert given["model_dir"].startswith(mount + "/")


def test_the_bucket_tfjob_is_the_volume_one_with_gs_paths_and_workload_identity():
    """deploy/tfjob-bucket.yaml: the same job, image and flags as deploy/tfjob.yaml, but data
    and runs in a bucket (no volume) and a Kubernetes service account for the credentials."""
    volume, bucket = _flow_list(TFJOB, "command"), _flow_list(TFJOB_BUCKET, "command")
    given = dict(arg[2:].split("=", 1) for arg in bucket[3:])
    assert (
        bucket[:3] == volume[:3]
        and given.keys() == dict(arg[2:].split("=", 1) for arg in volume[3:]).keys()
    )
    assert given["data_dir"].startswith("gs://") and given["model_dir"].startswith("gs://")
    image = re.compile(r"^\s*image: (\S+)$", re.M)
    assert image.search(TFJOB_BUCKET).group(1) == image.search(TFJOB).group(1)
    account = re.search(r"^\s*serviceAccountName: (\S+)", TFJOB_BUCKET, re.M).group(1)
    assert f"kubectl create serviceaccount {account}" in TFJOB_BUCKET
    assert f"[default/{account}]" in TFJOB_BUCKET
    for volume_key in ("volumeMounts", "volumes", "persistentVolumeClaim"):
        assert volume_key not in TFJOB_BUCKET
    assert "- name: tensorflow" in TFJOB_BUCKET and "kind: TFJob" in TFJOB_BUCKET


def test_serving_compose_pins_the_matching_release_and_the_documented_flags():
    image = re.search(r"^\s*image: (\S+)", COMPOSE, re.M).group(1)
    assert image == f"tensorflow/serving:{_pins()['tensorflow-serving-api']}"
    assert _pins()["tensorflow-serving-api"] == _pins()["tensorflow"]
    flags = dict(arg[2:].split("=", 1) for arg in _flow_list(COMPOSE, "command"))
    assert (flags["port"], flags["rest_api_port"]) == ("8500", "8501")
    assert f"target: {flags['model_base_path']}" in COMPOSE
    assert flags["enable_model_warmup"] == "true" and flags["enable_batching"] == "true"
    assert f"target: {flags['batching_parameters_file']}" in COMPOSE
    assert "source: ./batching.config" in COMPOSE
    batching = (REPO / "deploy" / "batching.config").read_text()
    fields = re.findall(r"^(\w+) \{ value: \d+ \}$", batching, re.M)
    assert fields and len(fields) == len(batching.strip().splitlines())
    assert set(fields) <= {
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "pad_variable_length_inputs",
    }
