"""The data flags (app/data_flags.py) and the samples picture (app/visualize.py)."""

from __future__ import annotations

import subprocess

import pytest
from absl import flags
from PIL import Image

from app import data_flags
from app.data import DataConfig
from tests.helpers import run_program, write_folder

# --- flags and the samples picture ------------------------------------------------------


def test_data_flags_make_a_config():
    fv = flags.FlagValues()
    data_flags.define_data_flags(fv)
    data_flags.define_data_flags(fv)  # idempotent: train and evaluate may share a process
    fv(["prog", "--data_dir=/some/where", "--train_limit=10", "--validation_split=0.2"])
    config = data_flags.data_config_from_flags(seed=9, flag_values=fv)
    assert config == DataConfig("cifar10", "/some/where", 0.2, 10, None, 9)
    fv2 = flags.FlagValues()
    data_flags.define_data_flags(fv2)
    with pytest.raises(flags.IllegalFlagValueError):
        fv2(["prog", "--validation_split=1.0"])


def run_visualize(*args: str) -> subprocess.CompletedProcess:
    return run_program("app.visualize", *args, timeout=120)


@pytest.mark.slow
def test_visualize_draws_samples_and_reports_bad_data_in_one_line(tmp_path):
    write_folder(tmp_path / "data")
    out = tmp_path / "samples.png"
    ok = run_visualize(f"--data_dir={tmp_path / 'data'}", f"--output={out}", "--num=4")
    assert ok.returncode == 0, ok.stderr
    assert Image.open(out).size[0] > 100
    bad = run_visualize(f"--data_dir={tmp_path / 'missing'}", f"--output={tmp_path / 'x.png'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --data_dir ")
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.png").exists()
