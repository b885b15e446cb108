"""Faults, on loopback with real servers.

* A fault-injecting proxy in front of a real `echo-agent serve` (tiny random Qwen2-Audio): it answers
  429/500/503, stalls past the client's timeout, or cuts the connection mid-stream, as scripted, and
  otherwise forwards to the real server. It is a TEST DOUBLE for the faults only: every answer that
  reaches the agent comes from the real model.
* `echo-agent serve` killed with `kill -9` mid-request and restarted on the same database.
* Path traversal and oversized or over-long uploads.
* A hostile model (TEST DOUBLE: no real model can be made to do this on demand) that writes `<seg>` tags
  without end, behind a real `echo-agent serve`: the agent stays within its listen and call budgets.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from conftest import write_beeps
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import SecretStr
from served import SLOW, ServeProcess, ThreadServer, serve_env

from echo_agent.agent import EchoAgent, load_backend
from echo_agent.audio import AudioStore
from echo_agent.backends.openai import OpenAIBackend, OpenAIOptions
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.errors import BackendError
from echo_agent.serve import ServeConfig, create_app
from echo_agent.serve.schema import AudioIntake, RequestError

RAW = "tiny-random-qwen2-audio"
FAST = AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=8, seed=0))
QUICK_RETRY = {"backoff_initial": 0.01, "backoff_max": 0.05}


class FaultProxy:
    """TEST DOUBLE (faults only): forwards chat completions to `upstream`, after the scripted faults."""

    def __init__(self, upstream: str, stall_s: float = 3.0) -> None:
        self.plan: list[str] = []
        self.seen: list[str] = []
        app = FastAPI()

        @app.post("/v1/chat/completions", response_model=None)
        async def chat(request: Request) -> Response:
            fault = self.plan.pop(0) if self.plan else "ok"
            self.seen.append(fault)
            body = await request.body()
            if fault.isdigit():
                return JSONResponse({"error": {"message": f"injected {fault}", "type": "fault"}}, int(fault))
            if fault == "sse-error":  # a 200 stream whose first event is an error, as servers send them
                event = b'data: {"error": {"message": "injected: model crashed", "type": "fault", "code": 500}}\n\n'
                return StreamingResponse(iter([event]), media_type="text/event-stream")
            if fault == "stall":
                await asyncio.sleep(stall_s)
            return await self._forward(body, drop=fault == "drop")

        self.server = ThreadServer(app)
        self.upstream = upstream
        self.url = self.server.url

    async def _forward(self, body: bytes, drop: bool) -> Response:
        client = httpx.AsyncClient(timeout=SLOW)
        request = client.build_request("POST", f"{self.upstream}/v1/chat/completions", content=body,
                                       headers={"Content-Type": "application/json"})  # fmt: skip
        resp = await client.send(request, stream=True)

        async def relay() -> AsyncIterator[bytes]:
            try:
                if not drop:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                    return
                # Forward whole SSE events, all the text included, and cut the connection just before the
                # event that says why generation finished: the client has seen everything but the end.
                buffer = b""
                async for chunk in resp.aiter_raw():
                    buffer += chunk
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        if b'"finish_reason": "' in event:
                            raise ConnectionAbortedError("injected: connection cut mid-stream")
                        yield event + b"\n\n"
            finally:
                await resp.aclose()
                await client.aclose()

        return StreamingResponse(relay(), resp.status_code, media_type=resp.headers.get("content-type"))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    data = tmp_path_factory.mktemp("upstream")
    config = ServeConfig(model_name=RAW, data_dir=data, agent=FAST)
    with ThreadServer(create_app(load_backend(RAW), config)) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(upstream: ThreadServer) -> Iterator[FaultProxy]:
    p = FaultProxy(upstream.url)
    yield p
    p.server.stop()


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "text")


def backend_via(proxy: FaultProxy, **options: Any) -> OpenAIBackend:
    return OpenAIBackend(RAW, f"{proxy.url}/v1", options=OpenAIOptions(**{**QUICK_RETRY, **options}))


@pytest.mark.parametrize(
    ("plan", "stream"),
    [(["429", "500"], False), (["503", "drop"], True), (["stall"], False), (["drop", "drop"], True)],
    ids=["429-500", "503-drop", "stall", "drop-drop"],
)
async def test_agent_retries_then_succeeds(
    proxy: FaultProxy, upstream: ThreadServer, beeps_wav: Path, plan: list[str], stream: bool
) -> None:
    direct = EchoAgent(OpenAIBackend(RAW, f"{upstream.url}/v1"), AudioStore(), FAST)
    expected = [e async for e in direct.astream(beeps_wav, "Beeps?")]
    proxy.plan, proxy.seen = list(plan), []
    # A short per-attempt timeout only where a stall must trip it.
    backend = backend_via(proxy, timeout=1.0 if "stall" in plan else SLOW, stream=stream)
    started = time.monotonic()
    events = [e async for e in EchoAgent(backend, AudioStore(), FAST).astream(beeps_wav, "Beeps?")]
    # Every injected fault was met and retried; the answer is the one the real model gives directly.
    assert proxy.seen[: len(plan)] == plan and backend.attempts == len(proxy.seen)
    assert events[-1] == expected[-1]
    if stream:  # text already shown before a cut is not shown twice
        assert [e for e in events if e["type"] == "text"] and _text(events) == _text(expected)
    if "stall" in plan:
        assert time.monotonic() - started >= 1.0


async def test_agent_gives_up_cleanly(proxy: FaultProxy, beeps_wav: Path) -> None:
    proxy.plan, proxy.seen = ["503"] * 10, []
    backend = backend_via(proxy, max_attempts=3)
    with pytest.raises(BackendError) as err:
        await EchoAgent(backend, AudioStore(), FAST).ask(beeps_wav, "Beeps?")
    # Bounded: exactly max_attempts tries, then a message naming the endpoint and the last status.
    assert backend.attempts == 3 and proxy.seen == ["503"] * 3
    assert f"{proxy.url}/v1" in str(err.value) and "HTTP 503: injected 503" in str(err.value)
    # A client error is not retried.
    proxy.plan, proxy.seen = ["400"], []
    backend = backend_via(proxy)
    with pytest.raises(BackendError, match="HTTP 400"):
        await EchoAgent(backend, AudioStore(), FAST).ask(beeps_wav, "Beeps?")
    assert backend.attempts == 1
    proxy.plan, proxy.seen = ["sse-error"], []
    with pytest.raises(BackendError, match="injected: model crashed"):
        await EchoAgent(backend_via(proxy), AudioStore(), FAST).ask(beeps_wav, "Beeps?")
    # Nobody listening: connection errors are retried, then reported.
    proxy.plan = []
    dead = OpenAIBackend(RAW, "http://127.0.0.1:9/v1", options=OpenAIOptions(max_attempts=2, **QUICK_RETRY))
    with pytest.raises(BackendError, match=r"127\.0\.0\.1:9/v1.*gave up after 2 attempts.*connection failed"):
        await EchoAgent(dead, AudioStore(), FAST).ask(beeps_wav, "Beeps?")


# ---- kill -9 mid-request ------------------------------------------------------------------------


def _wav_b64(path: Path) -> dict[str, Any]:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"},
    }


def test_kill_9_mid_request_loses_nothing_that_completed(beeps_wav: Path, tmp_path: Path) -> None:
    args = ["--db", str(tmp_path / "chat.sqlite"), "--data-dir", str(tmp_path / "data"), "--max-new-tokens", "400"]
    env = serve_env(tmp_path / "home")
    server = ServeProcess(args, env)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=SLOW)
        question = [{"role": "user", "content": [_wav_b64(beeps_wav), {"type": "text", "text": "Q1?"}]}]
        first = client.chat.completions.create(
            model="echo-agent", messages=question, max_tokens=12, temperature=0,  # type: ignore[arg-type]
            extra_body={"echo": {"thread_id": "t-kill"}},
        )  # fmt: skip
        assert first.choices[0].message.model_extra is not None
        before = httpx.get(f"{server.url}/api/threads/t-kill").json()
        assert [t["question"] for t in before["turns"]] == ["Q1?"]
        # A long answer is being generated when the server dies.
        stream = client.chat.completions.create(
            model="echo-agent", messages=[{"role": "user", "content": "Q2?"}], max_tokens=400, temperature=0,
            stream=True, extra_body={"echo": {"thread_id": "t-kill"}},
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and (chunk.choices[0].delta.model_extra or {}).get("reasoning_content"):
                break
        server.proc.send_signal(9)
        server.proc.wait(timeout=30)
    finally:
        server.kill()
    again = ServeProcess(args, env)
    try:
        after = httpx.get(f"{again.url}/api/threads/t-kill").json()
        assert after["turns"][0] == before["turns"][0] and after["clips"] == before["clips"]
        # The thread goes on: its clip comes back from the upload store, no audio resent.
        client = openai.OpenAI(base_url=f"{again.url}/v1", api_key="x", max_retries=0, timeout=SLOW)
        third = client.chat.completions.create(
            model="echo-agent", messages=[{"role": "user", "content": "Q3?"}], max_tokens=12, temperature=0,
            extra_body={"echo": {"thread_id": "t-kill"}},
        )  # fmt: skip
        echo = (third.choices[0].message.model_extra or {})["echo"]
        assert echo["thread_id"] == "t-kill" and echo["status"] in ("answered", "no_answer")
        final = httpx.get(f"{again.url}/api/threads/t-kill").json()
        assert final["turns"][0] == before["turns"][0] and final["turns"][-1]["question"] == "Q3?"
    finally:
        again.stop()


# ---- uploads: traversal, size, length ------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadServer, Path]]:
    root = tmp_path_factory.mktemp("guarded")
    allowed = root / "allowed"
    allowed.mkdir()
    write_beeps(allowed / "ok.wav", 2.0, [(0.5, 0.2)])
    write_beeps(root / "secret.wav", 2.0, [(0.5, 0.2)])
    os.symlink(root / "secret.wav", allowed / "escape.wav")
    config = ServeConfig(
        model_name=RAW, data_dir=root / "data", allow_file_dirs=[allowed], max_request_bytes=2_000_000,
        max_audio_seconds=10.0, agent=FAST, api_token=SecretStr("s3cret"),
    )  # fmt: skip
    with ThreadServer(create_app(load_backend(RAW), config)) as server:
        yield server, allowed


def _post(server: ThreadServer, body: Any, token: str | None = "s3cret", **kw: Any) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if not isinstance(body, (bytes, Iterator)):
        body = json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=SLOW, **kw)


def _ask_url(url: str) -> dict[str, Any]:
    content = [{"type": "audio_url", "audio_url": {"url": url}}, {"type": "text", "text": "hi"}]
    return {"model": RAW, "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def test_file_urls_only_below_allowed_dirs(guarded: tuple[ThreadServer, Path]) -> None:
    server, allowed = guarded
    assert _post(server, _ask_url(f"file://{allowed}/ok.wav")).status_code == 200
    for url in (
        f"file://{allowed}/../secret.wav",  # '..' out of the directory
        f"file://{allowed}/%2e%2e/secret.wav",  # the same, percent-encoded
        f"file://{allowed}/escape.wav",  # a symlink inside pointing outside
        f"file://{allowed.parent}/secret.wav",  # plainly outside
    ):
        r = _post(server, _ask_url(url))
        assert r.status_code == 403 and "outside the directories" in r.json()["error"]["message"], url
    assert _post(server, _ask_url("file:///etc/passwd")).status_code == 403
    r = _post(server, _ask_url("http://169.254.169.254/x.wav"))
    assert r.status_code == 400 and "fetches nothing from the network" in r.json()["error"]["message"]
    with pytest.raises(RequestError, match="disabled"):
        AudioIntake(AudioStore(), allowed.parent / "up", []).from_file_url(f"file://{allowed}/ok.wav")


def test_oversized_and_overlong_uploads_are_refused(guarded: tuple[ThreadServer, Path]) -> None:
    server, _ = guarded
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * 2_100_000 + b'"}]}'
    r = _post(server, big)
    assert r.status_code == 413 and "over the limit of 2000000 bytes" in r.json()["error"]["message"]
    r = _post(server, iter([big[i : i + 65536] for i in range(0, len(big), 65536)]))  # chunked, no length
    assert r.status_code == 413
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 20, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")  # 20 s > 10 s
    data = base64.b64encode(buf.getvalue()).decode()
    r = _post(server, _ask_url(f"data:audio/wav;base64,{data}"))
    assert r.status_code == 400 and "20.0 s is over the limit of 10.0 s" in r.json()["error"]["message"]
    r = _post(server, _ask_url("data:audio/wav;base64,@@@"))
    assert r.status_code == 400
    # Auth comes first: without the token nothing is read.
    assert _post(server, _ask_url(f"data:audio/wav;base64,{data}"), token=None).status_code == 401
    assert _post(server, _ask_url(f"data:audio/wav;base64,{data}"), token="wrong").status_code == 401


# ---- a hostile model behind the server -----------------------------------------------------------


class HostileModel:
    """TEST DOUBLE: an OpenAI-compatible "model" that answers every call with hundreds of `<seg>` tags
    and claims to have stopped on `</seg>`, forever."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> dict[str, Any]:
            self.requests.append(await request.json())
            text = "<seg>1.0, 2.0</seg>" * 300 + "<seg>0.5, 1.5"
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                      "stop_reason": "</seg>"}  # fmt: skip
            return {"id": "x", "object": "chat.completion", "created": 0, "model": "hostile", "choices": [choice]}

        self.server = ThreadServer(app)


