"""The graph factory that `langgraph dev` / LangGraph Server loads (see `langgraph.json` at the repo root).

The model comes from the environment: `ECHO_MODEL` (default: `echo-tiny`, the shipped model; a model
directory, or `openai:MODEL@http://HOST:PORT/v1` for a vLLM server) and, optionally, `ECHO_BASE_URL`.
LangGraph Server supplies its own checkpointer. The graph's input is `{"clips": {"main": AudioRef},
"question": ..., "choices": [...]}`, where an AudioRef names a file the server can read: build one
with `AudioStore().load(path).model_dump()`.
"""

from __future__ import annotations

import os

from langchain_core.runnables import RunnableConfig

from echo_agent.agent import load_backend
from echo_agent.audio import AudioStore
from echo_agent.backends.base import ModelBackend
from echo_agent.graphs import build_echo_graph
from echo_agent.graphs.echo import EchoGraph

_backend: ModelBackend | None = None


def make_graph(config: RunnableConfig | None = None) -> EchoGraph:
    """A compiled Echo graph. The backend is loaded once per process and shared by every graph built."""
    global _backend
    if _backend is None:
        _backend = load_backend(os.environ.get("ECHO_MODEL") or None, base_url=os.environ.get("ECHO_BASE_URL") or None)
    return build_echo_graph(_backend, AudioStore())
