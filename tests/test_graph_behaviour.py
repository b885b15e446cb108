"""Graph control flow: caps, retries, the function-call protocol, subgraph use, checkpoint size.

`ScriptedBackend` (tests/doubles.py) is a TEST DOUBLE, labelled as such: it replays fixed model
outputs, for faults a real tiny model cannot be made to produce on demand (a model that never stops
asking to listen, a malformed answer followed by a good one, a precise tool-call sequence).
Everything that concerns real audio reaching a real model is in test_graph_e2e.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import sqlite3
from pathlib import Path
from typing import Any

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


async def test_after_a_new_clip_a_plain_seg_means_the_clip_the_question_is_about(tmp_path: Path) -> None:
    """Issue 14.13: adding a clip to a thread does not move plain <seg> tags to it; naming it in the question
    does, and `active_clip` in the input overrides both."""
    from langgraph.checkpoint.memory import InMemorySaver

    first = write_beeps(tmp_path / "a.wav", 8.0, [(1.0, 0.2)])
    second = write_beeps(tmp_path / "b.wav", 4.0, [(2.0, 0.2)], seed=1)
    answer = done(" y</think><answer>1</answer>")
    backend = ScriptedBackend(
        [done("<think>x</think><answer>1</answer>"), seg("<think><seg>1.0, 2.0"), answer,
         seg("<think><seg>1.0, 2.0"), answer, seg("<think><seg>1.0, 2.0"), answer]
    )  # fmt: skip
    agent = EchoAgent(backend, checkpointer=InMemorySaver())
    await agent.ask(first, "Q1?", thread_id="t")
    result = await agent.ask({"clip2": second}, "Q2?", thread_id="t")
    assert [(c.clip, c.valid) for c in result.listens] == [("main", True)]
    # The second question's user turn carries only the new clip; the prompt names both clips and says which
    # one a plain tag means.
    user2 = backend.requests[1].messages[-1]
    assert [p.get("clip") for p in user2["content"] if p["type"] == "audio"] == ["clip2"]
    assert "'main' (8.0 s)" in user2["content"][-1]["text"]  # type: ignore[typeddict-item]
    assert "<seg>START, END</seg> refers to 'main'" in user2["content"][-1]["text"]  # type: ignore[typeddict-item]
    assert backend.audio_seen[2] == [("main", None, None), ("clip2", None, None), ("main", 1.0, 2.0)]

    # A question that names the new clip (any case, as a word) is about it.
    result = await agent.ask(None, "Is the beep in CLIP2 early?", thread_id="t")
    assert [(c.clip, c.valid) for c in result.listens] == [("clip2", True)]
    assert "refers to 'clip2'" in backend.requests[3].messages[-1]["content"][-1]["text"]  # type: ignore[typeddict-item]
    assert backend.audio_seen[4][-1] == ("clip2", 1.0, 2.0)

    # The input's active_clip wins over what the question names.
    graph_input = new_question("Is the beep in clip2 early?", active_clip="main")
    state = await agent.graph.ainvoke(graph_input, {"configurable": {"thread_id": "t"}})
    assert [(c["clip"], c["valid"]) for c in state["listens"]] == [("main", True)]


def test_question_clip_is_the_first_unless_the_question_names_another() -> None:
    from echo_agent.graphs.steps import question_clip

    ids = ["main", "clip2", "clip3"]
    assert question_clip("How many beeps?", ids) == "main"
    assert question_clip("What is the main sound in clip3?", ids) == "clip3"  # 'main' is the default anyway
    assert question_clip("Is clip3 longer than clip2?", ids) == "clip3"  # the one named first
    assert question_clip("Compare clip2 and clip3", ids) == "clip2"
    assert question_clip("clip22 or myclip2 or clip2x", ids) == "main"  # whole ids only
    assert question_clip("x" * 100_000 + " clip2", ids) == "clip2"


# ---- the LangGraph Server factory under `langgraph dev`'s blocking detector (issue 14.15) --------------------

ROOT = Path(__file__).resolve().parents[1]


def _factory_module() -> Any:
    """`langgraph.json`'s factory module, loaded by file path as `langgraph dev` loads it (a fresh copy, so its
    model is not loaded yet)."""
    import importlib.util
    import json

    path, _ = json.loads((ROOT / "langgraph.json").read_text())["graphs"]["echo_agent"].split(":")
    spec = importlib.util.spec_from_file_location("langgraph_app_under_test", ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blockbuster_as_langgraph_dev() -> Any:
    """BlockBuster set up as `langgraph dev` sets it up (langgraph_runtime_inmem.queue._enable_blockbuster): that
    function itself when the in-memory runtime is installed, else the same configuration written out (0.36.7)."""
    try:
        from langgraph_runtime_inmem.queue import _enable_blockbuster  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return _enable_blockbuster()
    from blockbuster import BlockBuster  # type: ignore[import-not-found]

    bb = BlockBuster(excluded_modules=[])
    allowed = ["os.stat", "os.listdir", "os.remove", "io.BufferedReader.read", "io.BufferedWriter.write",
               "io.TextIOWrapper.read", "io.TextIOWrapper.write", "threading.Lock.acquire",
               *(name for name in bb.functions if name.startswith("os.path."))]  # fmt: skip
    for name in allowed:
        if (function := bb.functions.pop(name, None)) is not None:
            function.deactivate()
    bb.activate()
    return bb


async def test_graph_factory_loads_the_default_model_off_the_event_loop(
    clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default model (echo-tiny, no $ECHO_MODEL), the factory and a question through its graph run on an
    event loop watched as `langgraph dev` watches it: no `BlockingError` (torch's import and the weights' read
    used to happen right on the loop)."""
    pytest.importorskip("blockbuster", reason="`langgraph dev`'s blocking detector (pip install blockbuster)")
    from echo_agent.graphs.state import EchoContext

    monkeypatch.delenv("ECHO_MODEL", raising=False)
    monkeypatch.delenv("ECHO_BASE_URL", raising=False)
    module = _factory_module()
    ref = AudioStore().load(clip).model_dump()  # the caller's own file read, before the watch starts
    context = EchoContext(sampling=SamplingParams(max_new_tokens=8))
    bb = _blockbuster_as_langgraph_dev()
    try:
        made = module.make_graph({"configurable": {}})
        assert inspect.iscoroutine(made)  # on a running loop the server awaits it
        graph = await made
        out = await graph.ainvoke(new_question("How many beeps?", {"main": ref}, ["1", "2"]), context=context)
        again = await module.make_graph({"configurable": {}})  # the model is loaded once per process
    finally:
        bb.deactivate()
    assert out["status"] in ("answered", "no_answer") and out["generated_tokens"] > 0
    assert set(graph.get_graph().nodes) >= {"prepare", "model", "listen", "verifier"}
    assert module._backend is not None and module._backend.name == "echo-tiny" and again is not graph


