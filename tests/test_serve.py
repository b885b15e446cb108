"""`echo-agent serve` over real HTTP on loopback (uvicorn on a thread), with the tiny random Qwen2-Audio.

Wire format (OpenAI chunks over SSE), several clients at once, chat threads in the same SQLite
checkpointer as `echo-agent chat`, bearer-token auth, clear 4xx errors, and `langgraph.json`.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from served import CLI, SLOW, ThreadServer, serve_env

from echo_agent.agent import load_backend
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.serve import ServeConfig, create_app

RAW = "tiny-random-qwen2-audio"
ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Bearer t0ken"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    data = tmp_path_factory.mktemp("serve")
    cfg = AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=8, seed=0))
    config = ServeConfig(model_name=RAW, data_dir=data, agent=cfg, api_token=SecretStr("t0ken"))
    with ThreadServer(create_app(load_backend(RAW), config)) as s:
        s.db = config.db_path  # type: ignore[attr-defined]
        yield s


def clip_part(path: Path) -> dict[str, Any]:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"},
    }


def sse(resp: httpx.Response) -> list[Any]:
    """The `data:` payloads of an SSE body, checking the framing as it goes."""
    events = [block for block in resp.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(block[6:]) for block in events[:-1]]


def post(server: ThreadServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=SLOW)


def test_raw_model_stream_matches_the_plain_reply(server: ThreadServer, beeps_wav: Path) -> None:
    body = {
        "model": RAW, "messages": [{"role": "user", "content": [clip_part(beeps_wav), {"type": "text", "text": "hi"}]}],
        "temperature": 0, "max_tokens": 12, "logprobs": True, "return_token_ids": True,
    }  # fmt: skip
    plain = post(server, body).json()
    resp = post(server, {**body, "stream": True})
    assert resp.headers["content-type"].startswith("text/event-stream")
    chunks = sse(resp)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    last = chunks[-1]["choices"][0]
    choice = plain["choices"][0]
    assert text == choice["message"]["content"] and last["finish_reason"] == choice["finish_reason"] == "length"
    assert last["token_ids"] == choice["token_ids"] and len(choice["token_ids"]) == 12
    assert [x["logprob"] for x in last["logprobs"]["content"]] == [x["logprob"] for x in choice["logprobs"]["content"]]
    assert chunks[-1]["prompt_token_ids"] == plain["prompt_token_ids"] and plain["usage"]["completion_tokens"] == 12


def test_agent_stream_events_in_order(server: ThreadServer, beeps_wav: Path) -> None:
    content = [clip_part(beeps_wav), {"type": "text", "text": "Beeps? [1 | 2]"}]
    body = {"model": "echo-agent", "stream": True, "temperature": 0, "messages": [{"role": "user", "content": content}]}
    chunks = sse(post(server, body))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["echo"]["type"] == "start" and deltas[0]["echo"]["clips"]["main"]["duration"] == 6.0
    kinds = [
        d["echo"]["type"] if "echo" in d else ("reasoning" if "reasoning_content" in d else "content") for d in deltas
    ]
    assert kinds[-1] == "result" and kinds[-2] == "content" and "verdict" in kinds and "reasoning" in kinds
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    result = deltas[-1]["echo"]
    # The streamed reasoning after the last retry adds up to the final attempt's text.
    after = max((i for i, k in enumerate(kinds) if k == "retry"), default=-1)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas[after + 1 :])
    assert result["reasoning"] == reasoning and result["status"] in ("answered", "no_answer")


async def test_several_clients_at_once(server: ThreadServer, beeps_wav: Path) -> None:
    async def ask(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        content = [clip_part(beeps_wav), {"type": "text", "text": f"Question {i % 2}?"}]
        body = {"model": "echo-agent", "messages": [{"role": "user", "content": content}], "temperature": 0}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return dict(r.json()["choices"][0]["message"]["echo"])

    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=SLOW) as client:
        results = await asyncio.gather(*(ask(client, i) for i in range(6)))
    # Greedy decoding: the same question gets the same reasoning, whoever else is asking.
    assert len({r["reasoning"] for r in results[0::2]}) == 1 and len({r["reasoning"] for r in results[1::2]}) == 1


def test_threads_persist_in_the_chat_database(server: ThreadServer, beeps_wav: Path, tmp_path: Path) -> None:
    content = [clip_part(beeps_wav), {"type": "text", "text": "First?"}]
    first = post(server, {"model": "echo-agent", "messages": [{"role": "user", "content": content}],
                          "echo": {"thread_id": "web-1"}})  # fmt: skip
    assert first.status_code == 200 and first.json()["choices"][0]["message"]["echo"]["thread_id"] == "web-1"
    second = post(server, {"model": "echo-agent", "messages": [{"role": "user", "content": "Second? [a | b]"}],
                           "echo": {"thread_id": "web-1"}})  # fmt: skip
    assert second.status_code == 200, second.text  # no audio resent: the thread has it
    listed = httpx.get(f"{server.url}/api/threads", headers=AUTH).json()["threads"]
    assert "web-1" in [t["thread_id"] for t in listed]
    view = httpx.get(f"{server.url}/api/threads/web-1", headers=AUTH).json()
    assert [t["question"] for t in view["turns"]] == ["First?", "Second? Choose the answer from ['a', 'b']."]
    sha = view["clips"]["main"]["sha256"]
    assert httpx.get(f"{server.url}/api/audio/{sha}", headers=AUTH).content == beeps_wav.read_bytes()
    assert httpx.get(f"{server.url}/api/audio/..%2Fchat.sqlite", headers=AUTH).status_code == 404
    # `echo-agent chat` resumes the very thread from the same SQLite file.
    out = subprocess.run(
        [*CLI, "chat", "--thread", "web-1", "--db", str(server.db), "--max-new-tokens", "4"],  # type: ignore[attr-defined]
        input="/quit\n", capture_output=True, text=True, env=serve_env(tmp_path), timeout=SLOW, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "you: [audio]First?" in " ".join(out.stdout.split()) and "Second?" in out.stdout


def test_auth_and_clear_errors(server: ThreadServer) -> None:
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    models = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == [RAW, "echo-agent"]
    assert httpx.get(f"{server.url}/").status_code == 200  # the page itself; it sends the key on its calls
    bad = {
        "agent without audio": ({"model": "echo-agent", "messages": [{"role": "user", "content": "hi"}]}, "no audio"),
        "unknown role": ({"model": RAW, "messages": [{"role": "robot", "content": "hi"}]}, "unknown role"),
        "continue without a turn": (
            {"model": RAW, "messages": [{"role": "user", "content": "hi"}], "continue_final_message": True,
             "add_generation_prompt": False}, "final assistant message"),
        "bad content part": ({"model": RAW, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                             "unsupported content part"),
        "not json": (None, "invalid request"),
        "bad thread id": ({"model": "echo-agent", "messages": [{"role": "user", "content": "hi"}],
                           "echo": {"thread_id": "../x"}}, "echo.thread_id"),
    }  # fmt: skip
    for name, (body, message) in bad.items():
        r = httpx.post(
            f"{server.url}/v1/chat/completions", content=b"{" if body is None else json.dumps(body),
            headers={**AUTH, "Content-Type": "application/json"},
        )  # fmt: skip
        assert r.status_code == 400 and message in r.json()["error"]["message"], (name, r.text)


def test_langgraph_json_points_at_a_graph_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = json.loads((ROOT / "langgraph.json").read_text())
    path, attr = spec["graphs"]["echo_agent"].split(":")
    module_spec = importlib.util.spec_from_file_location("langgraph_app", ROOT / path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # loaded by file path, as `langgraph dev` does
    monkeypatch.setenv("ECHO_MODEL", RAW)
    graph = getattr(module, attr)({"configurable": {}})
    assert set(graph.get_graph().nodes) >= {"prepare", "model", "listen", "verifier"}


def test_serve_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    for args, message in (
        (["--auth-token-env", "NO_SUCH_TOKEN_VAR"], "error: --auth-token-env NO_SUCH_TOKEN_VAR"),
        (["--allow-file-dir", str(tmp_path / "nope")], "not a directory"),
        (["--model", "openai:m"], "no server"),
        (["--max-request-mb", "0"], "--max-request-mb must be > 0"),
        (["--max-prompt-tokens", "3"], "--max-prompt-tokens: Input should be greater than or equal to 16"),
        (["--max-concurrent-uploads", "0"], "--max-concurrent-uploads: Input should be greater than or equal to 1"),
        (["--max-request-seconds", "-1"], "--max-request-seconds: Input should be greater than 0"),
    ):
        out = subprocess.run([*CLI, "serve", "--port", "0", *args], capture_output=True, text=True,
                             env=serve_env(tmp_path), timeout=SLOW, check=False)  # fmt: skip
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_with_no_model_serve_lists_and_answers_as_echo_tiny(tmp_path: Path) -> None:
    """The default model is echo-tiny, the shipped one: `serve` with no --model says so and answers to that name."""
    from served import ServeProcess

    proc = ServeProcess(["--max-new-tokens", "16"], serve_env(tmp_path / "home"))
    try:
        assert "models: echo-tiny," in "".join(proc.lines)
        models = httpx.get(f"{proc.url}/v1/models", timeout=SLOW).json()
        assert [m["id"] for m in models["data"]] == ["echo-tiny", "echo-agent"]
        body = {"model": "echo-tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4}
        reply = httpx.post(f"{proc.url}/v1/chat/completions", json=body, timeout=SLOW)
        assert reply.status_code == 200 and reply.json()["model"] == "echo-tiny"
    finally:
        proc.stop()


def test_every_model_flag_names_the_real_default() -> None:
    from echo_agent.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, cmd in sub.choices.items():  # type: ignore[union-attr]
        for action in cmd._actions:
            if action.dest == "model":
                assert action.help and "default: echo-tiny" in action.help, name
