"""The evaluation harness (`echo_agent.evaluation`, `echo_agent.benchmarks`) and the `eval` / `data synth` commands.

The built-in tiny random model answers nothing useful, so runs on it check behaviour only (schema, errors,
resume, output formats). Exact accuracies come from a scripted test double whose answers are known, and are
checked both against hand-computed expectations and against a re-implementation of the official MMAU/MMAR
scoring scripts run on the predictions file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from doubles import ScriptedBackend

from echo_agent.agent import EchoAgent, load_backend
from echo_agent.backends.base import Generation, GenerationRequest, ModelBackend
from echo_agent.benchmarks import BenchItem, DataError, load_benchmark
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.errors import ConfigError, EchoError
from echo_agent.evaluation import EvalReport, evaluate, partial_path, predictions_path, read_partial
from echo_agent.messages import message_text
from echo_agent.training import synth as S

MMAU = Path(__file__).resolve().parent / "data" / "mmau" / "mmau-test-mini.json"
_SCRIPT = Path(sys.executable).with_name("echo-agent")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "echo_agent.cli"]
REPORT_KEYS = {
    "micro_accuracy", "macro_accuracy", "per_category", "n", "errors", "mode", "model", "relisten_share",
    "mean_listens", "mean_generated_tokens", "mean_latency_s", "no_answer_share",
}  # fmt: skip


# ------------------------------------------------------------------------------------ the official scorer


def official_mmau_style_score(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """MMAU's `evaluation.py` (and MMAR's, which uses the same matcher), re-implemented for the tests.

    Reads each record's prediction (`model_output` for MMAU, `answer_prediction` for MMAR records, which carry
    `audio_path`); a missing prediction counts as "" (wrong). Accuracy overall, per task (MMAU) or modality
    (MMAR), and per category. Deliberately independent of `echo_agent.verifier`.
    """

    def tokenize(text: str) -> set[str]:
        return set(re.findall(r"\b\w+\b", text.lower()))

    def string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
        prediction_tokens = tokenize(prediction)
        answer_tokens = tokenize(answer)
        if not prediction_tokens:
            return False
        incorrect_tokens: set[str] = set()
        for choice in choices:
            choice_tokens = tokenize(choice)
            if choice_tokens != answer_tokens:
                incorrect_tokens.update(choice_tokens - answer_tokens)
        return answer_tokens.issubset(prediction_tokens) and prediction_tokens.isdisjoint(incorrect_tokens)

    corr = total = no_pred = 0
    by_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for sample in predictions:
        mmar = "audio_path" in sample
        key, group = ("answer_prediction", "modality") if mmar else ("model_output", "task")
        if sample.get(key) is None:
            no_pred += 1
            prediction = ""
        else:
            prediction = str(sample[key])
        ok = string_match(str(sample["answer"]), prediction, sample["choices"])
        corr += ok
        total += 1
        for table, name in ((by_task, sample[group]), (by_category, sample.get("category", ""))):
            table[name][0] += ok
            table[name][1] += 1
    return {
        "total_accuracy": corr / total if total else 0.0,
        "n": total,
        "no_prediction_count": no_pred,
        "task": {k: c / t for k, (c, t) in by_task.items()},
        "category": {k: c / t for k, (c, t) in by_category.items()},
    }


# ------------------------------------------------------------------------------------------- test double


class QuestionScript(ScriptedBackend):
    """TEST DOUBLE (not a model): answers each question from a script keyed by the question it sees.

    Implements the `ModelBackend` protocol. `script` maps an item id to one of
    "gold", "gold_cased", "wrong", "junk", "none", "listen_gold". It finds the item by looking for the
    item's question and choices in the user text of the request.
    """

    def __init__(self, items: Sequence[BenchItem], plan: dict[str, str]) -> None:
        super().__init__()
        self.items = list(items)
        self.plan = plan

    @property
    def calls(self) -> int:
        return len(self.requests)

    def _item(self, request: GenerationRequest) -> BenchItem:
        text = " ".join(message_text(m) for m in request.messages if m["role"] == "user")
        found = [i for i in self.items if i.question in text and str(i.choices) in text]
        assert len(found) == 1, f"the test double cannot tell which item this is: {text!r}"
        return found[0]

    def respond(self, request: GenerationRequest) -> Generation:
        item = self._item(request)
        how = self.plan[item.id]
        wrong = next(c for c in item.choices if c != item.answer)
        n_audio = sum(1 for m in request.messages for p in m["content"] if p["type"] == "audio")
        if how == "listen_gold" and n_audio == 1:  # first call: ask to re-listen to the first two seconds
            return Generation(
                text="<think>Let me listen again <seg>0.0, 2.0",
                finish_reason="stop",
                stop_string="</seg>",
                stop_string_in_text=False,
            )
        answer = {
            "gold": item.answer,
            "listen_gold": item.answer,
            "gold_cased": f"{item.answer.upper()}.",
            "wrong": wrong,
            "junk": "banana",
        }.get(how)
        text = "<think>x</think>" + (f"<answer>{answer}</answer>" if answer is not None else "")
        return Generation(text=text, finish_reason="eos")


def test_scripted_backend_is_a_model_backend() -> None:
    assert isinstance(QuestionScript([], {}), ModelBackend)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic items (two per category), 10–12 s clips."""
    return S.write_suite(tmp_path_factory.mktemp("suite"), 12, seed=5, progress=False, durations=(10.0, 12.0))


