"""The shipped echo-tiny (package data): it loads offline by name, is small, answers the README's
bundled example correctly with a real re-listen, and beats chance on freshly generated puzzles."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from echo_agent.agent import DEFAULT_MODEL, ECHO_TINY_DIR, EchoAgent, load_backend
from echo_agent.cli import main
from echo_agent.training.synth import write_suite

ROOT = Path(__file__).resolve().parents[1]


def test_weights_ship_as_package_data() -> None:
    assert DEFAULT_MODEL == "echo-tiny"
    weights = ECHO_TINY_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 16 * 2**20
    for name in ("config.json", "processor_config.json", "tokenizer.json"):
        assert (ECHO_TINY_DIR / name).is_file()


def test_readme_main_job_answers_correctly_with_a_relisten(capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "README.md").read_text()
    first = text.split("```bash\n", 1)[1].splitlines()[0]
    ask = shlex.split(first.split("&& ")[-1])[1:]  # drop the program name
    assert ask[0] == "ask" and "--model" not in ask  # the default model
    assert main([*ask, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    items = json.loads((ROOT / "examples" / "puzzles" / "example.json").read_text())
    item = next(it for it in items if it["question"] == ask[2])
    assert result["choice"] == item["answer"]
    assert any(call["valid"] for call in result["listens"])
    assert result["verdict"]["format_ok"]


async def test_beats_chance_on_fresh_puzzles(tmp_path: Path) -> None:
    """Twelve new items (an unseen seed, two per category): chance is ~1/3 here; the shipped model
    must get at least half right, through the real graph, re-listening."""
    suite = write_suite(tmp_path, 12, 31337, "test", progress=False, durations=(10.0, 30.0))
    items = json.loads(suite.read_text())
    agent = EchoAgent(load_backend("echo-tiny"))
    correct, listened = 0, 0
    for it in items:
        r = await agent.ask(str(suite.parent / it["audio_id"]), it["question"], it["choices"], gold=it["answer"])
        correct += bool(r.verdict and r.verdict.correct)
        listened += bool(r.listens)
    assert listened == len(items)
    assert correct >= 6, f"{correct}/12 correct"
