"""The README and the docs stay true: the README opens with the main job and the test command and
stays short, every relative link resolves, and the commands the docs show exist with the options
and values they use. Everything here is fast (`--help` subprocesses and a tiny `data synth`)."""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS]
# Also link-checked: the benchmarks' README and the shipped model's card.
LINKED = [*MARKDOWN, ROOT / "bench" / "README.md", ROOT / "echo_agent" / "assets" / "echo-tiny" / "README.md"]
README_LIMIT = 12 * 1024  # bytes
# The subcommands the README's CLI table must name (and that must exist).
CLI_COMMANDS = {
    ("ask",), ("chat",), ("eval",), ("collect",), ("data", "synth"), ("data", "suite"), ("data", "mmar"),
    ("train", "audio"), ("train", "sft"), ("train", "grpo"), ("serve",),
}  # fmt: skip


def _first_block() -> list[str]:
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_setup_and_test_commands() -> None:
    setup, tests = _first_block()[:2]
    assert setup.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/echo-agent ask ")
    assert tests == ".venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci


def test_the_main_job_names_a_bundled_clip_and_its_real_question() -> None:
    ask = shlex.split(_first_block()[0].split("&& ")[-1])
    clip, question = ask[2], ask[3]
    choices = [ask[i + 1] for i, a in enumerate(ask) if a == "--choice"]
    assert (ROOT / clip).is_file()
    items = json.loads((ROOT / "examples" / "puzzles" / "example.json").read_text())
    item = next(it for it in items if clip.endswith(it["audio_id"].lstrip("./")))
    assert item["question"] == question and item["choices"] == choices


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/ (limit {README_LIMIT})"


# ---- links ---------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_INLINE_CODE_RE = re.compile(r"`[^`\n]*`")
_LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING_RE = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return _FENCE_RE.sub("", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    slugs = set()
    for heading in _HEADING_RE.findall(_prose(path.read_text())):
        slugs.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    # Inline code goes too: `[a | b]` is not a link, and [`x.py`](x.py) still is one without it.
    links = _LINK_RE.findall(_INLINE_CODE_RE.sub("", _prose(path.read_text())))
    broken = []
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_named_run_configs_exist() -> None:
    named = {m for p in LINKED for m in re.findall(r"configs/[\w.-]+\.json", p.read_text())}
    assert named, "the docs name no run configs"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"configs named in the docs but absent: {missing}"


# ---- the commands ------------------------------------------------------------------------------


@functools.cache
def _help(*words: str) -> str:
    """`echo-agent WORDS --help`, run as a subprocess; asserts exit status 0."""
    env = {**os.environ, "COLUMNS": "250"}  # no wrapping between a flag and its choices
    proc = subprocess.run(
        [sys.executable, "-m", "echo_agent.cli", *words, "--help"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"echo-agent {' '.join(words)} --help exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout


def _table_commands() -> set[tuple[str, ...]]:
    """The subcommands in the first column of the README's command-line table."""
    section = README.read_text().split("\n## Command line", 1)[1].split("\n## ", 1)[0]
    commands = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            words = row.split("`")[1].split()
            commands.add(tuple(words[:2]) if words[0] in ("data", "train") else (words[0],))
    return commands


def test_readme_cli_table_names_every_command() -> None:
    assert _table_commands() >= CLI_COMMANDS


@pytest.mark.parametrize("words", sorted(CLI_COMMANDS), ids=" ".join)
def test_every_cli_command_has_help(words: tuple[str, ...]) -> None:
    assert "usage: echo-agent" in _help(*words)


def _doc_commands() -> list[tuple[Path, list[str]]]:
    """Every `echo-agent ...` invocation in the bash blocks of the README and docs, as tokens."""
    found = []
    for path in MARKDOWN:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:
                    continue
                for i, tok in enumerate(tokens):
                    if tok.endswith("echo-agent") or tok == "echo_agent.cli":
                        cmd = []
                        for t in tokens[i + 1 :]:
                            if t in ("&&", "||", "|", ";", "do", "done") or t.endswith(";"):
                                break
                            cmd.append(t)
                        found.append((path, cmd))
    return found


def test_doc_commands_use_existing_options_and_values() -> None:
    commands = _doc_commands()
    assert len(commands) > 20
    problems = []
    for path, cmd in commands:
        if not cmd:
            continue
        words = tuple(cmd[:2]) if cmd[0] in ("data", "train") else (cmd[0],)
        where = f"{path.relative_to(ROOT)}: echo-agent {' '.join(cmd)}"
        if words not in CLI_COMMANDS:
            problems.append(f"{where}: unknown command {' '.join(words)}")
            continue
        usage = _help(*words)
        for j, tok in enumerate(cmd):
            flag = tok.strip("[]").split("=")[0]
            if not flag.startswith("--"):
                continue
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage):
                problems.append(f"{where}: no option {flag}")
                continue
            choices = re.search(rf"{re.escape(flag)} \{{([^}}]*)\}}", usage)
            if choices and j + 1 < len(cmd) and not cmd[j + 1].startswith(("-", "$", "[")):
                allowed = choices.group(1).split(",")
                for value in cmd[j + 1].strip("[]").split("|"):
                    if value not in allowed:
                        problems.append(f"{where}: {flag} {value} is not one of {allowed}")
    assert not problems, "\n".join(problems)


def test_small_data_synth_command_from_training_doc(tmp_path: Path) -> None:
    """The first command of docs/training.md's small run, with a tiny --n, writes what it prints."""
    text = (ROOT / "docs" / "training.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("echo-agent data synth --out runs/small "))
    args = shlex.split(line, comments=True)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "small")
    args[args.index("--n") + 1] = "3"
    proc = subprocess.run(
        [sys.executable, "-m", "echo_agent.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip().splitlines()[-1])
    assert out.is_file() and out.parent == tmp_path / "small"
    items = json.loads(out.read_text())
    assert len(items) == 3
    assert all((out.parent / it["audio_id"]).is_file() for it in items)


def test_readme_library_imports_exist() -> None:
    """Every name the README's Python examples import from echo_agent is importable."""
    text = README.read_text()
    imports = re.findall(r"^from (echo_agent[\w.]*) import (.+)$", text, re.MULTILINE)
    assert imports
    for module, names in imports:
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(mod, name), f"README imports {name} from {module}, which has no such name"
