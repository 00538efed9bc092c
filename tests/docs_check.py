"""What the docs claim, read for tests/test_docs.py: commands, Make targets, links.

The docs are README.md, BUILD.md and docs/**/*.md; the recipes' comments count for commands.
- Commands: `python -m MODULE ...` on a line of a fenced block (or of a recipe comment),
  continuation lines ending in `\\` joined, or an inline code span that starts with one;
  split as a shell would (shlex), ending at a `#` comment or a shell operator.
- Make: `make TARGET ... VAR=value` at the start of a fenced-block line or of an inline span.
- Links: `[text](path)`, `[text](path#anchor)`, `[text](#anchor)` outside code, anchors by
  GitHub's slug rules.
`parse_commands` parses a program's commands with its own flags, in one subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# Programs that take positional arguments (image files) besides flags; absl returns them.
TAKES_FILES = {"app.predict"}
# A training run's own record (app.train writes it): docs name it, the repository has none.
RUN_FLAGFILE = re.compile(r"--flagfile=\S*flags\.txt$")
HELP_FLAGS = {"--help", "--helpfull", "--helpshort", "--helpxml"}
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", "&>"}

_PYTHON_M = re.compile(r"(?:^|(?<=[\s;&|(]))(?:\S*/)?python3?(?:\.\d+)?\s+-m\s")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
_PREFIX = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+|time\s+)*")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_SPAN = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # file:line
    words: tuple[str, ...]  # as a shell splits it: the program's name first
    runnable: bool = True  # False: an inline `python -m X` that only names the program

    @property
    def program(self) -> str:
        return self.words[0]

    @property
    def args(self) -> tuple[str, ...]:
        return self.words[1:]


def markdown_files() -> list[pathlib.Path]:
    docs = sorted((REPO / "docs").rglob("*.md")) if (REPO / "docs").is_dir() else []
    return [REPO / "README.md", REPO / "BUILD.md", *docs]


def recipe_files() -> list[pathlib.Path]:
    return sorted((REPO / "app" / "configs").glob("*.flags"))


def relative(path: pathlib.Path) -> str:
    return str(path.relative_to(REPO))


# --- splitting a Markdown file ------------------------------------------------------------


def split_markdown(text: str) -> tuple[list[tuple[int, str]], str]:
    """(fenced-block lines as (line number, text), the prose with those lines blanked)."""
    code, prose, fenced = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            prose.append("")
        elif fenced:
            code.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return code, "\n".join(prose)


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines ending in a backslash joined with the next, as a shell reads them."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
        else:
            pending = None
            out.append((number, line))
    if pending is not None:
        out.append(pending)
    return out


def spans(prose: str) -> list[tuple[int, str]]:
    """Inline code spans (they may wrap lines), with the line each starts on."""
    return [
        (prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
        for m in _SPAN.finditer(prose)
    ]


def uncommented(line: str) -> str:
    """`line` up to its shell comment: an unquoted `#` at the start of a word."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_words(text: str) -> list[str]:
    """`text` split as a shell would, up to a comment or the first operator."""
    words = shlex.split(text, comments=True)
    for i, word in enumerate(words):
        if word in SHELL_OPERATORS:
            return words[:i]
    return words


def _strip_prefix(words: list[str]) -> list[str]:
    """Without leading `VAR=value` assignments and `time`."""
    i = 0
    while i < len(words) and (_ASSIGNMENT.fullmatch(words[i]) or words[i] == "time"):
        i += 1
    return words[i:]


# --- commands --------------------------------------------------------------------------------


def _python_command(text: str, where: str, anywhere: bool) -> Command | None:
    """The `python -m` command in `text`: anywhere in it (a code line: `docker run ...
    python -m ...`), or only at its start after assignments (an inline span; elsewhere in
    a span it is a quotation, such as an error message naming a program)."""
    start = 0 if anywhere else _PREFIX.match(text).end()
    match = _PYTHON_M.search(text, start) if anywhere else _PYTHON_M.match(text, start)
    if not match:
        return None
    try:
        words = shell_words(text[match.start() :])
    except ValueError as e:  # unbalanced quotes
        return Command(where, ("<unparsable>", f"{e}: {text}"))
    if len(words) < 3:
        return None
    return Command(where, tuple(words[2:]), runnable=anywhere or len(words) > 3)


def markdown_commands(path: pathlib.Path) -> list[Command]:
    code, prose = split_markdown(path.read_text())
    name = relative(path)
    found = [
        _python_command(uncommented(line), f"{name}:{number}", anywhere=True)
        for number, line in logical_lines(code)
    ]
    found += [
        _python_command(text, f"{name}:{number}", anywhere=False) for number, text in spans(prose)
    ]
    return [c for c in found if c is not None]


def recipe_commands(path: pathlib.Path) -> list[Command]:
    """Commands in a recipe's comments: indented `#   python -m ...` lines, inline spans."""
    lines = [
        (number, line.lstrip()[1:])
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.lstrip().startswith("#")
    ]
    name = relative(path)
    found = []
    for number, line in logical_lines(lines):
        if _PYTHON_M.match(line.lstrip()):
            found.append(_python_command(uncommented(line), f"{name}:{number}", anywhere=True))
    for number, line in lines:
        for _, text in spans(line):
            found.append(_python_command(text, f"{name}:{number}", anywhere=False))
    return [c for c in found if c is not None]


def all_commands() -> list[Command]:
    found = [c for path in markdown_files() for c in markdown_commands(path)]
    return found + [c for path in recipe_files() for c in recipe_commands(path)]


