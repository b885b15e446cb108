"""Threads, open questions and suite records in the benchmark loader, the one runner and `evaluate`.

A small suite file written by hand (records built with the suite's own `SuiteItem`): three threads of 2-3
turns (one of which loads a second clip at turn 2), a single multiple-choice item and a single open question,
over real WAV files. Runs use the built-in tiny random Qwen2-Audio through the real graph with a real
`InMemorySaver`; the open-answer test uses a tiny model taught one answer (`memorize.teach`).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import write_beeps
from langgraph.checkpoint.memory import InMemorySaver

from echo_agent.agent import EchoAgent, load_backend
from echo_agent.backends.base import ModelBackend
from echo_agent.benchmarks import BenchItem, DataError, load_benchmark
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.errors import ConfigError
from echo_agent.evaluation import evaluate, partial_path
from echo_agent.graphs.runner import RunOutcome, jobs, run_all, whole_threads
from echo_agent.messages import message_text
from echo_agent.training.suite.core import SuiteItem

# (thread, turn, clip, domain, category, question); questions are unique so runs can be told apart by them.
THREADS = [
    ("tA", 0, "a", "sound", "count", "How many beeps are there in the clip?"),
    ("tA", 1, "a", "sound", "count", "And between 2 and 4 s?"),
    ("tA", 2, "a", "sound", "order", "Which comes first, the beep or the click?"),
    ("tB", 0, "b", "music", "note_count", "How many notes does the flute play?"),
    ("tB", 1, "b", "music", "first_instrument", "Which instrument plays first?"),
    ("tC", 0, "c", "speech", "digit_at", "Which digit is spoken at 2 s?"),
    ("tC", 1, "c", "speech", "digit_at", "What about at 4 s?"),
    ("tC", 2, "c2", "speech", "word_count", "In the new clip, how many times is seven said?"),
]
SINGLES = [
    ("s1", "s", "sound", "locate", "When is the chirp heard?", ["1.0-2.0 s", "3.0-4.0 s"], "3.0-4.0 s", "choice"),
    ("s2", "s", "speech", "voice_count", "How many different voices speak?", [], "2", "number"),
]


def suite_record(
    rid: str, clip: str, domain: str, category: str, question: str, choices: list[str], answer: str, kind: str,
    thread: str | None, turn: int,
) -> dict[str, Any]:  # fmt: skip
    item = SuiteItem(
        id=rid, audio_id=f"./audio/{clip}.wav", question=question, choices=choices, answer=answer, task=domain,  # type: ignore[arg-type]
        split="test_threads", category=category, sub_category=category, difficulty="easy", sources="heldout",
        phrasing="train", template=f"{category}/train/0", formats=[], choice_format=None if not choices else "c_x",
        answer_kind=kind, thread=thread, turn=turn, duration=6.0, seed=0, evidence=[], trace="", events=[], scene={},  # type: ignore[arg-type]
    )  # fmt: skip
    return item.model_dump(mode="json", by_alias=True)


def write_suite(root: Path, extra: list[dict[str, Any]] | None = None) -> Path:
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for k, clip in enumerate(("a", "b", "c", "c2", "s")):
        write_beeps(root / "audio" / f"{clip}.wav", 4.0 + k * 0.5, [(1.0, 0.2), (2.5, 0.3)], seed=k)
    records = [
        suite_record(f"{t}-{n}", clip, d, c, q, ["1", "2", "3"], "2", "choice", t, n) for t, n, clip, d, c, q in THREADS
    ] + [suite_record(r, clip, d, c, q, ch, a, k, None, 0) for r, clip, d, c, q, ch, a, k in SINGLES]
    # A file need not list a thread's turns in order: the runner orders them.
    order = [2, 5, 0, 3, 8, 7, 1, 4, 6, 9]
    path = root / "suite.json"
    path.write_text(json.dumps([records[i] for i in order] + (extra or []), indent=1))
    return path


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    return write_suite(tmp_path / "data")


@pytest.fixture(scope="module")
def tiny() -> ModelBackend:
    return load_backend("tiny-random-qwen2-audio")


def agent_for(backend: ModelBackend, checkpointer: Any = "memory") -> EchoAgent:
    saver = InMemorySaver() if checkpointer == "memory" else checkpointer
    return EchoAgent(backend, config=AgentConfig(sampling=SamplingParams(max_new_tokens=6)), checkpointer=saver)


def user_questions(state: dict[str, Any]) -> list[str]:
    """The question of each user turn of a conversation, in order (nudges and runtime text left out)."""
    questions = [q for *_, q in THREADS] + [s[4] for s in SINGLES]
    out = []
    for msg in state["conversation"]:
        if msg["role"] == "user":
            text = message_text(msg)
            out += [q for q in questions if text.startswith(q)]
    return out


class Recorder:
    """Wraps the graph's `ainvoke`: which runs are in flight, overall and per graph thread, and in what order."""

    def __init__(self, agent: EchoAgent, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str | None, str]] = []  # (graph thread id, question) in the order asked
        self.in_flight: dict[str | None, int] = defaultdict(int)
        self.peak_thread = self.peak_all = 0
        real = agent.graph.ainvoke

        async def ainvoke(inputs: Any, config: Any = None, **kw: Any) -> Any:
            tid = ((config or {}).get("configurable") or {}).get("thread_id")
            self.calls.append((tid, inputs["question"]))
            self.in_flight[tid] += 1
            if tid is not None:
                self.peak_thread = max(self.peak_thread, self.in_flight[tid])
            self.peak_all = max(self.peak_all, sum(self.in_flight.values()))
            try:
                await asyncio.sleep(0.01)  # let the other runs start: concurrency must show, order must hold
                return await real(inputs, config, **kw)
            finally:
                self.in_flight[tid] -= 1

        monkeypatch.setattr(agent.graph, "ainvoke", ainvoke)

    @property
    def asked(self) -> list[str]:
        return [q for _, q in self.calls]


