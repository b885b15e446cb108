"""The Echo agent as a LangGraph state machine.

    START -> prepare -> model --(listen requests)--> listen -> model ...
                        model --(no request)--> verifier --(fixable, retries left)--> model
                                                verifier --(done)--> END

Nodes are small closures over their dependencies (backend, audio store, listen tool, config), like
LangGraph's own `ToolNode`, so the compiled graph is self-contained and can be dropped into a
user's graph as a subgraph. Routing functions are pure functions of state. The graph caps model
calls, listens and retries itself; it never relies on LangGraph's (now ~10k) recursion limit.
"""

from __future__ import annotations

from typing import Any, Literal

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.config import get_stream_writer
from langgraph.graph import START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from ..audio import AudioRef, AudioStore
from ..backends.base import AudioResolver, GenerationRequest, ModelBackend
from ..config import AgentConfig
from ..errors import ConfigError
from ..messages import Message, Part, audio_part, text_part
from ..prompts import RETRY_NUDGE, format_question
from ..protocols import SEG_OPEN, make_protocol
from ..tools.listen import ListenOutcome, ListenRequest, ListenTool
from ..verifier import verify
from .state import EchoInput, EchoOutput, EchoState

EchoGraph = CompiledStateGraph[EchoState, None, EchoInput, EchoOutput]


def response_text(conversation: list[Message], start: int) -> str:
    """The assistant's text from `start` on, audio and tool notes removed: what the verifier judges."""
    out: list[str] = []
    for msg in conversation[start:]:
        if msg["role"] != "assistant":
            continue
        for part in msg["content"]:
            if part["type"] == "text" and part["origin"] != "note":
                out.append(part["text"])
    return "".join(out)


def generated_token_count(conversation: list[Message], start: int) -> int:
    """Tokens the model sampled in the assistant messages from `start` on."""
    return sum(
        len(p.get("token_ids", []))
        for m in conversation[start:]
        if m["role"] == "assistant"
        for p in m["content"]
        if p["type"] == "text" and p["origin"] == "model"
    )


# ---- routing: pure functions of state --------------------------------------------------------


def route_after_model(state: EchoState) -> Literal["listen", "verifier"]:
    return "listen" if state["pending"] else "verifier"


