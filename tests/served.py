"""Running `echo-agent serve` for tests: as a real subprocess (`ServeProcess`), or in this process on a
uvicorn thread (`ThreadServer`), both on loopback at a free port chosen by the OS."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from echo_agent.backends.base import Generation, GenerationRequest
from echo_agent.serve import ServeConfig
from echo_agent.serve.run import uvicorn_config

_SCRIPT = Path(sys.executable).with_name("echo-agent")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "echo_agent.cli"]
# Seconds. Generous: on a busy 2-core machine a niced test subprocess can be starved for minutes.
SLOW = 300.0
_LISTEN_RE = re.compile(r"listening on (http://\S+) ")


def serve_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ECHO_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(ECHO_AGENT_HOME=str(home), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


class ServeProcess:
    """`echo-agent serve --port 0 ARGS` in a subprocess; `url` is read from its first line of output."""

    def __init__(self, args: list[str], env: dict[str, str], timeout: float = SLOW) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        first: queue.Queue[str] = queue.Queue()

        def pump() -> None:  # keep draining, so the server never blocks on a full pipe
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if _LISTEN_RE.search(line):
                    first.put(line)
            first.put("")

        threading.Thread(target=pump, daemon=True).start()
        try:
            line = first.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise RuntimeError(
                f"echo-agent serve did not start in {timeout} s: {''.join(self.lines)[-2000:]}"
            ) from None
        m = _LISTEN_RE.search(line)
        if m is None:
            raise RuntimeError(f"echo-agent serve exited: {''.join(self.lines)[-2000:]}")
        self.url = m.group(1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class ThreadServer:
    """A FastAPI app served by uvicorn on a background thread (its own event loop), on loopback. With `config`, uvicorn
    runs with `echo-agent serve`'s own settings (header deadline, connection cap)."""

    def __init__(self, app: FastAPI, config: ServeConfig | None = None) -> None:
        if config is None:
            settings = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error")
        else:
            settings = uvicorn_config(app, config, host="127.0.0.1", port=0, log_level="error")
        self.server = uvicorn.Server(settings)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + SLOW
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Recording:
    """Wraps a real backend and records each request and generation (not a double: the model is real)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests: list[GenerationRequest] = []
        self.gens: list[Generation] = []

    @property
    def name(self) -> str:
        return str(self.inner.name)

    @property
    def sample_rate(self) -> int:
        return int(self.inner.sample_rate)

    async def generate(self, request: GenerationRequest, audio: Any, on_delta: Any = None) -> Generation:
        self.requests.append(request)
        gen: Generation = await self.inner.generate(request, audio, on_delta)
        self.gens.append(gen)
        return gen
