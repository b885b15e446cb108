"""Run the server: bind first (port 0 picks a free port), print the address, then serve with uvicorn.

Connections are bounded too: a client must send its request headers within `--read-timeout` (uvicorn has no
header timeout of its own, so 300 slow-header connections would be held forever), idle keep-alive connections
close after 5 s, header blocks are capped at 64 KiB, and past `--max-connections` new requests get 503.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..backends.base import ModelBackend
from ..errors import ConfigError
from .app import ServeConfig, accepted_hosts, create_app

MAX_HEADER_BYTES = 64 * 1024


class _HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, from the moment the connection opens
    (or the previous response ends) until the request line and headers are in."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timeout: float | None = getattr(config, "header_timeout", None)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # waiting for the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if self._header_timeout is not None:
            self._deadline = self.loop.call_later(self._header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def _return_big_frees_to_the_os() -> None:
    """glibc raises its mmap threshold after each large free, so later 100 MB request buffers come from the heap and
    stay in the process after they are freed. A fixed 1 MiB threshold keeps every large buffer an mmap that is
    returned when freed (Linux/glibc only; elsewhere nothing changes)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class _Config(uvicorn.Config):
    header_timeout: float | None = None


def uvicorn_config(app: FastAPI, config: ServeConfig, max_connections: int = 512, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn settings of `serve` (also used by tests that run the app on a thread)."""
    cfg = _Config(
        app, http=_HeaderDeadline, timeout_keep_alive=5, limit_concurrency=max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=5, **kwargs,
    )  # fmt: skip
    cfg.header_timeout = config.read_timeout
    return cfg


async def serve(
    backend: ModelBackend, config: ServeConfig, host: str, port: int, log_level: str = "warning",
    max_connections: int = 512,
) -> None:  # fmt: skip
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections made from now on wait in the backlog until uvicorn accepts them
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    bound = sock.getsockname()[1]
    _return_big_frees_to_the_os()
    app = create_app(backend, config, bound_host=host)
    server = uvicorn.Server(uvicorn_config(app, config, max_connections, log_level=log_level))
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    # Tests and scripts read this line to learn the port.
    print(f"echo-agent serve: listening on http://{shown}:{bound} (models: {config.model_name}, "
          f"{config.agent_name}; threads in {config.db_path}; Host names: IP literals, "
          f"{', '.join(accepted_hosts(config, host))})", flush=True)  # fmt: skip
    sys.stdout.flush()
    await server.serve(sockets=[sock])


def run(
    backend: ModelBackend, config: ServeConfig, host: str, port: int, log_level: str = "warning",
    max_connections: int = 512,
) -> None:  # fmt: skip
    asyncio.run(serve(backend, config, host, port, log_level, max_connections))
