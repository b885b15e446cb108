"""Graph control flow: caps, retries, the function-call protocol, subgraph use, checkpoint size.

`ScriptedBackend` (tests/doubles.py) is a TEST DOUBLE, labelled as such: it replays fixed model
outputs, for faults a real tiny model cannot be made to produce on demand (a model that never stops
asking to listen, a malformed answer followed by a good one, a precise tool-call sequence).
Everything that concerns real audio reaching a real model is in test_graph_e2e.py.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import write_beeps
from doubles import ScriptedBackend
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from echo_agent.agent import EchoAgent, load_backend
from echo_agent.audio import AudioStore
from echo_agent.backends.base import Generation
from echo_agent.config import AgentConfig, ListenLimits, SamplingParams
from echo_agent.graphs import build_echo_graph, new_question


def seg(text: str) -> Generation:
    return Generation(text=text, finish_reason="stop", stop_string="</seg>", stop_string_in_text=False)


def done(text: str) -> Generation:
    return Generation(text=text, finish_reason="eos")


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_beeps(tmp_path / "c.wav", 8.0, [(1.0, 0.2), (5.0, 0.2)])


async def test_never_ending_seg_stream_is_bounded(clip: Path) -> None:
    backend = ScriptedBackend([seg("<think><seg>1.0, 2.0")])
    cfg = AgentConfig(max_model_calls=12, listen=ListenLimits(max_audios=8))
    result = await EchoAgent(backend, config=cfg).ask(clip, "How many beeps?", ["1", "2"])
    assert len(backend.requests) == 12  # the model-call cap, not LangGraph's recursion limit
    valid = [c for c in result.listens if c.valid]
    invalid = [c for c in result.listens if not c.valid]
    assert len(valid) == 7  # the clip plus 7 re-listens = 8 audio inputs
    assert invalid and all("budget" in (c.reason or "") for c in invalid)
    assert max(len(a) for a in backend.audio_seen) == 8
    assert result.status == "no_answer" and result.answer is None


async def test_retry_after_missing_answer(clip: Path) -> None:
    backend = ScriptedBackend([done("<think>hmm"), done("<think>two beeps</think><answer>2</answer>")])
    result = await EchoAgent(backend).ask(clip, "How many beeps?", ["1", "2"], gold="2")
    assert len(backend.requests) == 2
    nudge = backend.requests[1].messages[-1]
    assert nudge["role"] == "user" and "did not give a final answer" in nudge["content"][0]["text"]  # type: ignore[typeddict-item]
    assert result.status == "answered" and result.choice == "2"
    assert result.verdict is not None and result.verdict.correct and result.verdict.reward == pytest.approx(1.0)


async def test_retries_are_bounded(clip: Path) -> None:
    backend = ScriptedBackend([done("no tags at all")])
    result = await EchoAgent(backend, config=AgentConfig(max_retries=2)).ask(clip, "Q?", ["a", "b"])
    assert len(backend.requests) == 3 and result.status == "no_answer"


async def test_seg_protocol_inserts_audio_inline(clip: Path) -> None:
    backend = ScriptedBackend([seg("<think>check <seg>1.0, 2.5"), done(" one.</think><answer>1</answer>")])
    await EchoAgent(backend).ask(clip, "Q?", ["1", "2"])
    second = backend.requests[1]
    assert second.continue_final and second.stop == ["</seg>"]
    turn = second.messages[-1]
    assert turn["role"] == "assistant"
    kinds = [(p["type"], p.get("text") or p.get("clip")) for p in turn["content"]]
    assert kinds == [("text", "<think>check <seg>1.0, 2.5"), ("text", "</seg>"), ("audio", "main")]
    assert backend.audio_seen[1] == [("main", None, None), ("main", 1.0, 2.5)]


async def test_function_protocol_through_the_graph(clip: Path) -> None:
    call = {"id": "c1", "name": "listen", "arguments": '{"start": 4.5, "end": 6.0}'}
    bad = {"id": "c2", "name": "listen", "arguments": '{"start": 9, "end": 3}'}
    backend = ScriptedBackend(
        [
            Generation(text="", finish_reason="tool_calls", tool_calls=[call, bad]),  # type: ignore[list-item]
            done("<think>beep at 5 s</think><answer>2</answer>"),
        ]
    )
    result = await EchoAgent(backend, config=AgentConfig(protocol="function")).ask(clip, "Q?", ["1", "2"])
    req = backend.requests[1]
    assert req.tools and req.tools[0]["function"]["name"] == "listen"  # type: ignore[index]
    roles = [m["role"] for m in req.messages]
    assert roles == ["user", "assistant", "tool", "tool", "user"]
    assert req.messages[2].get("tool_call_id") == "c1" and req.messages[3].get("tool_call_id") == "c2"
    assert backend.audio_seen[1] == [("main", None, None), ("main", 4.5, 6.0)]
    assert [(c.valid, c.protocol) for c in result.listens] == [(True, "function"), (False, "function")]
    assert result.answer == "2"


async def test_events_stream_text_listens_and_verdict(clip: Path) -> None:
    backend = ScriptedBackend([seg("<think><seg>1, 2"), done(" ok</think><answer>1</answer>")])
    events = [e async for e in EchoAgent(backend).astream(clip, "Q?", ["1", "2"])]
    kinds = [e["type"] for e in events]
    assert kinds == ["text", "listen", "text", "verdict", "result"]
    assert events[-1]["result"]["listens"][0]["start"] == 1.0


async def test_compiled_graph_works_as_a_subgraph(clip: Path) -> None:
    """The compiled Echo graph is a node of a user's own graph (see examples/subgraph.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from subgraph import build_pipeline  # type: ignore[import-not-found]

    backend = ScriptedBackend([seg("<think><seg>0.5, 1.5"), done(" yes</think><answer>2</answer>")])
    pipeline = build_pipeline(backend, AudioStore())
    out = await pipeline.ainvoke({"audio_path": str(clip), "question": "How many beeps?", "choices": ["1", "2"]})
    assert out["answer"] == "2" and out["status"] == "answered"
    assert out["report"].startswith("answer=2 after 1 listen")


