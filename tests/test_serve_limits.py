"""`echo-agent serve` under load and abuse (issue 14): every request is bounded in prompt, time and storage, a
failed request leaves nothing in its thread, and every client mistake is a clear 4xx (a stream ends with an error
event and `[DONE]`). Real servers on loopback, a real tiny model, real WAV files and real SQLite.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import write_beeps
from served import SLOW, Recording, ThreadServer

from echo_agent.agent import load_backend
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.serve import ServeConfig, create_app
from echo_agent.serve.app import default_request_bytes

RAW = "tiny-random-qwen2-audio"
JSON = {"Content-Type": "application/json"}


def clip_part(path: Path) -> dict[str, Any]:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"},
    }


def agent_body(question: str, clip: Path | None = None, **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [clip_part(clip)] if clip else []
    content.append({"type": "text", "text": question})
    return {"model": "echo-agent", "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def events(resp: httpx.Response) -> list[Any]:
    blocks = [b for b in resp.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]", resp.text[-500:]
    return [json.loads(b[6:]) for b in blocks[:-1]]


def thread_rows(db: Path, thread: str) -> tuple[int, int]:
    """(checkpoints, writes) of a thread; a database nothing was ever written to has none."""
    with sqlite3.connect(db) as conn:
        if not conn.execute("SELECT name FROM sqlite_master WHERE name = 'checkpoints'").fetchall():
            return 0, 0
        cps = conn.execute("SELECT count(*) FROM checkpoints WHERE thread_id = ?", (thread,)).fetchone()[0]
        writes = conn.execute("SELECT count(*) FROM writes WHERE thread_id = ?", (thread,)).fetchone()[0]
    return int(cps), int(writes)


def config(tmp: Path, **kw: Any) -> ServeConfig:
    agent = AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=2, seed=0))
    return ServeConfig(model_name=RAW, data_dir=tmp, agent=agent, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    cfg = config(tmp_path_factory.mktemp("limits"), max_prompt_tokens=1024, max_tokens=64)
    with ThreadServer(create_app(load_backend(RAW), cfg), cfg) as s:
        s.config = cfg  # type: ignore[attr-defined]
        yield s


def post(server: ThreadServer, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=kw.pop("timeout", SLOW), **kw)


# ---- 2: prompt tokens ---------------------------------------------------------------------------


def test_long_prompts_are_refused_before_the_model_runs(server: ThreadServer, beeps_wav: Path) -> None:
    huge = "why " * 15000  # 60,000 characters
    cases = {
        "question": agent_body(huge, beeps_wav, echo={"thread_id": "long-q"}),
        "streamed question": agent_body(huge, beeps_wav, stream=True, echo={"thread_id": "long-s"}),
        "choice": agent_body("Which?", beeps_wav, echo={"choices": ["a", huge], "thread_id": "long-c"}),
        "raw prompt": {"model": RAW, "messages": [{"role": "user", "content": huge}], "max_tokens": 1},
        "raw stream": {"model": RAW, "messages": [{"role": "user", "content": huge}], "max_tokens": 1, "stream": True},
    }
    for name, body in cases.items():
        r = post(server, body)
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", (name, r.text[:300])
        assert "--max-prompt-tokens" in r.json()["error"]["message"], name
    db = server.config.db_path  # type: ignore[attr-defined]
    for thread in ("long-q", "long-s", "long-c"):  # refused before anything was stored
        assert thread_rows(db, thread) == (0, 0)


def test_a_thread_is_bounded_by_the_prompt_limit(tmp_path: Path, beeps_wav: Path) -> None:
    cfg = config(tmp_path, max_prompt_tokens=700)
    with ThreadServer(create_app(load_backend(RAW), cfg), cfg) as s:
        refused = None
        for i in range(12):
            r = post(s, agent_body(f"Question number {i}, about the beeps?", beeps_wav if i == 0 else None,
                                   echo={"thread_id": "grows"}))  # fmt: skip
            if r.status_code != 200:
                refused = (i, r)
                break
        assert refused is not None, "the thread never reached the prompt limit"
        i, r = refused
        assert i >= 1 and r.status_code == 400 and "--max-prompt-tokens" in r.json()["error"]["message"], r.text
        view = httpx.get(f"{s.url}/api/threads/grows").json()
        assert len(view["turns"]) == i  # the refused question left nothing behind


# ---- 2, 3: time, cancellation and rollback --------------------------------------------------------


def recorded(tmp: Path, **kw: Any) -> ThreadServer:
    """A server over the real tiny model, recorded to count its model calls (unbatched: one call at a time)."""
    cfg = config(tmp, max_tokens=4096, **kw)
    rec = Recording(load_backend(RAW))
    s = ThreadServer(create_app(rec, cfg), cfg)
    s.rec, s.config = rec, cfg  # type: ignore[attr-defined]
    return s


def no_more_calls(s: ThreadServer, since: int, cancelled: int) -> None:
    """The graphs that were cancelled asked the model nothing more, and their calls in flight were abandoned. A
    probe queues behind the model calls still running (the local model takes one at a time), so once it is
    answered, every call has ended: the only call since is the probe, and the cancelled ones never returned."""
    rec: Recording = s.rec  # type: ignore[attr-defined]
    probe = post(s, {"model": RAW, "messages": [{"role": "user", "content": "probe"}], "max_tokens": 1})
    assert probe.status_code == 200, probe.text
    time.sleep(1.0)
    assert len(rec.requests) == since + 1  # the probe's
    assert len(rec.requests) - len(rec.gens) == cancelled


def test_a_request_past_its_time_gets_504_and_its_question_is_undone(tmp_path: Path, beeps_wav: Path) -> None:
    """Behind the continuous batch (serve's default): the request gets 504, its model call stops (its row leaves the
    batch instead of decoding its 4000 tokens) and its question leaves nothing in the thread."""
    from echo_agent.backends.batching import BatchingBackend

    batcher = BatchingBackend(load_backend(RAW))  # type: ignore[arg-type]
    # 4000 tokens of the tiny model take ~3 s on a quiet 2-core machine (0.75 ms a step): the limit must be well
    # under that, or a fast machine answers in time (it did at 3 s), yet leave room for the first short question.
    cfg = config(tmp_path, max_request_seconds=1.5, max_tokens=4096)
    with ThreadServer(create_app(batcher, cfg), cfg) as s:
        first = post(s, agent_body("First?", beeps_wav, echo={"thread_id": "timed"}))
        assert first.status_code == 200, first.text
        before = thread_rows(cfg.db_path, "timed")
        slow = [
            agent_body("Second?", echo={"thread_id": "timed"}, max_tokens=4000),
            {"model": RAW, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "temperature": 0},
            agent_body("Third?", echo={"thread_id": "timed"}, max_tokens=4000, stream=True),
        ]
        for body in slow:
            r = post(s, body)
            if body.get("stream"):
                error = events(r)[-1]["error"]
                assert error["code"] == 504 and "--max-request-seconds" in error["message"], error
            else:
                assert r.status_code == 504 and "--max-request-seconds" in r.json()["error"]["message"], r.text
            time.sleep(1.0)
            steps = len(batcher.batch_sizes)
            time.sleep(3.0)
            assert len(batcher.batch_sizes) == steps  # the decoder went idle: no row is left decoding
        assert thread_rows(cfg.db_path, "timed") == before  # the failed questions were rolled back
        view = httpx.get(f"{s.url}/api/threads/timed").json()
        assert [t["question"] for t in view["turns"]] == ["First?"]


def test_a_client_that_leaves_cancels_its_question(tmp_path: Path, beeps_wav: Path) -> None:
    with recorded(tmp_path) as s:  # the request limit (300 s) plays no part here
        rec: Recording = s.rec  # type: ignore[attr-defined]
        db = s.config.db_path  # type: ignore[attr-defined]
        body = agent_body("Gone?", beeps_wav, echo={"thread_id": "left"}, max_tokens=4000)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s
            httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(SLOW, read=1.0))
        time.sleep(1.0)  # the server notices the disconnect
        no_more_calls(s, len(rec.requests), cancelled=1)
        assert thread_rows(db, "left") == (0, 0)  # a new thread whose first question was abandoned: gone
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=SLOW) as r:  # fmt: skip
            for line in r.iter_lines():  # the client leaves once the model is generating
                if "reasoning_content" in line:
                    break
        time.sleep(1.0)
        no_more_calls(s, len(rec.requests), cancelled=2)
        assert thread_rows(db, "left") == (0, 0)


# ---- 3: failures and storage ----------------------------------------------------------------------


def test_failed_requests_do_not_grow_the_database(tmp_path: Path, beeps_wav: Path) -> None:
    """Every request fails in the backend (nothing listens on port 1): 40 of them leave the database as it was."""
    from echo_agent.backends.openai import OpenAIOptions

    dead = load_backend("openai:m@http://127.0.0.1:1/v1", openai_options=OpenAIOptions(max_attempts=1, timeout=5))
    cfg = ServeConfig(model_name="m", data_dir=tmp_path)
    with ThreadServer(create_app(dead, cfg), cfg) as s:
        sizes = []
        for i in range(40):
            r = post(s, agent_body("x" * 3000, beeps_wav, echo={"thread_id": f"t{i % 4}"}))
            assert r.status_code == 502 and "127.0.0.1:1" in r.json()["error"]["message"], r.text
            sizes.append(sum(thread_rows(cfg.db_path, f"t{k}")[0] for k in range(4)))
        streamed = events(post(s, agent_body("Streamed?", beeps_wav, stream=True, echo={"thread_id": "t0"})))
        assert streamed[-1]["error"]["code"] == 502
        assert set(sizes) == {0} and thread_rows(cfg.db_path, "t0") == (0, 0)
        with sqlite3.connect(cfg.db_path) as conn:
            assert conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 0


def test_uploads_stop_at_the_storage_quota(tmp_path: Path) -> None:
    a = write_beeps(tmp_path / "a.wav", 6.0, [(1.0, 0.2)], seed=1)
    b = write_beeps(tmp_path / "b.wav", 6.0, [(2.0, 0.2)], seed=2)
    cfg = config(tmp_path / "data", max_storage_bytes=a.stat().st_size + 150_000)
    with ThreadServer(create_app(load_backend(RAW), cfg), cfg) as s:
        assert post(s, agent_body("A?", a)).status_code == 200
        assert post(s, agent_body("A again?", a)).status_code == 200  # already kept: costs nothing
        r = post(s, agent_body("B?", b))
        assert r.status_code == 507 and "--max-storage-mb" in r.json()["error"]["message"], r.text
        uploads = sorted(p.name for p in (tmp_path / "data" / "uploads").iterdir())
        assert len(uploads) == 1 and not uploads[0].endswith(".part")
        # The raw model's uploads live only for their request.
        raw = {"model": RAW, "messages": [{"role": "user", "content": [clip_part(b)]}], "max_tokens": 1}
        assert post(s, raw).status_code == 200
        # Refused requests leave none of their decoded uploads behind either: an unknown model, audio that does
        # not decode (both bodies hold a base64 string long enough to be decoded into a scratch file first).
        assert post(s, {**raw, "model": "nope"}).status_code == 404
        junk = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"\0garbage" * 20000).decode()}}
        r = post(s, {**raw, "messages": [{"role": "user", "content": [junk]}]})
        assert r.status_code == 400 and "uploaded audio: cannot decode" in r.json()["error"]["message"], r.text
        assert list((tmp_path / "data" / "scratch").iterdir()) == []


# ---- 10 and 16: clear 400s ---------------------------------------------------------------------------


def test_client_mistakes_are_clear_400s(server: ThreadServer, beeps_wav: Path) -> None:
    user = {"role": "user", "content": "hi"}
    bad = {
        "seed over 64 bits": ({"model": RAW, "messages": [user], "seed": 2**64}, "seed"),
        "seed under 64 bits": ({"model": RAW, "messages": [user], "seed": -(2**63) - 1}, "seed"),
        "tool_calls a string": (
            {"model": RAW, "messages": [user, {"role": "assistant", "content": "", "tool_calls": "x"}]}, "tool_calls"),
        "tool_calls of numbers": (
            {"model": RAW, "messages": [user, {"role": "assistant", "content": "", "tool_calls": [1]}]}, "tool_calls"),
        "tool-call arguments an object": (
            {"model": RAW, "messages": [user, {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "listen", "arguments": {"start": 1}}}]}]},
            "arguments must be a string"),
        "audio token in text": ({"model": RAW, "messages": [{"role": "user", "content": "hi <|AUDIO|> there"}]},
                                "special token '<|AUDIO|>'"),
        "placeholder in agent text": (agent_body("<|audio_bos|><|AUDIO|><|audio_eos|> beeps?", beeps_wav),
                                      "special token"),
        "end of turn in text": ({"model": RAW, "messages": [{"role": "user", "content": "a<|im_end|>b"}]},
                                "special token"),
        "audio in a tool message": (
            {"model": RAW, "messages": [user, {"role": "tool", "tool_call_id": "c",
                                                "content": [clip_part(beeps_wav)]}]},
            "tool messages cannot carry audio"),
        "n > 1": ({"model": RAW, "messages": [user], "n": 2}, "n=2 is not supported"),
        "a lone continued turn": ({"model": RAW, "messages": [{"role": "assistant", "content": "a"}],
                                   "continue_final_message": True, "add_generation_prompt": False}, "a message before"),
        "not JSON": (None, "not JSON"),
        "max_tokens over the cap": ({"model": RAW, "messages": [user], "max_tokens": 65}, "--max-tokens"),
        "special token in a choice": (agent_body("Which?", beeps_wav, echo={"choices": ["<|im_start|>", "b"]}),
                                      "special token"),
    }  # fmt: skip
    for name, (body, message) in bad.items():
        for stream in (False, True):
            if body is None:
                broken = b'{"model": "x", "stream": %s, "messages": [}' % str(stream).lower().encode()
                r = httpx.post(f"{server.url}/v1/chat/completions", content=broken, headers=JSON, timeout=SLOW)
            else:
                r = post(server, {**body, "stream": stream})
            assert r.status_code == 400 and message in r.json()["error"]["message"], (name, stream, r.text[:300])
            assert set(r.json()["error"]) >= {"message", "type", "code"}
    ok = post(server, {"model": RAW, "messages": [user], "n": 1, "seed": 2**63 - 1, "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_usage_reports_real_prompt_tokens(tmp_path: Path, beeps_wav: Path) -> None:
    rec = Recording(load_backend(RAW))
    cfg = config(tmp_path)
    with ThreadServer(create_app(rec, cfg), cfg) as s:
        raw = post(s, {"model": RAW, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                       "return_token_ids": True}).json()  # fmt: skip
        assert raw["usage"]["prompt_tokens"] == len(raw["prompt_token_ids"]) > 0
        before = len(rec.gens)
        reply = post(s, agent_body("Beeps? [1 | 2]", beeps_wav)).json()
        calls = rec.gens[before:]
        assert reply["usage"]["prompt_tokens"] == sum(len(g.prompt_ids or []) for g in calls) > 0
        assert reply["usage"]["completion_tokens"] == reply["choices"][0]["message"]["echo"]["generated_tokens"]
        streamed = events(post(s, agent_body("Beeps? [1 | 2]", beeps_wav, stream=True)))
        assert streamed[-1]["usage"]["prompt_tokens"] == reply["usage"]["prompt_tokens"]


# ---- 14: limits that agree --------------------------------------------------------------------------


def test_the_default_body_limit_admits_every_clip_within_the_duration_limit() -> None:
    limit = default_request_bytes(600.0)
    b64 = lambda n: 4 * ((n + 2) // 3)  # noqa: E731
    assert b64(44 + 600 * 16000 * 2) < limit  # 10 minutes, 16 kHz mono, 16-bit
    assert b64(44 + 600 * 16000 * 4) < limit  # 10 minutes, 16 kHz mono, float
    assert b64(44 + 300 * 48000 * 2 * 2) < limit  # 5 minutes, 48 kHz stereo, 16-bit
    assert b64(44 + 600 * 48000 * 2 * 2) < limit  # 10 minutes, 48 kHz stereo, 16-bit
    assert limit < 160 * 1024 * 1024


def test_limits_agree_and_name_their_flags(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_audio_seconds=20.0)
    t = np.arange(20 * 48000) / 48000
    stereo = (0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], axis=1)).astype(np.float32)
    fits = tmp_path / "fits.wav"
    sf.write(fits, stereo, 48000, subtype="PCM_16")
    too_long = tmp_path / "long.wav"
    sf.write(too_long, np.concatenate([stereo, stereo[:48000]]), 48000, subtype="PCM_16")
    with ThreadServer(create_app(load_backend(RAW), cfg), cfg) as s:
        limits = httpx.get(f"{s.url}/api/limits").json()
        assert limits["max_request_bytes"] == default_request_bytes(20.0) and limits["max_audio_seconds"] == 20.0
        raw = lambda p: {"model": RAW, "messages": [{"role": "user", "content": [clip_part(p)]}], "max_tokens": 1}  # noqa: E731
        assert post(s, raw(fits)).status_code == 200  # 20 s of 48 kHz stereo: within both limits
        r = post(s, raw(too_long))
        assert r.status_code == 400 and "--max-audio-seconds" in r.json()["error"]["message"], r.text
        big = httpx.post(f"{s.url}/v1/chat/completions", content=b" " * (limits["max_request_bytes"] + 1),
                         headers=JSON, timeout=SLOW)  # fmt: skip
        assert big.status_code == 413 and "--max-request-mb" in big.json()["error"]["message"]


# ---- 4: slow clients -------------------------------------------------------------------------------


async def _slow_headers(url: str, n: int) -> list[bool]:
    """`n` connections that send a request line, then one header byte a second for 20 s; True where the server
    hung up before that."""
    host, port = url.removeprefix("http://").split(":")

    async def one() -> bool:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            for _ in range(20):
                writer.write(b"x")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                        return True
                except TimeoutError:
                    continue
        except ConnectionError:
            return True
        finally:
            writer.close()
        return False

    return await asyncio.gather(*(one() for _ in range(n)))


def test_slow_clients_are_cut_off_and_uploads_are_capped(tmp_path: Path) -> None:
    cfg = config(tmp_path, read_timeout=2.0, max_concurrent_uploads=2)
    with ThreadServer(create_app(load_backend(RAW), cfg), cfg) as s:
        assert all(asyncio.run(_slow_headers(s.url, 100)))  # each was dropped at its 2 s header deadline

        finished: list[bool] = []

        async def uploads() -> tuple[list[int], int, int]:
            async def slow_body(i: int) -> int:
                async def trickle() -> Any:
                    yield b'{"model": "echo-agent", "messages": [{"role": "user", "content": "'
                    for _ in range(40):
                        await asyncio.sleep(0.5)
                        yield b"a" * 1024
                    finished.append(True)

                headers = {**JSON, "Content-Length": str(30 * 1024 * 1024)}
                async with httpx.AsyncClient(base_url=s.url, timeout=SLOW) as c:
                    try:
                        return (await c.post("/v1/chat/completions", content=trickle(), headers=headers)).status_code
                    except httpx.HTTPError:
                        return -1

            tasks = [asyncio.create_task(slow_body(i)) for i in range(2)]
            await asyncio.sleep(1.0)
            async with httpx.AsyncClient(base_url=s.url, timeout=SLOW) as c:
                third = await c.post("/v1/chat/completions", content=b"x" * (2 * 1024 * 1024), headers=JSON)
                small = await c.post("/v1/chat/completions", headers=JSON, json={
                    "model": RAW, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})  # fmt: skip
            return list(await asyncio.gather(*tasks)), third.status_code, small.status_code

        slow_codes, third, small = asyncio.run(uploads())
        assert third == 429 and small == 200
        # 1 KiB every 0.5 s is far under the 64 KiB/s a body must average: both are cut off (408, or the connection
        # closed under a client still sending) long before their 20 s of trickle are over.
        assert set(slow_codes) <= {408, -1} and finished == [], slow_codes
