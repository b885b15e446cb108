"""The Echo agent as a LangGraph state machine.

    START -> prepare -> model --(listen requests)--> listen -> model ...
                        model --(no request)--> verifier --(fixable, retries left)--> model
                                                verifier --(done)--> END

Nodes are small closures over their dependencies (backend, audio store, listen tool, config), like
LangGraph's own `ToolNode`, and each wraps one plain step of `steps.py`, so the compiled graph is
self-contained and can be dropped into a user's graph as a subgraph. Routing functions are pure
functions of state. Sampling settings arrive per run (`context=EchoContext(sampling=...)`), so one
compiled graph serves every caller. The graph caps model calls, listens and retries itself; it never
relies on LangGraph's (now ~10k) recursion limit.
"""

from __future__ import annotations

from typing import Any, Literal

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.config import get_stream_writer
from langgraph.graph import START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from ..audio import AudioStore
from ..backends.base import AudioResolver, ModelBackend
from ..config import AgentConfig
from ..protocols import make_protocol
from ..tools.listen import ListenTool
from . import steps
from .state import EchoContext, EchoInput, EchoOutput, EchoState

EchoGraph = CompiledStateGraph[EchoState, EchoContext, EchoInput, EchoOutput]
response_text = steps.response_text  # the verifier's view of a conversation; re-exported for callers


# ---- routing: pure functions of state --------------------------------------------------------


def route_after_model(state: EchoState) -> Literal["listen", "verifier"]:
    return "listen" if state["pending"] else "verifier"


def make_route_after_listen(config: AgentConfig) -> Any:
    def route_after_listen(state: EchoState) -> Literal["model", "verifier"]:
        # A model that only ever asks to listen is stopped by the call cap, then judged as is.
        return "model" if steps.may_continue(state, config) else "verifier"

    return route_after_listen


def route_after_verifier(state: EchoState) -> Literal["model", "__end__"]:
    return "model" if state["status"] == "retry" else "__end__"


# ---- the graph --------------------------------------------------------------------------------


def build_echo_graph(
    backend: ModelBackend,
    store: AudioStore,
    config: AgentConfig | None = None,
    *,
    checkpointer: BaseCheckpointSaver[Any] | None = None,
    name: str = "echo_agent",
) -> EchoGraph:
    cfg = config or AgentConfig()
    protocol = make_protocol(cfg.protocol)
    tool = ListenTool(cfg.listen)

    def prepare(state: EchoState) -> dict[str, Any]:
        return steps.open_question(state)

    async def model(state: EchoState, runtime: Runtime[EchoContext]) -> dict[str, Any]:
        writer = get_stream_writer()
        context = runtime.context
        sampling = (context.sampling if context is not None else None) or cfg.sampling
        gen = await backend.generate(
            steps.model_request(state, cfg, protocol, sampling),
            AudioResolver(store, steps.clip_refs(state)),
            on_delta=lambda d: writer({"type": "text", "delta": d}),
        )
        return steps.absorb_generation(state, gen, protocol)

    def listen(state: EchoState) -> dict[str, Any]:
        writer = get_stream_writer()
        update, outcomes = steps.apply_listens(state, tool, protocol)
        for outcome in outcomes:
            writer({"type": "listen", "call": outcome.call.model_dump()})
        return update

    def verifier(state: EchoState) -> dict[str, Any]:
        writer = get_stream_writer()
        update, verdict = steps.judge(state, cfg)
        if update["status"] == "retry":
            writer({"type": "retry", "reason": verdict.retry_reason})
        else:
            writer({"type": "verdict", "verdict": update["verdict"]})
        return update

    graph = StateGraph(EchoState, context_schema=EchoContext, input_schema=EchoInput, output_schema=EchoOutput)
    graph.add_node("prepare", prepare)
    graph.add_node("model", model)
    graph.add_node("listen", listen)
    graph.add_node("verifier", verifier)
    graph.add_edge(START, "prepare")
    graph.add_edge("prepare", "model")
    graph.add_conditional_edges("model", route_after_model)
    graph.add_conditional_edges("listen", make_route_after_listen(cfg))
    graph.add_conditional_edges("verifier", route_after_verifier)
    return graph.compile(checkpointer=checkpointer, name=name)
