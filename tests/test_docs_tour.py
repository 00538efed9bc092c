"""README.md's short tour runs as written: its commands, in order, each exiting 0.

"As written" is bent only as BENT says: tiny data and one short epoch, TF Serving's container
replaced by the project's stand-in of its REST API (tests.serving_stand_in.serving_rest) on the port
the `docker run` line publishes, serving the folder it mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from export import saved_model
from tests import docs_check
from tests.helpers import CIFAR10_CLASSES, REPO, require_cifar10
from tests.serving_stand_in import serving_rest

TOUR_HEADING = "## A short tour"
PER_CLASS = 8  # images per class in the tiny copy of CIFAR-10
TINY_TRAIN = [
    "--epochs=1",
    "--warmup_epochs=0",
    "--train_limit=64",
    "--eval_limit=32",
    "--image_size=16",
    "--model=resnet18",
    "--batch_size=16",
    "--verbose=0",
]
# What the tour says -> what this test does instead. Nothing else differs.
BENT = [
    ("~/data/cifar10", f"a copy of {PER_CLASS} real CIFAR-10 JPEGs per class in tmp"),
    ("python -m app.train ...", f"the same, then {' '.join(TINY_TRAIN)} (overriding the recipe)"),
    ("docker run -p P:8501 -v SRC:/models/NAME ...", "serving_rest(SRC, NAME) on port P"),
    ("sleep N (for the container to start)", "nothing: the stand-in answers at once"),
    ("the repository root", "a tmp folder linking the repository's folders: runs/ lands there"),
]
BENT_TEXT = "; ".join(f"{said} -> {done}" for said, done in BENT)
LINKED = ("app", "common", "export", "models", "docs")


def tour_lines() -> list[str]:
    """The commands of the fenced block under the tour's heading, continuations joined."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert TOUR_HEADING in lines, (
        f"README.md lost its {TOUR_HEADING!r} section: keep it (or fix {__file__})"
    )
    block = lines[lines.index(TOUR_HEADING) + 1 :]
    start = next(i for i, line in enumerate(block) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(block)) if block[i].startswith("```"))
    code = list(enumerate(block[start + 1 : end]))
    commands = [docs_check.uncommented(line) for _, line in docs_check.logical_lines(code)]
    return [line for line in commands if line.strip()]


def tiny_cifar10(root) -> None:
    """CIFAR-10 as an image folder of PER_CLASS JPEGs per class."""
    source = require_cifar10() / "train"
    for name in CIFAR10_CLASSES:
        files = sorted((source / name).iterdir())
        (root / "cifar10" / "train" / name).mkdir(parents=True)
        for path in files[:PER_CLASS]:
            shutil.copy(path, root / "cifar10" / "train" / name / path.name)


def start_stand_in(words: list[str], stack: contextlib.ExitStack) -> str:
    """The `docker run` line's TF Serving: the mounted base path served on the published port."""
    options = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("-")}
    host_port = options["-p"].split(":")[0]
    source, target = options["-v"].split(":")[:2]
    name = options["-e"].removeprefix("MODEL_NAME=")
    assert target == f"/models/{name}", f"TF Serving's image serves /models/$MODEL_NAME: {words}"
    served = saved_model.load_serving(source)
    return stack.enter_context(serving_rest(served, name, port=int(host_port)))


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path):
    commands = tour_lines()
    programs = [line.split()[2] for line in commands if line.startswith("python -m")]
    assert {"app.train", "app.export", "export.client"} <= set(programs), commands
    work = tmp_path / "work"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(REPO / name)
    tiny_cifar10(tmp_path)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PWD": str(work)}
    outputs = {}
    with contextlib.ExitStack() as stack:
        for line in commands:
            line = line.replace("$PWD", str(work)).replace(
                "~/data/cifar10", str(tmp_path / "cifar10")
            )
            words = docs_check.shell_words(line)
            if words[0] == "docker":
                start_stand_in(words, stack)
                continue
            if words[0] == "sleep":
                continue
            assert words[:2] == ["python", "-m"], f"the tour runs python -m and docker only: {line}"
            argv = [sys.executable, *words[1:]] + (TINY_TRAIN if words[2] == "app.train" else [])
            result = subprocess.run(
                argv, cwd=work, env=env, capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, (
                f"{line}\n(the tour as written, but {BENT_TEXT})\n"
                f"{result.stdout[-2000:]}{result.stderr[-3000:]}"
            )
            outputs[line] = result.stdout
    # TF Serving (the stand-in) answered the client with a CIFAR-10 class.
    client = next(out for line, out in outputs.items() if "export.client" in line)
    image, name, probability = client.strip().splitlines()[-1].split("\t")
    assert image.endswith(".png"), client
    assert name in CIFAR10_CLASSES and 0 < float(probability) <= 1, client
    # Every model the tour names exists: the export of its run, and the int8 model evaluated.
    exported = [line for line in commands if line.startswith("python -m app.export")]
    run = pathlib.Path(docs_check.shell_words(exported[0])[3].split("=", 1)[1]).parent
    report = json.loads((work / run / "export" / "report.json").read_text())
    assert os.path.samefile(report["model"], work / run / "best.keras")
    assert list((work / run / "export").glob("eval_*_int8.json"))  # its int8 model evaluated
