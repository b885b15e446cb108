"""Embed the Echo agent graph in your own LangGraph graph.

The compiled Echo graph is an ordinary node. Its input keys (`clips`, `question`, `choices`) and
output keys (`answer`, `choice`, `verdict`, `listens`, `reasoning`, `status`) are read from and
written to the parent's state by name; it never touches a parent's `messages`.

    python examples/subgraph.py clip.wav "How many beeps are there?" 2 3 4
    ECHO_MODEL=openai:Qwen/Qwen2-Audio-7B-Instruct@http://localhost:8000/v1 python examples/subgraph.py ...
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from typing_extensions import TypedDict

from echo_agent.audio import AudioStore
from echo_agent.backends.base import ModelBackend
from echo_agent.graphs import build_echo_graph


class Pipeline(TypedDict, total=False):
    audio_path: str  # the parent's own keys ...
    report: str
    clips: dict[str, dict[str, Any]]  # ... and the Echo graph's input/output keys
    question: str
    choices: list[str]
    gold: str | None
    answer: str | None
    choice: str | None
    verdict: dict[str, Any] | None
    listens: list[dict[str, Any]]
    reasoning: str
    status: str


def build_pipeline(backend: ModelBackend, store: AudioStore) -> CompiledStateGraph[Any, Any, Any, Any]:
    def load(state: Pipeline) -> dict[str, Any]:
        return {"clips": {"main": store.load(state["audio_path"]).model_dump()}, "gold": None}

    def report(state: Pipeline) -> dict[str, Any]:
        n = sum(1 for c in state.get("listens", []) if c["valid"])
        return {"report": f"answer={state.get('answer')} after {n} listen(s), status={state.get('status')}"}

    g = StateGraph(Pipeline)
    g.add_node("load", load)
    g.add_node("echo", build_echo_graph(backend, store))  # the compiled graph as a node
    g.add_node("report", report)
    g.add_edge(START, "load")
    g.add_edge("load", "echo")
    g.add_edge("echo", "report")
    g.add_edge("report", END)
    return g.compile()


async def _main(argv: list[str]) -> None:
    from echo_agent.agent import load_backend

    audio, question, *choices = argv
    pipeline = build_pipeline(load_backend(os.environ.get("ECHO_MODEL")), AudioStore())  # any backend, remote too
    out = await pipeline.ainvoke({"audio_path": audio, "question": question, "choices": choices})
    print(out["report"])


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