# ------------------------------------------------------------------------------------------------ loading


def test_suite_records_load_with_threads_open_questions_and_groups(suite: Path) -> None:
    items = {i.id: i for i in load_benchmark(suite)}
    assert len(items) == 10
    assert (items["tA-2"].thread, items["tA-2"].turn, items["tA-2"].answer_kind) == ("tA", 2, "choice")
    assert items["tA-0"].group == "sound/count" and items["tB-1"].group == "music/first_instrument"
    assert (items["s2"].choices, items["s2"].answer_kind, items["s2"].thread, items["s2"].turn) == (
        [],
        "number",
        None,
        0,
    )
    # Other datasets keep their defaults: a single multiple-choice item.
    mmau = load_benchmark(Path(__file__).parent / "data" / "mmau" / "mmau-test-mini.json")[0]
    assert (mmau.answer_kind, mmau.thread, mmau.turn) == ("choice", None, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": "tA-dup", "turn": 1}, "thread 'tA' has two turns 1"),
        ({"id": "tA-gap", "turn": 4}, "thread 'tA' has no turn 3"),
        ({"id": "tZ-1", "thread": "tZ", "turn": 1}, "thread 'tZ' has no turn 0"),
        ({"id": "x", "thread": None, "turn": 2}, "'turn' is 2 but 'thread' is null"),
        ({"id": "x", "turn": -1}, "'turn' must be an integer >= 0"),
        ({"id": "x", "turn": True}, "'turn' must be an integer >= 0"),
        ({"id": "x", "thread": 5}, "'thread' must be a non-empty string or null"),
        ({"id": "x", "thread": ""}, "'thread' must be a non-empty string or null"),
        ({"id": "x", "answer_kind": "essay"}, "'answer_kind' must be one of"),
        ({"id": "x", "thread": None, "turn": 0, "choices": []}, "'choices' must be a non-empty list"),
        ({"id": "x", "thread": None, "turn": 0, "answer_kind": "number"}, "must have 'choices': \\[\\]"),
    ],
)
def test_bad_thread_fields_are_data_errors(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    base = suite_record("tA-x", "a", "sound", "count", "Q?", ["1", "2"], "1", "choice", "tA", 0)
    path = write_suite(tmp_path, extra=[{**base, **change}])
    with pytest.raises(DataError, match=message):
        load_benchmark(path)


# ------------------------------------------------------------------------------------------------ running


def test_turns_run_in_order_in_one_graph_thread_with_their_clips(
    suite: Path, tiny: ModelBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = load_benchmark(suite)
    agent = agent_for(tiny)
    rec = Recorder(agent, monkeypatch)
    todo = jobs(items, samples=2, seed=3)
    outcomes = {o.job.id: o for o in asyncio.run(run_all(agent, todo, concurrency=4))}
    assert all(o.error is None and o.state is not None for o in outcomes.values())
    assert rec.peak_thread == 1, "a thread's turns never overlap"
    assert rec.peak_all > 1, "threads and single items run concurrently"

    for sample in (0, 1):
        for thread, turn, *_ in THREADS:
            state = outcomes[f"{thread}-{turn}#{sample}"].state
            assert state is not None
            # Turn k's conversation holds turns 0..k of its own thread (and sample) only, in order.
            assert user_questions(state) == [q for t, n, *_, q in THREADS if t == thread and n <= turn]
        for rid, *_ in SINGLES:
            state = outcomes[f"{rid}#{sample}"].state
            assert state is not None and len(user_questions(state)) == 1
    # Within each graph thread the turns were asked in turn order.
    for thread in ("tA", "tB", "tC"):
        for sample in (0, 1):
            asked = [q for tid, q in rec.calls if tid == f"{thread}#{sample}"]
            assert asked == [q for t, *_, q in THREADS if t == thread]

    # The thread that loads a second clip: "main" first, then "clip2", the active clip of its turn.
    c1, c2 = (outcomes[f"tC-{n}#0"].state for n in (1, 2))
    assert c1 is not None and c2 is not None
    assert list(c1["clips"]) == ["main"] and c1["active_clip"] == "main"
    assert list(c2["clips"]) == ["main", "clip2"] and c2["active_clip"] == "clip2"
    assert Path(c2["clips"]["clip2"]["path"]).name == "c2.wav" and Path(c2["clips"]["main"]["path"]).name == "c.wav"
    user_audio = [
        [p["clip"] for p in m["content"] if p["type"] == "audio" and p["start"] is None]
        for m in c2["conversation"]
        if m["role"] == "user" and any(p["type"] == "text" and p["origin"] == "user" for p in m["content"])
    ]  # the questions' turns (retry nudges are user turns of runtime text)
    assert user_audio == [["main"], [], ["clip2"]], "each clip's full audio enters the conversation once"
    assert c2["introduced"] == ["main", "clip2"]


def test_a_thread_runs_afresh_each_time(suite: Path, tiny: ModelBackend) -> None:
    items = [i for i in load_benchmark(suite) if i.thread == "tB"]
    agent = agent_for(tiny)
    first = asyncio.run(run_all(agent, jobs(items)))
    again = asyncio.run(run_all(agent, jobs(items)))  # the same graph thread ids, the same checkpointer
    for a, b in zip(first, again, strict=True):
        assert a.state is not None and b.state is not None
        assert user_questions(a.state) == user_questions(b.state)
        assert a.state["reasoning"] == b.state["reasoning"]  # greedy: the same run again


def test_threads_need_a_checkpointer_and_whole_threads(suite: Path, tiny: ModelBackend) -> None:
    items = load_benchmark(suite)
    with pytest.raises(ConfigError, match="checkpointer"):
        asyncio.run(run_all(agent_for(tiny, checkpointer=None), jobs(items)))
    singles = [i for i in items if i.thread is None]
    assert len(asyncio.run(run_all(agent_for(tiny, checkpointer=None), jobs(singles)))) == 2  # fine without one
    later = [i for i in items if i.thread == "tA" and i.turn > 0]
    with pytest.raises(ConfigError, match="turns 0, 1"):
        asyncio.run(run_all(agent_for(tiny), jobs(later)))
    # A resume re-runs whole threads: one unfinished turn brings back all of its thread.
    todo = jobs(items, samples=2)
    done = {j.id for j in todo} - {"tA-1#0", "s1#1"}
    again = {j.id for j in whole_threads(todo, done)}
    assert again == {"tA-0#0", "tA-1#0", "tA-2#0", "s1#1"}


def test_a_failed_turn_ends_its_thread(tmp_path: Path, tiny: ModelBackend) -> None:
    gone = [
        suite_record("tD-0", "missing", "sound", "count", "How many beeps are there in the clip?", ["1", "2"], "1",
                     "choice", "tD", 0),
        suite_record("tD-1", "a", "sound", "count", "And between 2 and 4 s?", ["1", "2"], "1", "choice", "tD", 1),
    ]  # fmt: skip
    items = [i for i in load_benchmark(write_suite(tmp_path, extra=gone)) if i.thread in ("tD", "tB")]
    outcomes: dict[str, RunOutcome] = {o.job.item.id: o for o in asyncio.run(run_all(agent_for(tiny), jobs(items)))}
    assert outcomes["tD-0"].state is None and "AudioNotFoundError" in (outcomes["tD-0"].error or "")
    assert outcomes["tD-1"].state is None
    assert (outcomes["tD-1"].error or "").startswith("ThreadError: not asked: turn 0 (tD-0) of thread tD#0 failed")
    assert all(outcomes[f"tB-{n}"].error is None for n in (0, 1)), "other threads are not affected"


# --------------------------------------------------------------------------------------------- evaluation


async def test_report_by_turn_and_domain_and_resume_reruns_unfinished_threads(
    suite: Path, tiny: ModelBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = load_benchmark(suite)
    agent = agent_for(tiny)
    out = tmp_path / "res" / "R.json"
    report = await evaluate(agent, items, out=out, concurrency=3, progress=False)
    preds = {p["id"]: p for p in json.loads(Path(str(report.predictions)).read_text())}
    assert report.n == 10 and report.errors == 0

    def score(ids: list[str]) -> tuple[int, int]:
        return len(ids), sum(bool(preds[i]["echo"]["correct"]) for i in ids)

    turns = {str(n): score([f"{t}-{m}" for t, m, *_ in THREADS if m == n]) for n in (0, 1, 2)}
    assert {k: (v.n, v.correct) for k, v in report.by_turn.items()} == turns
    assert [v.n for v in report.by_turn.values()] == [3, 3, 2], "single items are not in by_turn"
    domains = {d: score([i.id for i in items if i.record["task"] == d]) for d in ("music", "sound", "speech")}
    assert {k: (v.n, v.correct) for k, v in report.by_domain.items()} == domains
    assert set(report.per_category) == {
        "sound/count", "sound/order", "music/note_count", "music/first_instrument", "speech/digit_at",
        "speech/word_count", "sound/locate", "speech/voice_count",
    }  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["by_turn"]["2"]["n"] == 2 and set(saved["by_domain"]) == {"music", "sound", "speech"}

    # A crash: the partial file keeps s1, tB (whole) and tA's first two turns; tA-0 is marked so we can tell
    # whether the report uses the stale line or the re-run's.
    partial = partial_path(out)
    lines = {json.loads(x)["id"]: json.loads(x) for x in partial.read_text().splitlines()}
    keep = ["s1", "tB-0", "tB-1", "tA-0", "tA-1"]
    lines["tA-0"] = {**lines["tA-0"], "model_output": "STALE", "correct": True}
    partial.write_text("".join(json.dumps(lines[k]) + "\n" for k in keep))

    rec = Recorder(agent, monkeypatch)
    resumed = await evaluate(agent, items, out=out, concurrency=3, progress=False)
    redo = {i.id for i in items} - {"s1", "tB-0", "tB-1"}
    assert sorted(rec.asked) == sorted(i.question for i in items if i.id in redo), "unfinished threads run again"
    assert resumed.n == 10
    assert resumed.model_dump(exclude={"mean_latency_s"}) == report.model_dump(exclude={"mean_latency_s"})
    again = {p["id"]: p for p in json.loads(Path(str(resumed.predictions)).read_text())}
    assert again["tA-0"]["model_output"] != "STALE", "the re-run turn replaces the stale line"

    rec.calls.clear()  # a finished run asks nothing
    assert (await evaluate(agent, items, out=out, progress=False)).n == 10 and rec.asked == []


def test_limit_cuts_a_thread_to_its_first_turns(suite: Path, tiny: ModelBackend) -> None:
    items = sorted(load_benchmark(suite), key=lambda i: (i.thread or "~", i.turn))  # tA-0, tA-1, tA-2, tB-0, ...
    report = asyncio.run(evaluate(agent_for(tiny), items, limit=4, progress=False))
    assert report.n == 4 and {k: v.n for k, v in report.by_turn.items()} == {"0": 2, "1": 1, "2": 1}


# ------------------------------------------------------------------------------------------ open questions


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelBackend, Path]:
    """A tiny model that answers "How many beeps are there?" about its clip with `<answer>four</answer>`."""
    from memorize import Trace, teach

    from echo_agent.backends.transformers import TransformersBackend
    from echo_agent.tiny_models import build_tiny_qwen2_audio

    root = tmp_path_factory.mktemp("open")
    wav = write_beeps(root / "beeps.wav", 6.0, [(1.0, 0.2), (2.3, 0.2), (2.7, 0.2), (4.5, 0.3)])
    model, processor = build_tiny_qwen2_audio(0)
    backend = TransformersBackend(model, processor)
    trace = Trace(before="<think>Two close together <seg>2.0, 3.0</seg>", span=(2.0, 3.0),
                  after=" so four in all.</think><answer>four</answer>")  # fmt: skip
    teach(backend, wav, "How many beeps are there?", [], trace)
    return backend, wav


@pytest.mark.parametrize(
    ("gold", "kind", "correct"),
    [("4", "number", True), ("5", "number", False), ("four", "word", True), ("4", None, True)],
)
def test_open_questions_are_scored_by_the_matcher_through_the_graph(
    taught: tuple[ModelBackend, Path], tmp_path: Path, gold: str, kind: str | None, correct: bool
) -> None:
    backend, wav = taught
    agent = EchoAgent(backend, config=AgentConfig(sampling=SamplingParams(max_new_tokens=48)))
    record: dict[str, Any] = {"id": "o1", "audio_id": str(wav), "question": "How many beeps are there?",
                              "choices": [], "answer": gold, "task": "sound"}  # fmt: skip
    if kind is None:  # a file must say how its open answers are matched; the library infers it from the gold
        (tmp_path / "open.json").write_text(json.dumps([record]))
        with pytest.raises(DataError, match="non-empty list"):
            load_benchmark(tmp_path / "open.json")
        result = asyncio.run(agent.ask(wav, "How many beeps are there?", [], gold=gold))
        assert result.answer == "four" and result.verdict is not None and result.verdict.correct is correct
        return
    (tmp_path / "open.json").write_text(json.dumps([{**record, "answer_kind": kind}]))
    items: list[BenchItem] = load_benchmark(tmp_path / "open.json")
    (outcome,) = asyncio.run(run_all(agent, jobs(items)))
    assert outcome.state is not None and outcome.state["answer"] == "four"
    assert outcome.state["answer_kind"] == kind
    assert outcome.state["verdict"]["correct"] is correct and outcome.state["choice"] is None
    report = asyncio.run(evaluate(agent, items, progress=False))
    assert report.correct == int(correct)


# ------------------------------------------------------------------------------------------------ collect


async def test_collect_writes_whole_threads_and_resume_reruns_an_unfinished_one(
    suite: Path, tiny: ModelBackend, tmp_path: Path
) -> None:
    """Trajectories of a thread's later turns hold the earlier turns; a file cut inside a thread is completed by
    running that thread again, and every (item, sample) ends up on file exactly once."""
    from echo_agent.training.collect import collect, read_trajectories

    items = load_benchmark(suite)
    out = tmp_path / "traj.jsonl"
    first = await collect(agent_for(tiny), items, samples=2, out=out, seed=1, concurrency=4, progress=False)
    assert first.written == len(items) * 2
    trajs, _ = read_trajectories(out)
    thread_a = [q for t, _, _, _, _, q in THREADS if t == "tA"]
    assert user_questions({"conversation": trajs["tA-1#0"].messages}) == thread_a[:2]
    assert user_questions({"conversation": trajs["tA-0#0"].messages}) == thread_a[:1]
    # Cut the file after thread tA's first turn of sample 1: its other turns are gone, its state too.
    lines = out.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if not (json.loads(ln)["id"].startswith("tA-") and json.loads(ln)["id"] != "tA-0#1")]
    out.write_text("".join(keep))
    second = await collect(agent_for(tiny), items, samples=2, out=out, seed=1, concurrency=4, progress=False)
    ids = [json.loads(ln)["id"] for ln in out.read_text().splitlines()]
    assert sorted(ids) == sorted({f"{it.id}#{k}" for it in items for k in range(2)})
    assert second.done_before == len(keep) and second.written == len(ids) - len(keep)
