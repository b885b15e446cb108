"""The graph factory that `langgraph dev` / LangGraph Server loads (see `langgraph.json` at the repo root).

The model comes from the environment: `ECHO_MODEL` (default: `echo-tiny`, the shipped model; a model
directory, or `openai:MODEL@http://HOST:PORT/v1` for a vLLM server) and, optionally, `ECHO_BASE_URL`.
LangGraph Server supplies its own checkpointer. The graph's input is `{"clips": {"main": AudioRef},
"question": ..., "choices": [...]}`, where an AudioRef names a file the server can read: build one
with `AudioStore().load(path).model_dump()`.

LangGraph Server calls the factory on its event loop, where `langgraph dev` refuses blocking calls (blockbuster's
`BlockingError`), and importing torch and reading the weights are blocking. So there the factory returns a
coroutine, which the server awaits, and the model loads in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any

from langchain_core.runnables import RunnableConfig

from echo_agent.agent import load_backend
from echo_agent.audio import AudioStore
from echo_agent.backends.base import ModelBackend
from echo_agent.graphs import build_echo_graph
from echo_agent.graphs.echo import EchoGraph

_backend: ModelBackend | None = None
_loading = threading.Lock()  # not an asyncio.Lock: the server runs event loops in more than one thread


def _load() -> ModelBackend:
    """The process's one backend, loaded on first use and shared by every graph built (blocking)."""
    global _backend
    with _loading:
        if _backend is None:
            _backend = load_backend(
                os.environ.get("ECHO_MODEL") or None, base_url=os.environ.get("ECHO_BASE_URL") or None
            )
        return _backend


async def _make_graph_off_loop() -> EchoGraph:
    backend = _backend if _backend is not None else await asyncio.to_thread(_load)
    return build_echo_graph(backend, AudioStore())


def make_graph(config: RunnableConfig | None = None) -> EchoGraph | Coroutine[Any, Any, EchoGraph]:
    """A compiled Echo graph. On a running event loop (LangGraph Server) this is a coroutine that loads the model
    in a worker thread, which the server awaits; with no loop running (a script) it is the graph itself."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return build_echo_graph(_load(), AudioStore())
    return _make_graph_off_loop()