def test_hostile_model_stays_within_the_listen_budget(tmp_path: Path, beeps_wav: Path) -> None:
    hostile = HostileModel()
    try:
        backend = OpenAIBackend("hostile", f"{hostile.server.url}/v1", options=OpenAIOptions(stream=False))
        cfg = AgentConfig(sampling=SamplingParams(max_new_tokens=64))
        app = create_app(backend, ServeConfig(model_name="hostile", data_dir=tmp_path, agent=cfg))
        with ThreadServer(app) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=SLOW)
            reply = client.chat.completions.create(
                model="echo-agent",
                messages=[{"role": "user", "content": [_wav_b64(beeps_wav), {"type": "text", "text": "?"}]}],
            )  # fmt: skip
        echo = (reply.choices[0].message.model_extra or {})["echo"]
        valid = [c for c in echo["listens"] if c["valid"]]
        # 8 audio inputs per question: the clip and 7 re-listens; then notes, until the call cap of 12.
        assert len(valid) == 7 and len(hostile.requests) == cfg.max_model_calls
        assert all("budget used up" in c["reason"] for c in echo["listens"][7:])
        assert echo["status"] == "no_answer" and reply.choices[0].message.content == ""
        last = hostile.requests[-1]["messages"]
        audio = [p for m in last if isinstance(m["content"], list) for p in m["content"] if p["type"] == "input_audio"]
        assert len(audio) == 8
    finally:
        hostile.server.stop()