def make_route_after_listen(max_model_calls: int) -> Any:
    def route_after_listen(state: EchoState) -> Literal["model", "verifier"]:
        # A model that only ever asks to listen is stopped by the call cap, then judged as is.
        return "model" if state["model_calls"] < max_model_calls else "verifier"

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
    full_state: bool = False,
) -> EchoGraph:
    cfg = config or AgentConfig()
    protocol = make_protocol(cfg.protocol)
    tool = ListenTool(cfg.listen)

    def clip_refs(state: EchoState) -> dict[str, AudioRef]:
        return {cid: AudioRef.model_validate(ref) for cid, ref in state["clips"].items()}

    def prepare(state: EchoState) -> dict[str, Any]:
        """Open a question: add the user turn (with any clip not yet heard) and reset per-question counters."""
        clips = clip_refs(state)
        if not clips:
            raise ConfigError("the graph input has no clips: load audio with AudioStore and pass its refs")
        introduced = list(state.get("introduced", []))
        new = [cid for cid in clips if cid not in introduced]
        active = state.get("active_clip") or (new[-1] if new else introduced[-1])
        if active not in clips:
            raise ConfigError(f"active_clip {active!r} is not a loaded clip ({', '.join(clips)})")
        parts: list[Part] = [audio_part(cid) for cid in new]
        durations = {cid: ref.duration for cid, ref in clips.items()}
        parts.append(text_part(format_question(state["question"], state.get("choices"), durations, active)))
        conversation = [*state.get("conversation", []), {"role": "user", "content": parts}]
        return {
            "conversation": conversation,
            "introduced": introduced + new,
            "active_clip": active,
            "open_turn": False,
            "pending": [],
            "listens": [],
            "audios_used": max(1, len(new)),
            "model_calls": 0,
            "retries": 0,
            "attempt_start": len(conversation),
            "question_start": len(conversation),
            "generated_tokens": 0,
            "answer": None,
            "choice": None,
            "verdict": None,
            "reasoning": "",
            "status": "running",
        }

    async def model(state: EchoState) -> dict[str, Any]:
        writer = get_stream_writer()
        sampling = cfg.sampling
        seed = state.get("seed")
        if seed is None:
            seed = sampling.seed
        if seed is not None:  # a distinct, reproducible seed for every call of a question
            sampling = sampling.model_copy(update={"seed": seed + state["model_calls"]})
        request = GenerationRequest(
            messages=state["conversation"],
            continue_final=protocol.continues_turn(state["open_turn"]),
            # Grounded and text modes never stop to listen; text mode also forbids the tags.
            stop=protocol.stop if cfg.mode == "interleaved" else [],
            tools=protocol.tools if cfg.mode == "interleaved" else None,
            suppress=[SEG_OPEN] if cfg.mode == "text" else [],
            sampling=sampling,
        )
        gen = await backend.generate(
            request,
            AudioResolver(store, clip_refs(state)),
            on_delta=lambda d: writer({"type": "text", "delta": d}),
        )
        conversation, requests = protocol.absorb(state["conversation"], gen, state["open_turn"])
        return {
            "conversation": conversation,
            "pending": [r.model_dump() for r in requests],
            "open_turn": bool(requests) and protocol.continues_turn(True),
            "model_calls": state["model_calls"] + 1,
        }

    def listen(state: EchoState) -> dict[str, Any]:
        writer = get_stream_writer()
        clips = clip_refs(state)
        used = state["audios_used"]
        outcomes: list[ListenOutcome] = []
        for raw in state["pending"]:
            outcome = tool(ListenRequest.model_validate(raw), clips, used, default_clip=state.get("active_clip"))
            used += int(outcome.valid)
            outcomes.append(outcome)
            writer({"type": "listen", "call": outcome.call.model_dump()})
        return {
            "conversation": protocol.deliver(state["conversation"], outcomes),
            "pending": [],
            "audios_used": used,
            "listens": [*state["listens"], *(o.call.model_dump() for o in outcomes)],
        }

    def verifier(state: EchoState) -> dict[str, Any]:
        writer = get_stream_writer()
        text = response_text(state["conversation"], state["attempt_start"])
        valid = sum(1 for call in state["listens"] if call["valid"])
        verdict = verify(text, state.get("choices") or [], state.get("gold"), valid)
        can_retry = state["retries"] < cfg.max_retries and state["model_calls"] < cfg.max_model_calls
        if verdict.retry_reason is not None and can_retry:
            nudge: Message = {
                "role": "user",
                "content": [text_part(RETRY_NUDGE[verdict.retry_reason], "runtime")],
            }
            conversation = [*state["conversation"], nudge]
            writer({"type": "retry", "reason": verdict.retry_reason})
            return {
                "conversation": conversation,
                "retries": state["retries"] + 1,
                "attempt_start": len(conversation),
                "open_turn": False,
                "status": "retry",
            }
        writer({"type": "verdict", "verdict": verdict.model_dump()})
        return {
            "generated_tokens": generated_token_count(state["conversation"], state["question_start"]),
            "answer": verdict.answer,
            "choice": verdict.choice,
            "verdict": verdict.model_dump(),
            "reasoning": text,
            "open_turn": False,
            "status": "answered" if verdict.answer is not None else "no_answer",
        }

    # Trainers and collectors need the whole trajectory (`conversation`, token ids, log-probs), so they
    # may ask for the full state as output; callers composing the graph get the narrow `EchoOutput`.
    graph = StateGraph(EchoState, input_schema=EchoInput, output_schema=EchoState if full_state else EchoOutput)
    graph.add_node("prepare", prepare)
    graph.add_node("model", model)
    graph.add_node("listen", listen)
    graph.add_node("verifier", verifier)
    graph.add_edge(START, "prepare")
    graph.add_edge("prepare", "model")
    graph.add_conditional_edges("model", route_after_model)
    graph.add_conditional_edges("listen", make_route_after_listen(cfg.max_model_calls))
    graph.add_conditional_edges("verifier", route_after_verifier)
    return graph.compile(checkpointer=checkpointer, name=name)
