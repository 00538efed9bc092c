"""What keeps a bucket safe and a bad path short: the lock object of a run (fresh: refused,
stale: taken over, kept fresh by its heartbeat), a gcsfuse mount named, a SavedModel version
published file by file with saved_model.pb last, and a path that cannot work (unknown scheme,
no network, no credentials, a metadata server that never answers) refused in one line within
seconds. `ram://` stands in for the bucket."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import uuid

import pytest
import tensorflow as tf

from common import files, lock
from common.lock import LockedError, hold
from export import saved_model
from models import preprocessing
from tests.helpers import REPO, error_lines, program_flags, tiny_model


@pytest.fixture
def ram_root():
    root = f"ram://guards-{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(root)
    yield root
    files.rmtree(root)


PIPE = {"capture_output": True, "text": True, "check": True}


def _holder(path: str) -> dict:
    return json.loads(files.read_text(path))


# --- the lock object -----------------------------------------------------------------------


def test_a_fresh_lock_object_is_refused_naming_its_holder(ram_root):
    path = files.join(ram_root, "run", "train.lock")
    with hold(path, "app.train", settle=0) as previous:
        assert previous == {}
        mine = _holder(path)
        assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
        with pytest.raises(LockedError) as caught, hold(path, "app.train", settle=0):
            pass
        message = str(caught.value)
        assert f"{files.join(ram_root, 'run')} is in use by app.train pid {os.getpid()}" in message
        assert "taken over once its heartbeat is 150 s old" in message and "\n" not in message
        assert _holder(path)["token"] == mine["token"]  # the refused one changed nothing
    assert not files.exists(path)  # released


def test_a_stale_lock_object_is_taken_over(ram_root):
    path = files.join(ram_root, "train.lock")
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=lock.STALE_SECONDS + 5)
    dead = {
        "pid": 4242,
        "host": "node-7",
        "started": "x",
        "token": "t",
        "heartbeat": old.isoformat(),
    }
    files.write_json(path, dead)
    with hold(path, "app.train", settle=0) as previous:
        assert previous == dead
        assert _holder(path)["pid"] == os.getpid()
    files.write_text(path, "not json")  # unreadable: nobody can be said to hold it
    with hold(path, "app.train", settle=0) as previous:
        assert previous == {}


def test_a_fresh_lock_object_of_a_process_gone_from_this_host_is_taken_over(ram_root):
    """A restarted container: same host name, the old process gone (or its pid reused by
    this one), the heartbeat still fresh."""
    path = files.join(ram_root, "train.lock")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **PIPE)
    for pid in (int(ended.stdout), os.getpid()):
        gone = {"pid": pid, "host": socket.gethostname(), "token": "old", "heartbeat": lock._now()}
        files.write_json(path, gone)
        with hold(path, "app.train", settle=0) as previous:
            assert previous == gone
    files.write_json(path, {**gone, "host": "another-host"})
    with pytest.raises(LockedError, match="on host another-host"), hold(path, "app.train"):
        pass


def test_the_heartbeat_keeps_the_lock_object_fresh(ram_root):
    path = files.join(ram_root, "train.lock")
    with hold(path, "app.train", heartbeat=0.1, stale_after=0.5, settle=0):
        first = _holder(path)
        time.sleep(1.0)  # twice stale_after: only the heartbeat keeps it fresh
        later = _holder(path)
        assert later["token"] == first["token"] and later["heartbeat"] > first["heartbeat"]
        assert lock.heartbeat_age(later) < 0.5
        with pytest.raises(LockedError), hold(path, "app.train", stale_after=0.5, settle=0):
            pass
    assert not files.exists(path)


def test_of_two_runs_taking_the_lock_at_once_the_last_writer_keeps_it(ram_root, monkeypatch):
    path = files.join(ram_root, "train.lock")
    other = {"pid": 99, "host": "node-2", "started": "x", "token": "theirs", "purpose": "app.train"}

    def meanwhile(seconds):  # the other run writes its own while this one settles
        files.write_json(path, {**other, "heartbeat": lock._now()})

    monkeypatch.setattr(lock.time, "sleep", meanwhile)
    taken = "was just taken by app.train pid 99 on host node-2"
    with pytest.raises(LockedError, match=taken), hold(path, "app.train"):
        pass
    assert _holder(path)["token"] == "theirs"  # left alone


MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw
35 22 0:40 / /mnt/gcs rw,nosuid,nodev,relatime - fuse.gcsfuse my-bucket rw,user_id=0
36 22 0:41 / /mnt/gcs/local\\040disk rw - ext4 /dev/sdb rw
"""


def test_a_gcsfuse_mount_is_recognised_by_its_file_system_type():
    assert lock.mount_of("/mnt/gcs/runs/r1", MOUNTINFO) == ("/mnt/gcs", "fuse.gcsfuse", "my-bucket")
    assert lock.is_gcsfuse("/mnt/gcs/runs/r1", MOUNTINFO)
    assert not lock.is_gcsfuse("/mnt/gcsx/runs", MOUNTINFO)  # a prefix, not a parent
    assert not lock.is_gcsfuse("/mnt/gcs/local disk/r1", MOUNTINFO)  # mounted over it
    assert not lock.is_gcsfuse("/tmp")  # this machine's own mountinfo


