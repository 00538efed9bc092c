"""Docs that drift fail CI: every `python -m` command in README.md, BUILD.md, docs/ and the
recipes' comments parses with its program's own flags, every `make` target and variable they
name is the Makefile's, every relative link and anchor resolves (helpers: tests/docs_check.py).
The README's tour runs as written: tests/test_docs_tour.py.
"""

from __future__ import annotations

import collections

import pytest

from tests import docs_check
from tests.docs_check import REPO

COMMANDS = docs_check.all_commands()
BY_PROGRAM = collections.defaultdict(list)
for _command in COMMANDS:
    BY_PROGRAM[_command.program].append(_command)


def test_the_docs_are_read():
    """The extraction finds what it is meant to (an empty list would pass everything)."""
    programs = set(BY_PROGRAM)
    assert {"app.train", "app.evaluate", "app.predict", "app.export", "export.client"} <= programs
    assert any(c.where.startswith("app/configs/") for c in COMMANDS)
    assert any(call.variables for call in docs_check.make_calls())


# One subprocess per program: its flags are defined once and every command of it parsed.
@pytest.mark.parametrize("program", sorted(BY_PROGRAM))
def test_commands_parse_with_the_programs_flags(program):
    problems = docs_check.parse_commands(program, BY_PROGRAM[program])
    assert not problems, "\n".join(problems)


def test_make_targets_and_variables_are_the_makefiles():
    targets, variables = docs_check.makefile_rules(REPO / "Makefile")
    problems = []
    for call in docs_check.make_calls():
        problems += [f"{call.where}: no target {t!r}" for t in call.targets if t not in targets]
        problems += [
            f"{call.where}: the Makefile reads no {v}" for v in call.variables if v not in variables
        ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", docs_check.markdown_files(), ids=docs_check.relative)
def test_relative_links_and_anchors_resolve(path):
    problems = docs_check.broken_links(path)
    assert not problems, "\n".join(problems)


def test_github_slugs():
    assert docs_check.slug("Toward 90% in 30 minutes on 2 cores: what was tried") == (
        "toward-90-in-30-minutes-on-2-cores-what-was-tried"
    )
    assert docs_check.slug("Send requests: curl and `python -m export.client`") == (
        "send-requests-curl-and-python--m-exportclient"
    )
    assert docs_check.slug("Serving signatures (the contract `app.predict` relies on)") == (
        "serving-signatures-the-contract-apppredict-relies-on"
    )