async def test_checkpoint_size_independent_of_audio_length(tmp_path: Path) -> None:
    """State holds audio references, so a 60 s and a 5 s clip checkpoint to about the same size."""
    long_clip = write_beeps(tmp_path / "long.wav", 60.0, [(10.0, 0.2), (40.0, 0.2)])
    short_clip = write_beeps(tmp_path / "short.wav", 5.0, [(1.0, 0.2), (4.0, 0.2)])
    db = tmp_path / "ckpt.sqlite"
    backend = load_backend("tiny-random-qwen2-audio")
    cfg = AgentConfig(sampling=SamplingParams(max_new_tokens=16), max_retries=0)
    sizes: dict[str, int] = {}
    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        store = AudioStore()
        graph = build_echo_graph(backend, store, cfg, checkpointer=saver)
        for name, path in (("long", long_clip), ("short", short_clip)):
            inp = new_question("How many beeps?", {"main": store.load(path).model_dump()}, ["1", "2"])
            await graph.ainvoke(inp, {"configurable": {"thread_id": name}})
    with sqlite3.connect(db) as conn:
        for name in ("long", "short"):
            (ck,) = conn.execute(
                "SELECT SUM(LENGTH(checkpoint)) FROM checkpoints WHERE thread_id=?", (name,)
            ).fetchone()
            (wr,) = conn.execute("SELECT SUM(LENGTH(value)) FROM writes WHERE thread_id=?", (name,)).fetchone()
            sizes[name] = int(ck) + int(wr or 0)
    print("checkpoint bytes per thread:", sizes)
    audio_bytes_60s = 60 * 16000 * 4
    assert sizes["long"] < 100_000, sizes  # a 60 s clip is 3.8 MB of float32 samples
    assert sizes["long"] < audio_bytes_60s / 30
    assert abs(sizes["long"] - sizes["short"]) < 0.15 * sizes["short"], sizes


async def test_chat_thread_adds_a_clip_and_plain_seg_means_the_newest(tmp_path: Path) -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    first = write_beeps(tmp_path / "a.wav", 8.0, [(1.0, 0.2)])
    second = write_beeps(tmp_path / "b.wav", 4.0, [(2.0, 0.2)], seed=1)
    backend = ScriptedBackend(
        [done("<think>x</think><answer>1</answer>"), seg("<think><seg>1.0, 2.0"), done(" y</think><answer>1</answer>")]
    )
    agent = EchoAgent(backend, checkpointer=InMemorySaver())
    await agent.ask(first, "Q1?", thread_id="t")
    result = await agent.ask({"clip2": second}, "Q2?", thread_id="t")
    assert [(c.clip, c.valid) for c in result.listens] == [("clip2", True)]
    # The second question's user turn carries only the new clip, and the prompt names both clips.
    user2 = backend.requests[1].messages[-1]
    assert [p.get("clip") for p in user2["content"] if p["type"] == "audio"] == ["clip2"]
    assert "'main' (8.0 s)" in user2["content"][-1]["text"]  # type: ignore[typeddict-item]
    assert backend.audio_seen[2] == [("main", None, None), ("clip2", None, None), ("clip2", 1.0, 2.0)]
