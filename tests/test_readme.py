"""The README opens with two commands that must stay true: the main job and the test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
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
    import json

    ask = shlex.split(_first_block()[0].split("&& ")[-1])
    clip, question = ask[2], ask[3]
    choices = [ask[i + 1] for i, a in enumerate(ask) if a == "--choice"]
    assert (ROOT / clip).is_file()
    items = json.loads((ROOT / "examples" / "puzzles" / "example.json").read_text())
    item = next(it for it in items if clip.endswith(it["audio_id"].lstrip("./")))
    assert item["question"] == question and item["choices"] == choices