# The subprocess that parses one program's commands: its own flags, absl's parser (or the
# program's argparse `parse_args`). Prints one JSON answer per command (null: only named):
# an error, or the positional arguments left.
_PARSER = r"""
import contextlib, importlib, io, json, os, sys
module_name, commands = sys.argv[1], json.load(sys.stdin)
try:
    module = importlib.import_module(module_name)
except ImportError as e:
    print(json.dumps({"missing": f"no module {module_name} ({e})"}))
    sys.exit(0)
if os.path.relpath(os.path.realpath(module.__file__)).startswith("."):
    print(json.dumps({"foreign": True}))  # pip, venv (also in .venv/): not the project's
    sys.exit(0)
answers = []
if hasattr(module, "parse_args"):  # argparse: exits 2 with a usage line on a bad argument
    for argv in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                argv is None or module.parse_args(argv)
            answers.append({"rest": []})
        except SystemExit as e:
            answers.append({"rest": []} if not e.code else {"error": err.getvalue().strip()})
elif hasattr(module, "define_flags"):
    from absl import flags
    module.define_flags()
    for argv in commands:
        flags.FLAGS.unparse_flags()
        try:
            rest = [] if argv is None else flags.FLAGS([module_name, *argv])[1:]
            answers.append({"rest": rest})
        except flags.Error as e:
            answers.append({"error": f"{type(e).__name__}: {e}"})
else:  # a program without flags
    answers = [{"rest": argv or []} for argv in commands]
print(json.dumps({"answers": answers}))
"""


def parse_commands(module: str, commands: list[Command], timeout: float = 180) -> list[str]:
    """Every way `commands` (all of program `module`) fail to parse, one line each."""
    argvs, helps = [], []
    for command in commands:
        args = [a for a in command.args if not RUN_FLAGFILE.match(a)]
        helps.append(any(a in HELP_FLAGS for a in args))
        argvs.append([a for a in args if a not in HELP_FLAGS] if command.runnable else None)
    result = subprocess.run(
        [sys.executable, "-c", _PARSER, module],
        input=json.dumps(argvs),
        cwd=REPO,  # recipes are named relative to the repository root
        env={"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        return [f"{module}: the parser failed: {result.stderr[-2000:]}"]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "missing" in report:
        return [f"{c.where}: {report['missing']}" for c in commands]
    problems = []
    for command, answer, asks_help in zip(commands, report.get("answers", []), helps, strict=False):
        error = answer.get("error")
        if error and asks_help and "must have a value other than None" in error:
            error = None  # --help prints before required flags are checked
        if not error and answer["rest"] and module not in TAKES_FILES:
            error = f"{module} takes no arguments: {' '.join(answer['rest'])}"
        if error:
            problems.append(f"{command.where}: python -m {' '.join(command.words)}\n    {error}")
    return problems


# --- make --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MakeCall:
    where: str
    targets: tuple[str, ...]
    variables: tuple[str, ...]


def _make_call(text: str, where: str) -> MakeCall | None:
    try:
        words = _strip_prefix(shell_words(text))
    except ValueError:
        return None
    if len(words) < 2 or words[0] != "make":
        return None
    targets = tuple(w for w in words[1:] if "=" not in w and not w.startswith("-"))
    variables = tuple(w.split("=")[0] for w in words[1:] if _ASSIGNMENT.fullmatch(w))
    return MakeCall(where, targets, variables)


def make_calls() -> list[MakeCall]:
    found = []
    for path in markdown_files():
        code, prose = split_markdown(path.read_text())
        name = relative(path)
        found += [_make_call(uncommented(line), f"{name}:{n}") for n, line in logical_lines(code)]
        found += [_make_call(text, f"{name}:{n}") for n, text in spans(prose)]
    for path in recipe_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("#"):
                found += [_make_call(text, f"{relative(path)}:{n}") for _, text in spans(line)]
    return [c for c in found if c is not None]


def makefile_rules(makefile: pathlib.Path) -> tuple[set[str], set[str]]:
    """(the Makefile's targets, the variables its rules and assignments read)."""
    targets, used = set(), set()
    for line in makefile.read_text().splitlines():
        if line.startswith("#"):
            continue
        used.update(re.findall(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]", line))
        rule = re.match(r"^([^\t#=:][^#=:]*):(?!=)", line)
        if rule:
            targets.update(t for t in rule.group(1).split() if not t.startswith((".", "$")))
    return targets, used


# --- links ---------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: text of links and code, lowercased, punctuation but `-`
    and `_` dropped, each space a `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors of a Markdown file's headings (not `#` lines in code blocks); a repeated
    heading gets `-1`, `-2`, ... as on GitHub."""
    _, prose = split_markdown(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(path: pathlib.Path) -> list[str]:
    """Relative links of `path` whose file is missing or whose anchor is no heading there."""
    _, prose = split_markdown(path.read_text())
    prose = _SPAN.sub("code", prose)  # `[x](y)` inside code is not a link
    problems = []
    for match in _LINK.finditer(prose):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        where = f"{relative(path)}:{prose.count(chr(10), 0, match.start()) + 1}"
        file_part, _, anchor = target.partition("#")
        base = REPO if file_part.startswith("/") else path.parent
        linked = (base / file_part.lstrip("/")).resolve() if file_part else path
        shown = os.path.relpath(linked, REPO)
        if not linked.exists():
            problems.append(f"{where}: {target}: no file {shown}")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            problems.append(f"{where}: {target}: no heading #{anchor} in {shown}")
    return problems
