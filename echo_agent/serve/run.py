"""Run the server: bind first (port 0 picks a free port), print the address, then serve with uvicorn."""

from __future__ import annotations

import asyncio
import socket
import sys

from ..backends.base import ModelBackend
from ..errors import ConfigError
from .app import ServeConfig, create_app


async def serve(backend: ModelBackend, config: ServeConfig, host: str, port: int, log_level: str = "warning") -> None:
    import uvicorn

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
    app = create_app(backend, config)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    # Tests and scripts read this line to learn the port.
    print(f"echo-agent serve: listening on http://{shown}:{bound} (models: {config.model_name}, "
          f"{config.agent_name}; chat threads in {config.db_path})", flush=True)  # fmt: skip
    sys.stdout.flush()
    await server.serve(sockets=[sock])


def run(backend: ModelBackend, config: ServeConfig, host: str, port: int, log_level: str = "warning") -> None:
    asyncio.run(serve(backend, config, host, port, log_level))
