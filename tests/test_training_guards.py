"""Guards of a training run: the model_dir lock, and a full or unwritable disk.

The lock end to end (a second app.train refused, a kill -9 taken over, resumed) is part of
`tests/test_train_cli.py::test_sigkilled_run_resumes_mid_epoch`.
"""

import errno
import hashlib
import os
import signal
import socket
import subprocess
import sys

import pytest

from app.training.backup import backup_path, read_state
from app.training.guards import write_errors_reported
from common.errors import UsageError
from common.lock import LockedError, hold
from tests.helpers import REPO, error_lines, history_rows, run_train

HOLDER = """
import sys, time
from common.lock import hold
with hold(sys.argv[1], "a test"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_lock_names_its_live_holder_and_is_taken_over_after_kill_9(tmp_path):
    path = str(tmp_path / "dir" / "train.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as caught, hold(path, "a test"):
            pass
        message = str(caught.value)
        assert f"in use by a test pid {holder.pid} on host {socket.gethostname()}" in message
        assert "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert os.path.exists(path)  # a killed holder leaves its file behind
    with hold(path, "a test") as previous:
        assert previous["pid"] == holder.pid and previous["host"] == socket.gethostname()
        with pytest.raises(LockedError, match=f"pid {os.getpid()} "), hold(path, "a test"):
            pass  # held by this process now: a second holder in it is refused too
    assert not os.path.exists(path)  # released
    with hold(path, "a test") as previous:
        assert previous == {}
    # The directory it made is removed with it when nothing else was written there.
    fresh = tmp_path / "fresh" / "run"
    with hold(str(fresh / "train.lock"), "a test"):
        assert fresh.is_dir()
    assert not fresh.exists() and (tmp_path / "fresh").is_dir()


@pytest.mark.parametrize(
    "code, says", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied")]
)
def test_write_errors_become_one_line_that_says_how_to_resume(code, says):
    with pytest.raises(UsageError) as caught, write_errors_reported("runs/x"):
        raise OSError(code, os.strerror(code), "runs/x/best.keras")
    message = str(caught.value)
    assert message.startswith(f"cannot write runs/x/best.keras: {says}")
    assert "rerun the same command to resume" in message and "\n" not in message
    with pytest.raises(FileNotFoundError), write_errors_reported("runs/x"):  # not a disk state
        raise FileNotFoundError(errno.ENOENT, "gone", "x")


# app.train with the disk "filling up" while the FAIL_AT-th backup is written: the
# temporary file is half written when the write fails, as on a real full disk.
FULL_DISK = """
import contextlib, errno, hashlib, os, sys
from app.training import backup
from common import files

real, writes = files.atomic_path, [0]

def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

@contextlib.contextmanager
def filling_up(path, suffix=""):
    with real(path, suffix) as tmp:
        yield tmp
        writes[0] += 1
        if writes[0] == int(os.environ["FAIL_AT"]):
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            best = os.path.join(os.environ["MODEL_DIR"], "best.keras")
            print("before", digest(path), digest(best), flush=True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

backup.atomic_path = filling_up
from app import cli, train
train.define_flags()
sys.argv = ["app.train", *sys.argv[1:]]
cli.run(train.main)
"""


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_full_disk_stops_training_keeps_the_last_good_files_and_rerun_resumes(
    tmp_path, cifar10_dir
):
    from tests.test_train_cli import RESUME_RUN

    model_dir = tmp_path / "run"
    flags = (f"--model_dir={model_dir}", f"--data_dir={cifar10_dir}", *RESUME_RUN, "--epochs=2")
    # The second backup is the one at the end of epoch 1, just after best.keras was written.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "FAIL_AT": "2", "MODEL_DIR": str(model_dir)}
    failed = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 2, failed.stderr[-3000:]
    errors = error_lines(failed.stderr)
    assert len(errors) == 1 and "the disk is full" in errors[0], failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    before = [line.split()[1:] for line in failed.stdout.splitlines() if line.startswith("before")]
    assert len(before) == 1, failed.stdout
    state = backup_path(str(model_dir))
    assert [_digest(state), _digest(model_dir / "best.keras")] == before[0]  # untouched
    assert read_state(state) is not None
    leftovers = [n for _, _, names in os.walk(model_dir) for n in names if n.startswith(".")]
    assert leftovers == [] and not (model_dir / "train.lock").exists()

    result = run_train(model_dir, *flags[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(line.startswith("Resuming from") for line in result.stdout.splitlines())
    assert [row["epoch"] for row in history_rows(model_dir)] == [1, 2]