# --- publishing a SavedModel version into a bucket -----------------------------------------


def test_a_version_is_published_file_by_file_with_saved_model_pb_last(ram_root, monkeypatch):
    base = files.join(ram_root, "saved_model")
    # What a killed export left: version 1 without its saved_model.pb (never served).
    files.write_text(files.join(base, "1", "variables", "variables.index"), "half")
    assert saved_model.versions(base) == []
    renamed = []
    real_rename = files.rename

    def recorded(source, target):
        renamed.append((source, target))
        real_rename(source, target)

    monkeypatch.setattr(files, "rename", recorded)
    version = saved_model.export_saved_model(
        tiny_model(2), ["cat", "dog"], preprocessing.cifar(32), base, warmup=False
    )
    assert version == files.join(base, "1")  # the half version's number, reused
    targets = [files.relpath(target, version) for _, target in renamed]
    assert targets[-1] == "saved_model.pb" and targets.count("saved_model.pb") == 1
    assert {"variables/variables.index", "assets.extra/labels.txt"} <= set(targets)
    for source, target in renamed:  # every upload under a name the lifecycle rule removes
        assert files.dirname(source) == files.dirname(target)
        assert files.basename(source).startswith(".") and source.endswith(files.TEMP_SUFFIX)
    assert saved_model.versions(base) == [1]
    assert files.read_bytes(files.join(version, "variables", "variables.index")) != b"half"
    leftovers = [n for _, _, names in files.walk(base) for n in names if n.startswith(".")]
    assert leftovers == []
    served = saved_model.load_serving(base)
    assert served.class_names == ["cat", "dog"]


# --- paths that cannot work: one line, exit code 2, within seconds --------------------------

# Runs a program as `python -m` does, timing it from after its imports (TensorFlow's import
# alone takes many seconds on a busy machine).
TIMED = """
import atexit, importlib, sys, time
import tensorflow
module = importlib.import_module(sys.argv[1])
module.define_flags()
start = time.monotonic()
atexit.register(lambda: print(f"seconds {time.monotonic() - start:.2f}", file=sys.stderr))
from app import cli
sys.argv = sys.argv[1:]
cli.run(module.main)
"""


@pytest.mark.slow
def test_paths_that_cannot_work_are_one_line_within_seconds(tmp_path):
    tarpit = socket.socket()  # accepts connections (the kernel does) and never answers
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(8)
    silent = f"127.0.0.1:{tarpit.getsockname()[1]}"
    no_credentials = {"CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}
    cases = {
        "scheme": (
            ["app.train", "--model_dir=s3://my-bucket/runs/r1"],
            {},
            "s3:// is not supported",
        ),
        "offline": (
            ["app.train", "--model_dir=gs://my-bucket/runs/r1"],
            no_credentials,
            "cannot use Google Cloud Storage",
        ),
        "metadata": (
            ["app.evaluate", "--model=gs://my-bucket/runs/r1/best.keras"],
            {**no_credentials, "GCE_METADATA_HOST": "10.255.255.1"},
            "the metadata server at 10.255.255.1 ",
        ),
        "silent": (
            ["app.export", "--model=gs://my-bucket/runs/r1/best.keras"],
            {**no_credentials, "GCE_METADATA_HOST": silent},
            f"the metadata server at {silent} did not answer within 2 s",
        ),
        "ram": (["app.predict", "--model=ram://nothing/best.keras", "x.jpg"], {}, "not found"),
    }
    base = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    running = {}
    for name, (argv, env, _) in cases.items():
        (tmp_path / name).mkdir()
        running[name] = subprocess.Popen(
            [sys.executable, "-c", TIMED, *argv],
            cwd=tmp_path / name,
            env={**base, **env, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        for name, proc in running.items():
            argv, _, says = cases[name]
            _, stderr = proc.communicate(timeout=180)
            assert proc.returncode == 2, (name, stderr[-3000:])
            (line,) = error_lines(stderr)
            assert argv[1].split("=", 1)[1] in line and says in line, (name, line)
            seconds = float(stderr.split("seconds ")[-1])
            assert seconds < 10, (name, seconds)  # not TF's minutes of retries
            assert list((tmp_path / name).iterdir()) == []  # no local `gs:`, `s3:` or `ram:`
    finally:
        for proc in running.values():
            proc.kill()
        tarpit.close()


def test_every_command_on_the_buckets_page_parses_with_the_programs_own_flags(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes' --flagfile paths
    text = (REPO / "docs" / "buckets.md").read_text()
    commands = [
        shlex.split(line) for line in text.splitlines() if line.startswith("python -m app.")
    ]
    assert {command[2] for command in commands} == {
        "app.train", "app.evaluate", "app.predict", "app.export", "app.visualize"
    }  # fmt: skip
    for command in commands:
        with program_flags(command[2], *command[3:]) as (_, argv):
            if command[2] != "app.predict":  # the only one with arguments: its images
                assert argv[1:] == [], command
