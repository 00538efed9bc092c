"""docs/large-datasets.md runs as written: every `python -m app.X ...` command in it parses
with that program's own flags (each program in a fresh process, as a user runs it)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

from tests.helpers import REPO

PAGE = REPO / "docs" / "large-datasets.md"


def commands() -> list[list[str]]:
    """[module, arg, ...] of every command on the page (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", PAGE.read_text())
    found = []
    for line in text.splitlines():
        match = re.search(r"python -m (app\.\w+)((?:\s+--?\S+)*)", line)
        if match:
            found.append([match.group(1), *shlex.split(match.group(2))])
    return found


PARSE = """
import importlib, json, sys
from absl import flags
module, commands = sys.argv[1], json.loads(sys.argv[2])
importlib.import_module(module).define_flags()
errors = []
for args in commands:
    flags.FLAGS.unparse_flags()
    try:
        rest = flags.FLAGS([module, *args])
        if rest[1:]:
            errors.append(f"{args}: not flags: {rest[1:]}")
    except flags.Error as e:
        errors.append(f"{args}: {e}")
print(json.dumps(errors))
"""


def test_every_command_on_the_page_parses_with_its_programs_flags():
    by_program: dict[str, list[list[str]]] = {}
    for module, *args in commands():
        by_program.setdefault(module, []).append(args)
    assert {"app.make_shards", "app.train", "app.evaluate"} <= set(by_program)
    for module, args in by_program.items():
        proc = subprocess.run(
            [sys.executable, "-c", PARSE, module, json.dumps(args)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], module
