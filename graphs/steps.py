"""The steps the Echo graph's nodes perform, as plain functions of state.

    open_question  -> (model_request -> backend.generate -> absorb_generation -> apply_listens)* -> judge

Each takes the state (a plain dict in `EchoState`'s shape) and returns the update its node merges. The nodes in
`echo.py` wrap them with the backend call and stream events; SFT's teacher forcing (gold text in place of the
model's output) and `bench/overhead.py`'s bare loop call the same functions, so there is one implementation of
what a question does to the conversation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..audio import AudioRef
from ..backends.base import Generation, GenerationRequest
from ..config import SEED_MIN, AgentConfig, SamplingParams
from ..errors import ConfigError
from ..messages import Message, Part, audio_part, text_part
from ..prompts import RETRY_NUDGE, format_question
from ..protocols import SEG_OPEN, ListenProtocol
from ..tools.listen import ListenOutcome, ListenRequest, ListenTool
from ..verifier import Verdict, verify

State = Mapping[str, Any]


def clip_refs(state: State) -> dict[str, AudioRef]:
    return {cid: AudioRef.model_validate(ref) for cid, ref in state["clips"].items()}


def response_text(conversation: list[Message], start: int) -> str:
    """The assistant's text from `start` on, audio and tool notes removed: what the verifier judges."""
    return "".join(
        part["text"]
        for msg in conversation[start:]
        if msg["role"] == "assistant"
        for part in msg["content"]
        if part["type"] == "text" and part["origin"] != "note"
    )


def generated_token_count(conversation: list[Message], start: int) -> int:
    """Tokens the model sampled in the assistant messages from `start` on (the ids, else the reported count)."""
    return sum(
        len(p["token_ids"]) if "token_ids" in p else p.get("token_count", 0)
        for m in conversation[start:]
        if m["role"] == "assistant"
        for p in m["content"]
        if p["type"] == "text" and p["origin"] == "model"
    )


def question_clip(question: str, clip_ids: Sequence[str]) -> str:
    """The clip a question is about, which a plain `<seg>START, END</seg>` then means: the first clip, unless the
    question names another by its id (as a word, any case: "Is the beep in clip2 higher?"); when it names
    several, the one named first. A clip loaded later (`/load`) is thus never the default by being newest, so a
    model that writes no prefix can always re-listen to the clip it was asked about."""
    named: list[tuple[int, str]] = []
    for cid in clip_ids[1:]:
        m = re.search(rf"(?<!\w){re.escape(cid)}(?!\w)", question, re.IGNORECASE)
        if m:
            named.append((m.start(), cid))
    return min(named)[1] if named else clip_ids[0]


def open_question(state: State) -> dict[str, Any]:
    """Add the user turn (with every clip not yet heard) and reset the per-question counters."""
    clips = clip_refs(state)
    if not clips:
        raise ConfigError("the graph input has no clips: load audio with AudioStore and pass its refs")
    introduced = list(state.get("introduced", []))
    new = [cid for cid in clips if cid not in introduced]
    active = state.get("active_clip") or question_clip(state["question"], [*introduced, *new])
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


def call_sampling(sampling: SamplingParams, model_calls: int) -> SamplingParams:
    """The sampling of one model call: a distinct, reproducible seed per call of a question (seed + i)."""
    if sampling.seed is None:
        return sampling
    # Wrapped into the signed 64-bit range, so a seed near its top still gives every call a valid seed.
    seed = (sampling.seed + model_calls - SEED_MIN) % 2**64 + SEED_MIN
    return sampling.model_copy(update={"seed": seed})


def model_request(
    state: State, config: AgentConfig, protocol: ListenProtocol, sampling: SamplingParams
) -> GenerationRequest:
    """The next generate call. Grounded and text modes never stop to listen; text mode also forbids the tags."""
    interleaved = config.mode == "interleaved"
    return GenerationRequest(
        messages=state["conversation"],
        continue_final=protocol.continues_turn(state["open_turn"]),
        stop=protocol.stop if interleaved else [],
        tools=protocol.tools if interleaved else None,
        suppress=[SEG_OPEN] if config.mode == "text" else [],
        sampling=call_sampling(sampling, state["model_calls"]),
    )


def absorb_generation(state: State, gen: Generation, protocol: ListenProtocol) -> dict[str, Any]:
    """Add one generation to the conversation and queue the listen requests it makes."""
    conversation, requests = protocol.absorb(state["conversation"], gen, state["open_turn"])
    return {
        "conversation": conversation,
        "pending": [r.model_dump() for r in requests],
        "open_turn": bool(requests) and protocol.continues_turn(True),
        "model_calls": state["model_calls"] + 1,
    }


def apply_listens(
    state: State, tool: ListenTool, protocol: ListenProtocol
) -> tuple[dict[str, Any], list[ListenOutcome]]:
    """Run the pending listen requests and deliver their slices (or notes) into the conversation."""
    clips = clip_refs(state)
    used = state["audios_used"]
    outcomes: list[ListenOutcome] = []
    for raw in state["pending"]:
        outcome = tool(ListenRequest.model_validate(raw), clips, used, default_clip=state.get("active_clip"))
        used += int(outcome.valid)
        outcomes.append(outcome)
    update = {
        "conversation": protocol.deliver(state["conversation"], outcomes),
        "pending": [],
        "audios_used": used,
        "listens": [*state["listens"], *(o.call.model_dump() for o in outcomes)],
    }
    return update, outcomes


def may_continue(state: State, config: AgentConfig) -> bool:
    """After a listen: another model call, unless the call cap is reached (then the answer is judged as is)."""
    return bool(state["model_calls"] < config.max_model_calls)


def judge(state: State, config: AgentConfig) -> tuple[dict[str, Any], Verdict]:
    """Verify the current attempt with the config's reward weights. A missing or malformed answer gets a nudge
    and another attempt while retries and model calls remain (status "retry"); else the verdict is final."""
    text = response_text(state["conversation"], state["attempt_start"])
    valid = sum(1 for call in state["listens"] if call["valid"])
    verdict = verify(
        text, state.get("choices") or [], state.get("gold"), valid, config.reward, state.get("answer_kind")
    )
    can_retry = state["retries"] < config.max_retries and state["model_calls"] < config.max_model_calls
    if verdict.retry_reason is not None and can_retry:
        nudge: Message = {"role": "user", "content": [text_part(RETRY_NUDGE[verdict.retry_reason], "runtime")]}
        conversation = [*state["conversation"], nudge]
        return {
            "conversation": conversation,
            "retries": state["retries"] + 1,
            "attempt_start": len(conversation),
            "open_turn": False,
            "status": "retry",
        }, verdict
    return {
        "generated_tokens": generated_token_count(state["conversation"], state["question_start"]),
        "answer": verdict.answer,
        "choice": verdict.choice,
        "verdict": verdict.model_dump(),
        "reasoning": text,
        "open_turn": False,
        "status": "answered" if verdict.answer is not None else "no_answer",
    }, verdict


def initial_state(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh (no chat history) state from a graph input, as LangGraph starts one: for loops outside the graph."""
    state: dict[str, Any] = dict(inputs)
    state.setdefault("conversation", [])
    state.setdefault("introduced", [])
    return state


__all__ = [
    "absorb_generation",
    "apply_listens",
    "call_sampling",
    "clip_refs",
    "generated_token_count",
    "initial_state",
    "judge",
    "may_continue",
    "model_request",
    "open_question",
    "question_clip",
    "response_text",
]