@pytest.fixture(scope="module")
def suite14(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 items: count and order get three, the other categories two (so micro != macro)."""
    return S.write_suite(tmp_path_factory.mktemp("suite14"), 14, seed=7, progress=False, durations=(10.0, 12.0))


@pytest.fixture(scope="module")
def tiny() -> ModelBackend:
    return load_backend("tiny-random-qwen2-audio")


def tiny_agent(backend: ModelBackend, mode: str = "interleaved") -> EchoAgent:
    return EchoAgent(backend, config=AgentConfig(sampling=SamplingParams(max_new_tokens=8), mode=mode))


def copy_suite(suite: Path, dest: Path) -> Path:
    shutil.copytree(suite.parent, dest)
    return dest / suite.name


class CountingAsk:
    """Wraps `agent.load` (each run loads its clip first) and records which items (by audio file stem = item id)
    were asked."""

    def __init__(self, agent: EchoAgent, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids: list[str] = []
        self._load = agent.load
        monkeypatch.setattr(agent, "load", self)

    def __call__(self, audio: Any) -> Any:
        self.ids.append(Path(audio).stem)
        return self._load(audio)


def partial_ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in partial_path(out).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- loading


def test_load_synthetic_suite(suite: Path) -> None:
    items = load_benchmark(suite)
    records = json.loads(suite.read_text())
    assert [i.id for i in items] == [r["id"] for r in records]
    assert [i.group for i in items] == [S.CATEGORIES[k % 6] for k in range(12)]  # category, not task
    for item, rec in zip(items, records, strict=True):
        assert item.format == "mmau" and item.record == rec
        assert item.audio == suite.parent / rec["audio_id"] and item.audio.is_file()
        assert (item.question, item.choices, item.answer) == (rec["question"], rec["choices"], rec["answer"])


def test_load_mmar_jsonl(suite: Path, tmp_path: Path) -> None:
    records = json.loads(suite.read_text())[:3]
    lines = [
        json.dumps({"id": r["id"], "audio_path": str(suite.parent / r["audio_id"]), "question": r["question"],
                    "choices": r["choices"], "answer": r["answer"], "modality": m, "category": "Signal Layer"})
        for r, m in zip(records, ["sound", "music", "mix-sound-music"], strict=True)
    ]  # fmt: skip
    data = tmp_path / "mmar.jsonl"
    data.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    items = load_benchmark(data)
    assert [i.format for i in items] == ["mmar"] * 3
    assert [i.group for i in items] == ["sound", "music", "mix-sound-music"]
    assert all(i.audio.is_file() for i in items)

    # Relative audio paths resolve against the data file's folder, not the working directory.
    (tmp_path / "sub").mkdir()
    rel = tmp_path / "sub" / "rel.jsonl"
    rec = json.loads(lines[0]) | {"audio_path": os.path.relpath(suite.parent / records[0]["audio_id"], rel.parent)}
    rel.write_text(json.dumps(rec) + "\n")
    assert load_benchmark(rel)[0].audio.resolve() == (suite.parent / records[0]["audio_id"]).resolve()


@pytest.mark.skipif(not MMAU.exists(), reason="MMAU test-mini metadata not present")
def test_load_real_mmau_metadata() -> None:
    items = load_benchmark(MMAU)
    assert len(items) == 1000
    groups = defaultdict(int)
    for i in items:
        groups[i.group] += 1
    assert dict(groups) == {"sound": 333, "music": 334, "speech": 333}
    first = items[0]
    assert first.format == "mmau" and first.record["sub-category"]
    assert first.audio == MMAU.parent / "test-mini-audios" / f"{first.id}.wav"
    assert not first.audio.exists()  # metadata only


@pytest.mark.skipif(not MMAU.exists(), reason="MMAU test-mini metadata not present")
async def test_real_mmau_without_audio_gives_per_item_errors(tmp_path: Path) -> None:
    items = load_benchmark(MMAU)
    agent = EchoAgent(QuestionScript(items, dict.fromkeys((i.id for i in items), "gold")))
    report = await evaluate(agent, items, out=tmp_path / "R.json", limit=3, progress=False)
    assert (report.n, report.errors, report.micro_accuracy) == (3, 3, 0.0)
    assert all("AudioNotFoundError" in f["error"] for f in report.failed)
    preds = json.loads((tmp_path / "R.predictions.json").read_text())
    assert [p["model_output"] for p in preds] == ["", "", ""]
    assert official_mmau_style_score(preds)["total_accuracy"] == 0.0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GOOD = {"id": "a", "audio_id": "./a.wav", "question": "q?", "choices": ["x", "y"], "answer": "x", "task": "sound"}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.json", '[{"id": "a",\n  "audio_id": }]', r"malformed JSON at line 2"),
        ("bad.jsonl", '{"id": "a"}\n\n{"id": \n', r"line 3: malformed JSON"),
        ("obj.json", '{"id": "a"}', r"expected a JSON list"),
        ("empty.json", "[]", r"no records"),
        ("nochoices.json", json.dumps([{k: v for k, v in GOOD.items() if k != "choices"}]), r"missing key 'choices'"),
        ("notask.json", json.dumps([{k: v for k, v in GOOD.items() if k != "task"}]), r"missing key 'task'"),
        ("synthcat.json", json.dumps([GOOD | {"dataset": "echo-synth"}]), r"missing key 'category'"),
        ("choices.json", json.dumps([GOOD | {"choices": "x, y"}]), r"'choices' must be a non-empty list"),
        ("answer.json", json.dumps([GOOD | {"answer": 1}]), r"'answer' must be a string"),
        ("dup.json", json.dumps([GOOD, GOOD]), r"record 1: duplicate id 'a' \(first in record 0\)"),
        ("list.json", json.dumps([GOOD, [1]]), r"record 1: expected a JSON object"),
        (
            "mmar.jsonl",
            json.dumps({**GOOD, "audio_path": "a.wav"}) + "\n",
            r"line 1 \(id 'a'\): missing key 'modality'",
        ),
        ("noaudio.jsonl", json.dumps(GOOD | {"modality": "sound"}) + "\n", r"missing key 'audio_path'"),
    ],
)
def test_load_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        load_benchmark(_write(tmp_path / name, text))
    assert isinstance(err.value, EchoError)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        load_benchmark(tmp_path / "nope.json")
    with pytest.raises(DataError, match="not a regular file"):
        load_benchmark(tmp_path)


# ---------------------------------------------------------------------------------- runs on the tiny model


async def test_tiny_model_report_predictions_and_a_missing_audio_file(
    suite: Path, tiny: ModelBackend, tmp_path: Path
) -> None:
    data = copy_suite(suite, tmp_path / "data")
    items = load_benchmark(data)
    items[3].audio.unlink()
    out = tmp_path / "res" / "R.json"
    report = await evaluate(tiny_agent(tiny), items, out=out, progress=False)

    saved = json.loads(out.read_text())
    assert set(saved) >= REPORT_KEYS
    assert EvalReport.model_validate(saved) == report
    assert (report.n, report.errors, report.mode, report.model) == (12, 1, "interleaved", "tiny-random-qwen2-audio")
    assert report.failed == [{"id": items[3].id, "error": report.failed[0]["error"]}]
    assert "AudioNotFoundError" in report.failed[0]["error"]
    assert set(report.per_category) == set(S.CATEGORIES)
    assert sum(c.n for c in report.per_category.values()) == 12
    for name in ("micro_accuracy", "macro_accuracy", "relisten_share", "no_answer_share"):
        assert 0.0 <= saved[name] <= 1.0
    assert report.mean_latency_s > 0 and report.mean_generated_tokens > 0

    # MMAU format: the original records, in order, plus model_output and our echo object.
    assert report.predictions == str(predictions_path(out, "mmau")) == str(out.parent / "R.predictions.json")
    preds = json.loads(Path(report.predictions).read_text())
    originals = json.loads(data.read_text())
    assert [{k: v for k, v in p.items() if k not in ("model_output", "echo")} for p in preds] == originals
    for p in preds:
        assert isinstance(p["model_output"], str)
        assert {"choice", "correct", "listens", "reasoning"} <= set(p["echo"])
        if p["echo"]["status"] == "no_answer":  # no answer is wrong, never the first choice
            assert p["model_output"] == "" and p["echo"]["choice"] is None and p["echo"]["correct"] is False
    assert preds[3]["model_output"] == "" and preds[3]["echo"]["status"] == "error" and preds[3]["echo"]["error"]
    correct = sum(p["echo"]["correct"] for p in preds)
    assert report.correct == correct and report.micro_accuracy == correct / 12
    ran = [p for p in preds if p["echo"]["status"] != "error"]
    assert report.no_answer_share == sum(p["echo"]["status"] == "no_answer" for p in ran) / 11
    assert report.no_answer_share > 0  # the random model never closes an <answer> in 8 tokens


async def test_resume_asks_only_the_remaining_items(
    suite: Path, tiny: ModelBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = load_benchmark(suite)
    agent = tiny_agent(tiny)
    asked = CountingAsk(agent, monkeypatch)
    out = tmp_path / "R.json"

    first = await evaluate(agent, items, out=out, limit=5, progress=False)
    assert first.n == 5 and asked.ids == [i.id for i in items[:5]]
    assert sorted(partial_ids(out)) == sorted(asked.ids)

    asked.ids.clear()
    second = await evaluate(agent, items, out=out, progress=False)
    assert second.n == 12
    assert sorted(asked.ids) == sorted(i.id for i in items[5:])
    ids = partial_ids(out)
    assert sorted(ids) == sorted(i.id for i in items) and len(ids) == len(set(ids)) == 12

    asked.ids.clear()  # a finished run only re-writes the report
    third = await evaluate(agent, items, out=out, progress=False)
    assert asked.ids == [] and third == second


async def test_truncated_last_line_is_dropped_and_rerun(
    suite: Path, tiny: ModelBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = load_benchmark(suite)
    agent = tiny_agent(tiny)
    asked = CountingAsk(agent, monkeypatch)
    out = tmp_path / "R.json"
    await evaluate(agent, items, out=out, limit=3, progress=False)
    path = partial_path(out)
    data = path.read_bytes()
    last = json.loads(data.splitlines()[-1])["id"]
    path.write_bytes(data[: len(data) - 25])  # a crash in the middle of writing the last line
    assert sorted(read_partial(path)[0]) == sorted(i.id for i in items[:3] if i.id != last)

    asked.ids.clear()
    report = await evaluate(agent, items, out=out, limit=3, progress=False)
    assert asked.ids == [last] and report.n == 3
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines].count(last) == 1 and len(lines) == 3


async def test_partial_file_problems(suite: Path, tiny: ModelBackend, tmp_path: Path) -> None:
    items = load_benchmark(suite)
    out = tmp_path / "R.json"
    await evaluate(tiny_agent(tiny), items, out=out, limit=1, progress=False)
    # Results of another mode must not be mixed into this one.
    with pytest.raises(ConfigError, match="mode=interleaved"):
        await evaluate(tiny_agent(tiny, "text"), items, out=out, limit=2, progress=False)
    # A bad line that is not the last one is corruption, not a crash: refuse it.
    line = partial_path(out).read_text()
    partial_path(out).write_text("{not json\n" + line)
    with pytest.raises(DataError, match="line 1"):
        await evaluate(tiny_agent(tiny), items, out=out, limit=2, progress=False)
    # --out must not overwrite the benchmark.
    with pytest.raises(ConfigError, match="overwrite the data file"):
        await evaluate(tiny_agent(tiny), items, out=suite, progress=False)
    with pytest.raises(ConfigError, match="concurrency"):
        await evaluate(tiny_agent(tiny), items, concurrency=0, progress=False)


# ------------------------------------------------------------------------------ exact scores (test double)

# item index -> behaviour; suite14's categories cycle count, order, identify, pitch, locate, duration.
PLAN = {
    0: "gold", 6: "gold", 12: "wrong",  # count 2/3
    1: "gold", 7: "none", 13: "gold",  # order 2/3
    2: "wrong", 8: "gold_cased",  # identify 1/2
    3: "junk", 9: "gold",  # pitch 1/2
    4: "listen_gold", 10: "gold",  # locate 2/2
    5: "none", 11: "wrong",  # duration 0/2
}  # fmt: skip
CORRECT = {"gold", "gold_cased", "listen_gold"}


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_exact_scores_agree_with_the_official_scorer(suite14: Path, tmp_path: Path, concurrency: int) -> None:
    items = load_benchmark(suite14)
    backend = QuestionScript(items, {items[k].id: how for k, how in PLAN.items()})
    out = tmp_path / "R.json"
    report = await evaluate(EchoAgent(backend), items, out=out, concurrency=concurrency, progress=False)

    per_cat = {"count": 2 / 3, "order": 2 / 3, "identify": 0.5, "pitch": 0.5, "locate": 1.0, "duration": 0.0}
    assert {k: v.accuracy for k, v in report.per_category.items()} == pytest.approx(per_cat)
    assert {k: v.n for k, v in report.per_category.items()} == {"count": 3, "order": 3} | dict.fromkeys(
        ["identify", "pitch", "locate", "duration"], 2
    )
    assert report.correct == sum(how in CORRECT for how in PLAN.values()) == 8
    assert report.micro_accuracy == pytest.approx(8 / 14)
    assert report.macro_accuracy == pytest.approx(sum(per_cat.values()) / 6) == pytest.approx(5 / 9)
    assert report.no_answer_share == pytest.approx(2 / 14)
    assert report.relisten_share == pytest.approx(1 / 12)  # one of the 12 answered items re-listened
    assert report.mean_listens == pytest.approx(1 / 14)
    assert report.errors == 0

    preds = json.loads(predictions_path(out, "mmau").read_text())
    by_id = {p["id"]: p for p in preds}
    junk = by_id[items[3].id]
    assert junk["model_output"] == "banana" and junk["echo"]["choice"] is None and not junk["echo"]["correct"]
    assert by_id[items[8].id]["echo"]["correct"]  # "CLICK." selects "click"
    assert [c["valid"] for c in by_id[items[4].id]["echo"]["listens"]] == [True]

    official = official_mmau_style_score(preds)
    assert official["n"] == report.n and official["no_prediction_count"] == 0
    assert official["total_accuracy"] == pytest.approx(report.micro_accuracy)
    assert official["task"] == pytest.approx({"sound": report.micro_accuracy})  # the suite's task is "sound"
    assert official["category"] == pytest.approx({k: v.accuracy for k, v in report.per_category.items()})
    for p in preds:  # item by item, too
        assert official_mmau_style_score([p])["total_accuracy"] == float(p["echo"]["correct"])


async def test_mmar_predictions_and_official_scorer(suite14: Path, tmp_path: Path) -> None:
    records = json.loads(suite14.read_text())
    modality = ["sound", "music", "speech", "sound-music"]
    data = tmp_path / "mmar.jsonl"
    with data.open("w") as f:
        for k, r in enumerate(records):
            mmar = {key: v for key, v in r.items() if key != "audio_id"}
            mmar |= {"audio_path": str(suite14.parent / r["audio_id"]), "modality": modality[k % 4]}
            f.write(json.dumps(mmar) + "\n")
    items = load_benchmark(data)
    backend = QuestionScript(items, {items[k].id: how for k, how in PLAN.items()})
    out = tmp_path / "R.json"
    report = await evaluate(EchoAgent(backend), items, out=out, concurrency=2, progress=False)

    assert report.format == "mmar" and set(report.per_category) == set(modality)
    pred_file = out.parent / "R.predictions.jsonl"
    assert report.predictions == str(pred_file)
    preds = [json.loads(line) for line in pred_file.read_text().splitlines()]
    assert [{k: v for k, v in p.items() if k not in ("answer_prediction", "echo")} for p in preds] == [
        json.loads(line) for line in data.read_text().splitlines()
    ]
    official = official_mmau_style_score(preds)
    assert official["total_accuracy"] == pytest.approx(report.micro_accuracy) == pytest.approx(8 / 14)
    assert official["task"] == pytest.approx({k: v.accuracy for k, v in report.per_category.items()})
    assert report.macro_accuracy == pytest.approx(sum(official["task"].values()) / 4)


async def test_without_out_nothing_is_written(suite14: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    items = load_benchmark(suite14)
    backend = QuestionScript(items, dict.fromkeys((i.id for i in items), "gold"))
    report = await evaluate(EchoAgent(backend), items, out=None, limit=4, progress=False)
    assert (report.n, report.micro_accuracy, report.macro_accuracy, report.predictions) == (4, 1.0, 1.0, None)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- CLI


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(ECHO_AGENT_HOME=str(cwd / "home"), OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_data_synth_then_eval(tmp_path: Path) -> None:
    synth = run_cli(["data", "synth", "--out", "D", "--n", "6", "--seed", "1", "--max-duration", "12"], tmp_path)
    assert synth.returncode == 0, synth.stderr
    assert synth.stdout.strip() == str(Path("D") / "test.json")  # the progress bar went to stderr
    assert len(json.loads((tmp_path / "D" / "test.json").read_text())) == 6

    ev = run_cli(["eval", "D/test.json", "--limit", "2", "--out", "R.json", "--max-new-tokens", "4"], tmp_path)
    assert ev.returncode == 0, ev.stderr
    report = json.loads((tmp_path / "R.json").read_text())
    assert set(report) >= REPORT_KEYS and report["n"] == 2 and report["mode"] == "interleaved"
    assert (tmp_path / "R.predictions.json").exists()
    assert "micro" in ev.stdout and "macro" in ev.stdout and "count" in ev.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "missing.json"], "no such data file"),
        (["eval", "D.json", "--limit", "0"], "--limit must be >= 1"),
        (["eval", "D.json", "--mode", "grounded", "--concurrency", "0"], "--concurrency must be >= 1"),
        (["data", "synth", "--out", "D", "--n", "0", "--seed", "1"], "--n must be >= 1"),
        (["data", "synth", "--out", "D", "--n", "2", "--seed", "1", "--max-duration", "5"], "--max-duration"),
    ],
)
def test_cli_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and message in proc.stderr
    assert "Traceback" not in proc.stderr
