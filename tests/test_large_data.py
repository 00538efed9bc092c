"""Data larger than memory, from TFRecord shards, through `python -m app.train`: memory
that does not grow with the data, exact resumption after kill -9 on one process and on
two workers, a corrupt record and bad input said in one line.

All slow: each test runs training processes. The shards are generated (3 classes of
16x16 images, written by app.make_shards); --memory_budget_mb=0 streams them.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from app import make_shards_lib
from app.data import DataConfig
from tests.helpers import (
    REPO,
    corrupt_record,
    error_lines,
    final_digest,
    run_program,
    run_train,
    start_train,
    train_command,
    wait_for_backup,
    write_folder,
    write_shards,
)
from tests.test_distributed import finish_workers, resumed_position, start_workers, stop

pytestmark = pytest.mark.slow

# 2 epochs of 6 steps of 16 (8 per worker on two), a backup every 2 steps.
RECIPE = (
    "--model=resnet18",
    "--stem=cifar",
    "--image_size=16",
    "--batch_size=16",
    "--lr=0.002",
    "--epochs=2",
    "--backup_every_steps=2",
    "--keep_backup",
    "--deterministic",
    "--mixed_precision=none",
    "--verbose=0",
    "--memory_budget_mb=0",
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """96 train examples in 4 shards of 24, 24 validation ones."""
    root = tmp_path_factory.mktemp("large")
    write_folder(root / "images", classes=("a", "b", "c"), per_class=40, size=16)
    config = DataConfig(data_dir=str(root / "images"), validation_split=0.2)
    make_shards_lib.make_shards(make_shards_lib.ShardsConfig(config, str(root / "shards"), 4, 0))
    return f"--data_dir={root / 'shards'}"


def _killed_and_resumed(model_dir, flags) -> subprocess.CompletedProcess:
    proc = start_train(model_dir, *flags)
    try:
        position = wait_for_backup(model_dir, (0, 2), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "finished before the kill"
    result = run_train(model_dir, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_position(result.stdout) >= position
    return result


def test_streamed_training_killed_mid_epoch_resumes_exactly(tmp_path, shards):
    reference = run_train(tmp_path / "reference", shards, *RECIPE)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "streamed from" in reference.stdout
    resumed = _killed_and_resumed(tmp_path / "killed", (shards, *RECIPE))
    assert final_digest(resumed.stdout) == final_digest(reference.stdout)


def _two_workers(model_dir, flags, logs) -> list[str]:
    return finish_workers(start_workers([model_dir, model_dir], flags, logs), logs)


def test_two_workers_streaming_their_own_shards_resume_exactly_after_kill9(tmp_path, shards):
    # Synchronised batch norm: both workers hold the same weights (else each keeps its own
    # moving statistics, and a resumed worker takes the chief's from the backup).
    flags = (shards, *RECIPE, "--synchronized_bn", "--heartbeat_timeout=10")
    reference = _two_workers(tmp_path / "ref", flags, [tmp_path / "r0.log", tmp_path / "r1.log"])
    assert "2 worker(s), each reading its own TFRecord files" in reference[0]
    model_dir = tmp_path / "run"
    procs = start_workers([model_dir, model_dir], flags, [tmp_path / "k0.log", tmp_path / "k1.log"])
    try:
        position = wait_for_backup(model_dir, (0, 2), procs[0])
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        stop(procs)
    resumed = _two_workers(model_dir, flags, [tmp_path / "w0.log", tmp_path / "w1.log"])
    assert resumed_position(resumed[0]) >= position
    assert final_digest(resumed[0]) == final_digest(resumed[1]) == final_digest(reference[0])


def _peak_rss_mb(model_dir, *flags: str) -> float:
    """Peak resident memory of `python -m app.train` (its own, through a parent that waits)."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *train_command(model_dir, *flags)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streamed from" in proc.stdout, proc.stdout
    return float(proc.stdout.strip().splitlines()[-1])


def test_training_on_data_over_the_memory_budget_uses_the_same_memory_at_4x(tmp_path):
    """Records of 100 KB (an image and filler): 40 MB of data (2.5x a 16 MB budget), then
    160 MB. Holding the data would cost 120 MB more; streaming costs the same."""
    budget = 16
    peaks = {}
    for scale in (1, 4):
        root = tmp_path / f"x{scale}"
        write_shards(root, [100 * scale] * 4, extra_bytes=100_000)
        write_shards(root, [10], split="validation", first=10_000, extra_bytes=100_000)
        size = sum(p.stat().st_size for p in root.glob("train-*")) / 2**20
        assert size > (2 * budget if scale == 1 else 150)
        peaks[scale] = _peak_rss_mb(
            tmp_path / f"run{scale}",
            f"--data_dir={root}",
            f"--memory_budget_mb={budget}",
            "--model=resnet18",
            "--stem=cifar",
            "--image_size=8",
            "--batch_size=32",
            "--epochs=1",
            "--backup_every_steps=0",
            "--mixed_precision=none",
            "--verbose=0",
        )
    print(f"peak RSS, MiB: {peaks}")  # the figure docs/large-datasets.md quotes (-s)
    assert abs(peaks[4] - peaks[1]) < 100, peaks


def test_a_corrupt_record_stops_training_with_one_line_naming_the_shard(tmp_path):
    write_shards(tmp_path / "data", [40, 40], size=16)
    write_shards(tmp_path / "data", [8], split="validation", first=100, size=16)
    corrupt_record(tmp_path / "data" / "train-00001-of-00002", 39)
    result = run_train(tmp_path / "run", f"--data_dir={tmp_path / 'data'}", *RECIPE)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].endswith(
        "train-00001-of-00002: record 39 is corrupt or unreadable; copy the file again"
    )


def test_make_shards_says_what_is_wrong_in_one_line_and_writes_nothing(tmp_path):
    write_folder(tmp_path / "images")
    (tmp_path / "images" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    out = tmp_path / "out"
    for args, message in (
        ([f"--data_dir={tmp_path / 'images'}"], "--output_dir is required"),
        ([f"--data_dir={tmp_path / 'missing'}", f"--output_dir={out}"], "does not exist"),
        ([f"--data_dir={tmp_path / 'images'}", f"--output_dir={out}"], "cat/1.png"),
    ):
        result = run_program("app.make_shards", *args, "--verbose=0")
        errors = error_lines(result.stderr)
        assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
        assert message in errors[0] and "Traceback" not in result.stderr
    assert not (out / "labels.txt").exists()
