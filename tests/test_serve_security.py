"""`echo-agent serve` as a hostile client or web page sees it (issue 14, items 7-9): foreign Host names (DNS
rebinding) and cross-origin writes (CSRF) are refused, `chat`'s history is not served, threads are listed only with
the API key, `file://` reads give one answer for every refused path and cannot be redirected by a symlink race, and
concurrent uploads of one clip never collide. Real servers on loopback, real files, real SQLite.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import write_beeps
from pydantic import SecretStr
from served import CLI, SLOW, ServeProcess, ThreadServer, serve_env

from echo_agent.agent import load_backend
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.serve import ServeConfig, create_app

RAW = "tiny-random-qwen2-audio"
AGENT = AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=2, seed=0))


def clip_part(path: Path) -> dict[str, Any]:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def url_part(url: str) -> dict[str, Any]:
    return {"type": "audio_url", "audio_url": {"url": url}}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    return {
        "root": root, "allowed": allowed, "outside": outside,
        "inside": write_beeps(allowed / "in.wav", 1.0, [(0.2, 0.2)], seed=1),
        "secret": write_beeps(outside / "secret.wav", 3.0, [(1.0, 0.2)], seed=2),
    }  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, clips: dict[str, Path]) -> Iterator[ThreadServer]:
    cfg = ServeConfig(
        model_name=RAW, data_dir=tmp_path_factory.mktemp("sec"), agent=AGENT, allow_file_dirs=[clips["allowed"]],
        allowed_hosts=["echo.lan"], allowed_origins=["http://tools.lan:3000"],
    )  # fmt: skip
    with ThreadServer(create_app(load_backend(RAW), cfg), cfg) as s:
        s.config = cfg  # type: ignore[attr-defined]
        yield s


def raw_body(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    content = [*parts, {"type": "text", "text": "hi"}]
    return {"model": RAW, "messages": [{"role": "user", "content": content}], "max_tokens": 1, **extra}


# ---- 7: Host, Origin, content type ------------------------------------------------------------------


def test_foreign_host_names_are_refused(server: ThreadServer) -> None:
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example"):
        r = httpx.get(f"{server.url}/v1/models", headers={"Host": host})
        assert r.status_code == 403 and "--allowed-host" in r.json()["error"]["message"], (host, r.text)
        assert httpx.get(f"{server.url}/api/threads/x", headers={"Host": host}).status_code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "echo.lan", f"ECHO.LAN:{port}", "10.0.0.7"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": host}).status_code == 200, host


def test_cross_origin_and_form_posts_are_refused_and_store_nothing(server: ThreadServer, beeps_wav: Path) -> None:
    body = {"model": "echo-agent", "messages": [{"role": "user", "content": [clip_part(beeps_wav), {
        "type": "text", "text": "Planted?"}]}], "echo": {"thread_id": "planted"}}  # fmt: skip
    raw = json.dumps(body)
    same = server.url
    refused = {
        "foreign origin": ({"Origin": "http://evil.example", "Content-Type": "application/json"}, 403, "cross-origin"),
        "null origin": ({"Origin": "null", "Content-Type": "application/json"}, 403, "cross-origin"),
        "other local port": ({"Origin": "http://127.0.0.1:1", "Content-Type": "application/json"}, 403, "cross-origin"),
        "text/plain": ({"Content-Type": "text/plain"}, 415, "application/json"),
        "text/plain, same origin": ({"Origin": same, "Content-Type": "text/plain;charset=UTF-8"}, 415,
                                    "application/json"),
        "form": ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        "multipart": ({"Content-Type": "multipart/form-data; boundary=x"}, 415, "application/json"),
    }  # fmt: skip
    for name, (headers, status, message) in refused.items():
        r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers=headers, timeout=SLOW)
        assert r.status_code == status and message in r.json()["error"]["message"], (name, r.text)
    assert httpx.get(f"{server.url}/api/threads/planted").status_code == 404  # nothing was appended
    # The page's own origin, an --allowed-origin, and a client that sends no Content-Type or Origin at all may call.
    plain = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(raw_body(clip_part(beeps_wav))),
                       timeout=SLOW)  # fmt: skip
    assert "content-type" not in plain.request.headers and plain.status_code == 200, plain.text
    for origin in (same, "http://tools.lan:3000"):
        ok = httpx.post(f"{server.url}/v1/chat/completions", json=raw_body(clip_part(beeps_wav)),
                        headers={"Origin": origin}, timeout=SLOW)  # fmt: skip
        assert ok.status_code == 200, (origin, ok.text)


def test_thread_listing_needs_the_key_and_threads_open_by_id(server: ThreadServer, beeps_wav: Path) -> None:
    body = {"model": "echo-agent", "messages": [{"role": "user", "content": [clip_part(beeps_wav), {
        "type": "text", "text": "Mine?"}]}], "echo": {"thread_id": "0123456789abcdef0123456789abcdef"}}  # fmt: skip
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=SLOW).status_code == 200
    listed = httpx.get(f"{server.url}/api/threads")
    assert listed.status_code == 403 and "--auth-token-env" in listed.json()["error"]["message"]
    view = httpx.get(f"{server.url}/api/threads/0123456789abcdef0123456789abcdef")
    assert view.status_code == 200 and view.json()["turns"][0]["question"].startswith("Mine?")


def test_with_a_key_listing_and_reading_need_it(tmp_path: Path, beeps_wav: Path) -> None:
    cfg = ServeConfig(model_name=RAW, data_dir=tmp_path, agent=AGENT, api_token=SecretStr("k3y"))
    key = {"Authorization": "Bearer k3y"}
    with ThreadServer(create_app(load_backend(RAW), cfg), cfg) as s:
        body = {"model": "echo-agent", "messages": [{"role": "user", "content": [clip_part(beeps_wav), {
            "type": "text", "text": "Keyed?"}]}], "echo": {"thread_id": "keyed"}}  # fmt: skip
        assert httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=SLOW).status_code == 401
        assert httpx.post(f"{s.url}/v1/chat/completions", json=body, headers=key, timeout=SLOW).status_code == 200
        for path in ("/api/threads", "/api/threads/keyed"):
            assert httpx.get(f"{s.url}{path}").status_code == 401
            assert httpx.get(f"{s.url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(f"{s.url}{path}", headers=key).status_code == 200
        assert [t["thread_id"] for t in httpx.get(f"{s.url}/api/threads", headers=key).json()["threads"]] == ["keyed"]
        limits = httpx.get(f"{s.url}/api/limits")  # the page reads them before it has a key
        assert limits.status_code == 200 and limits.json()["thread_listing"] is True


def test_serve_does_not_serve_the_chat_history_by_default(tmp_path: Path, beeps_wav: Path) -> None:
    home = tmp_path / "home"
    env = serve_env(home)
    chat = subprocess.run(
        [*CLI, "chat", str(beeps_wav), "--model", RAW, "--max-new-tokens", "2"], input="Private?\n/quit\n",
        capture_output=True, text=True, env=env, timeout=SLOW, check=False,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    with sqlite3.connect(home / "chat.sqlite") as conn:
        (thread,) = {r[0] for r in conn.execute("SELECT thread_id FROM checkpoints")}
    proc = ServeProcess(["--model", RAW], env)
    try:
        assert f"threads in {home / 'serve' / 'threads.sqlite'}" in "".join(proc.lines)
        assert httpx.get(f"{proc.url}/api/threads/{thread}", timeout=SLOW).status_code == 404
        assert httpx.get(f"{proc.url}/api/threads", timeout=SLOW).status_code == 403
    finally:
        proc.stop()


# ---- 8: file:// -------------------------------------------------------------------------------------


def test_every_refused_file_url_gets_the_same_answer(server: ThreadServer, clips: dict[str, Path]) -> None:
    allowed, outside = clips["allowed"], clips["outside"]
    (allowed / "link-out.wav").symlink_to(clips["secret"])
    (allowed / "dir").mkdir()
    os.mkfifo(allowed / "fifo.wav")
    refused = {
        "outside, exists": f"file://{clips['secret']}",
        "outside, missing": f"file://{outside / 'missing.wav'}",
        "dot-dot out": f"file://{allowed}/../outside/secret.wav",
        "symlink out": f"file://{allowed / 'link-out.wav'}",
        "inside, missing": f"file://{allowed / 'missing.wav'}",
        "a directory": f"file://{allowed / 'dir'}",
        "a fifo": f"file://{allowed / 'fifo.wav'}",
        "NUL byte": f"file://{allowed}/in.wav%00.txt",
        "relative": "file:in.wav",
        "other host": f"file://example.com{clips['inside']}",
    }
    answers = set()
    for name, url in refused.items():
        r = httpx.post(f"{server.url}/v1/chat/completions", json=raw_body(url_part(url)), timeout=SLOW)
        error = r.json()["error"]
        assert r.status_code == 403 and "--allow-file-dir" in error["message"], (name, r.text)
        # The same answer, whatever the path: only the path the client sent is echoed back.
        path = error["message"].split(": not a readable file, or outside")[0]
        answers.add((r.status_code, error["type"], error["message"].replace(path, "PATH")))
    assert len(answers) == 1, answers
    ok = httpx.post(f"{server.url}/v1/chat/completions", json=raw_body(url_part(f"file://{clips['inside']}")),
                    timeout=SLOW)  # fmt: skip
    assert ok.status_code == 200, ok.text


def test_a_symlink_swapped_in_never_redirects_a_read(
    server: ThreadServer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """A directory inside the allowed one is swapped for a symlink to an outside directory holding a file of the
    same name, and back, as fast as possible, while requests read it (a check of the resolved path, then an open of
    it, lost this race). The 1 s inside clip and the 3 s outside one differ in prompt length, so each answer says
    which file was read."""
    allowed = clips["allowed"]
    target, hold = allowed / "swap", allowed / "swap-hold"
    target.mkdir()
    shutil.copy(clips["inside"], target / "x.wav")
    shutil.copy(clips["secret"], clips["outside"] / "x.wav")
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            os.rename(target, hold)  # the real directory steps aside,
            os.symlink(clips["outside"], target)  # a symlink out takes its name,
            time.sleep(0.001)
            os.unlink(target)
            os.rename(hold, target)  # and the real one comes back
            time.sleep(0.001)

    def length(url: str) -> int:
        body = raw_body(url_part(url), return_token_ids=True)
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=SLOW)
        return len(r.json()["prompt_token_ids"]) if r.status_code == 200 else -r.status_code

    inside_len = length(f"file://{target / 'x.wav'}")
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()

    async def many() -> list[int]:
        async with httpx.AsyncClient(timeout=SLOW) as c:

            async def one() -> int:
                r = await c.post(f"{server.url}/v1/chat/completions", json=raw_body(
                    url_part(f"file://{target}/x.wav"), return_token_ids=True))  # fmt: skip
                return len(r.json()["prompt_token_ids"]) if r.status_code == 200 else -r.status_code

            return list(await asyncio.gather(*(one() for _ in range(150))))

    try:
        results = asyncio.run(many())
    finally:
        stop.set()
        thread.join(timeout=10)
    assert set(results) <= {inside_len, -403}, set(results)  # never the outside file's length
    assert inside_len in results and -403 in results  # the race really ran both ways


# ---- 9: concurrent uploads ------------------------------------------------------------------------------


def test_concurrent_uploads_of_one_new_clip_never_collide(tmp_path: Path) -> None:
    clip = write_beeps(tmp_path / "new.wav", 4.0, [(1.0, 0.2)], seed=7)
    cfg = ServeConfig(model_name=RAW, data_dir=tmp_path / "data", agent=AGENT)
    body = {"model": "echo-agent", "messages": [{"role": "user", "content": [clip_part(clip), {
        "type": "text", "text": "Beeps?"}]}], "max_tokens": 1}  # fmt: skip
    with ThreadServer(create_app(load_backend(RAW), cfg), cfg) as s:

        async def many() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=SLOW) as c:
                return list(await asyncio.gather(*(c.post(f"{s.url}/v1/chat/completions", json=body)
                                                   for _ in range(64))))  # fmt: skip

        replies = asyncio.run(many())
    assert [r.status_code for r in replies] == [200] * 64, {r.text[:200] for r in replies if r.status_code != 200}
    shas = {r.json()["choices"][0]["message"]["echo"]["clips"]["main"]["sha256"] for r in replies}
    assert len(shas) == 1
    assert [p.name for p in (tmp_path / "data" / "uploads").iterdir()] == [shas.pop()]  # no temporary left