def test_graph_factory_called_without_a_loop_returns_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO_MODEL", "tiny-random-qwen2-audio")
    graph = _factory_module().make_graph()
    assert set(graph.get_graph().nodes) >= {"prepare", "model", "listen", "verifier"}


def test_langgraph_dev_answers_with_the_default_model(clip: Path, tmp_path: Path) -> None:
    """The real `langgraph dev` (pip install "langgraph-cli[inmem]") on loopback, the repository's factory, no
    $ECHO_MODEL: a run answers and the server logs no `BlockingError`."""
    import json
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time

    import httpx

    cli = shutil.which("langgraph", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if cli is None or importlib.util.find_spec("langgraph_runtime_inmem") is None:
        pytest.skip('needs the LangGraph CLI with its in-memory runtime: pip install "langgraph-cli[inmem]"')
    project = tmp_path / "project"
    project.mkdir()
    graph_path = json.loads((ROOT / "langgraph.json").read_text())["graphs"]["echo_agent"].split(":")
    (project / "langgraph.json").write_text(
        json.dumps({"dependencies": ["."], "graphs": {"echo_agent": f"{ROOT / graph_path[0]}:{graph_path[1]}"}})
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("ECHO_MODEL", "ECHO_BASE_URL")}
    env.update(LANGGRAPH_CLI_NO_ANALYTICS="1", LANGSMITH_TRACING="false", OMP_NUM_THREADS="1")
    log = tmp_path / "langgraph.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [cli, "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1", "--port", str(port)],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        ref = AudioStore().load(clip).model_dump()
        thread = httpx.post(f"{url}/threads", json={}, timeout=30).json()["thread_id"]
        body = {"assistant_id": "echo_agent", "context": {"sampling": {"max_new_tokens": 8}},
                "input": {"clips": {"main": ref}, "question": "How many beeps?", "choices": ["1", "2"]}}  # fmt: skip
        reply = httpx.post(f"{url}/threads/{thread}/runs/wait", json=body, timeout=300)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert reply.status_code == 200, (reply.text, text[-3000:])
    assert "BlockingError" not in text and "error" not in reply.json(), (reply.text, text[-3000:])
    assert reply.json()["status"] in ("answered", "no_answer") and reply.json()["generated_tokens"] > 0
