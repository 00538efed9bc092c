"""The file layer (`common.files`): local paths as before, any TensorFlow file system through
`tf.io.gfile`, with TF's in-process `ram://` standing in for a bucket (each test under its own
root, since ram:// lives as long as the process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import tensorflow as tf

from common import files
from tests.helpers import REPO


@pytest.fixture
def ram_root() -> str:
    """A fresh ram:// folder."""
    root = f"ram://test-files-{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(root)
    return root


def test_schemes_and_paths():
    assert files.scheme("gs://b/x") == "gs" and files.scheme("/tmp/x") == ""
    assert files.is_remote("ram://x") and not files.is_remote("file:///tmp/x")
    assert files.resolve("file:///tmp/x") == "/tmp/x"
    assert files.resolve("~/x") == os.path.expanduser("~/x")
    assert files.join("gs://b/runs", "r1", "best.keras") == "gs://b/runs/r1/best.keras"
    assert files.dirname("gs://b/runs/r1/best.keras") == "gs://b/runs/r1"
    assert files.dirname("gs://b/x") == "gs://b" and files.dirname("gs://b") == "gs://b"
    assert files.basename("gs://b/runs/r1/") == "r1"


@pytest.mark.parametrize("scheme", ["s3", "hdfs", "az", "foo"])
def test_an_unregistered_scheme_is_one_clear_error(scheme, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = f"{scheme}://bucket/runs/r1"
    for call in (files.exists, files.makedirs, files.read_bytes, files.listdir):
        with pytest.raises(files.StorageError, match=f"{path}: {scheme}:// is not supported"):
            call(path)
    with pytest.raises(files.StorageError, match="gs://, ram://"):
        files.write_text(f"{path}/x.txt", "x")
    assert os.listdir(tmp_path) == []  # never a local folder named `s3:`


def test_a_rewrite_on_ram_replaces_the_file_instead_of_appending(ram_root):
    """TF's ram:// appends when an existing file is opened for writing: never rewrite in
    place, write a temporary name and rename it over."""
    path = files.join(ram_root, "run", "metrics.json")
    files.write_json(path, {"epoch": 1})
    files.write_json(path, {"epoch": 2})
    assert json.loads(files.read_text(path)) == {"epoch": 2}
    assert files.listdir(files.join(ram_root, "run")) == ["metrics.json"]  # no temporaries
    assert files.isfile(path) and not files.isdir(path) and files.isdir(files.dirname(path))
    assert files.size(path) == len(files.read_bytes(path))


def test_atomic_path_uploads_only_a_complete_file(ram_root):
    path = files.join(ram_root, "best.keras")
    with files.atomic_path(path, suffix=".keras") as tmp:
        assert not files.is_remote(tmp) and tmp.endswith(".keras")
        with open(tmp, "wb") as f:
            f.write(b"first")
    with pytest.raises(RuntimeError), files.atomic_path(path, suffix=".keras") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half of a second")
        raise RuntimeError("killed while writing")
    assert files.read_bytes(path) == b"first"  # the failed write left the old file
    assert files.listdir(ram_root) == ["best.keras"]
    with files.local_copy(path) as local, open(local, "rb") as f:
        assert f.read() == b"first"


def test_temporaries_in_a_bucket_end_with_the_lifecycle_suffix(ram_root, monkeypatch):
    """What a writer killed between its upload and its rename leaves behind is named for the
    bucket's lifecycle rule (and hidden), and the target is untouched."""
    path = files.join(ram_root, "history.csv")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "rename", killed)
    monkeypatch.setattr(files, "remove", lambda path: None)  # a SIGKILL cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        files.write_text(path, "epoch\n1\n")
    monkeypatch.undo()
    (leftover,) = tf.io.gfile.listdir(ram_root)
    assert leftover.startswith(".history.csv.") and leftover.endswith(files.TEMP_SUFFIX)
    assert not files.exists(path)


def test_listing_globbing_and_removing(ram_root, tmp_path):
    for root in (ram_root, str(tmp_path)):
        files.write_text(files.join(root, "train-00000-of-00002"), "a")
        files.write_text(files.join(root, "train-00001-of-00002"), "b")
        files.write_text(files.join(root, "sub", "labels.txt"), "cat\n")
        assert files.listdir(root) == ["sub", "train-00000-of-00002", "train-00001-of-00002"]
        found = files.glob(files.join(root, "train-*"))
        assert [files.basename(p) for p in found] == [
            "train-00000-of-00002",
            "train-00001-of-00002",
        ]
        files.remove(found[0])
        files.remove(found[0])  # a missing file is no error
        files.rmtree(files.join(root, "sub"))
        assert files.listdir(root) == ["train-00001-of-00002"]


def test_missing_files_are_file_not_found_errors(ram_root, tmp_path):
    for root in (ram_root, str(tmp_path)):
        with pytest.raises(FileNotFoundError):
            files.read_bytes(files.join(root, "nothing.json"))
        with pytest.raises(FileNotFoundError):
            files.open_read(files.join(root, "nothing.json"))
        assert not files.exists(files.join(root, "nothing.json"))
        assert not files.isfile(files.join(root, "nothing.json"))


def test_local_paths_need_no_tensorflow(tmp_path):
    """models/ builds on any Keras backend: the file layer imports TensorFlow only for a
    remote path."""
    script = (
        "import sys\n"
        "from common import files\n"
        f"root = {str(tmp_path)!r}\n"
        "files.write_json(files.join(root, 'a', 'm.json'), {'x': 1})\n"
        "assert files.read_text(files.join(root, 'a', 'm.json')).strip().startswith('{')\n"
        "assert files.listdir(root) == ['a'] and files.isdir(files.join(root, 'a'))\n"
        "with files.atomic_path(files.join(root, 'b.bin')) as tmp:\n"
        "    open(tmp, 'wb').write(b'x')\n"
        "print('tensorflow' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_copy_walk_and_relpath_on_both_sides(ram_root, tmp_path):
    local = tmp_path / "v" / "assets.extra" / "labels.txt"
    local.parent.mkdir(parents=True)
    local.write_text("cat\n")
    (tmp_path / "v" / "assets").mkdir()  # a name that is a prefix of its sibling's
    target = files.join(ram_root, "v", "assets.extra", "labels.txt")
    files.copy(str(local), target)  # local -> bucket
    files.makedirs(files.join(ram_root, "v", "assets"))
    files.copy(target, str(tmp_path / "back.txt"))  # bucket -> local
    assert (tmp_path / "back.txt").read_text() == "cat\n"
    assert files.listdir(ram_root) == ["v"]  # no temporaries
    for top in (str(tmp_path / "v"), files.join(ram_root, "v")):
        walked = [
            (files.relpath(folder, top), dirs, names) for folder, dirs, names in files.walk(top)
        ]
        assert walked == [
            (".", ["assets", "assets.extra"], []),
            ("assets", [], []),  # on ram:// its sibling's tail, `.extra`, is no child of it
            ("assets.extra", [], ["labels.txt"]),
        ], walked
