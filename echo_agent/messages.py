"""The conversation as it lives in graph state: text plus *references* to audio, never samples.

These are TypedDicts rather than pydantic models on purpose: graph state is checkpointed by
LangGraph's serializer, and plain JSON-shaped dicts round-trip through it (and through SQLite)
without any class allow-listing. Backends hydrate audio references just before a model call.
"""

from __future__ import annotations

from typing import Literal, NotRequired

from typing_extensions import TypedDict

Role = Literal["system", "user", "assistant", "tool"]
# Who produced a text part. Only "model" text was sampled, so only it is trained on (loss mask 1).
# "runtime" is structural text the runtime adds (a re-appended stop string, a retry nudge);
# "note" is a listen tool's note shown instead of audio.
Origin = Literal["model", "runtime", "user", "note"]


class TextPart(TypedDict):
    type: Literal["text"]
    text: str
    origin: Origin
    # Exactly the sampled token ids and their log-probs (token-in/token-out, design §6).
    token_ids: NotRequired[list[int]]
    logprobs: NotRequired[list[float]]
    # How many tokens the model sampled for this text when the ids are unknown (an API reported the count only).
    token_count: NotRequired[int]


class AudioPart(TypedDict):
    type: Literal["audio"]
    clip: str
    # None/None is the whole clip; otherwise the re-listened span in seconds of the original clip.
    start: float | None
    end: float | None


Part = TextPart | AudioPart


class ToolCall(TypedDict):
    id: str
    name: str
    arguments: str  # raw JSON text as the model wrote it; parsed (and validated) by the protocol


class Message(TypedDict):
    role: Role
    content: list[Part]
    tool_calls: NotRequired[list[ToolCall]]
    tool_call_id: NotRequired[str]


def text_part(text: str, origin: Origin = "user") -> TextPart:
    return {"type": "text", "text": text, "origin": origin}


def audio_part(clip: str, start: float | None = None, end: float | None = None) -> AudioPart:
    return {"type": "audio", "clip": clip, "start": start, "end": end}


def message(role: Role, *parts: Part) -> Message:
    return {"role": role, "content": list(parts)}


def message_text(msg: Message, audio_marker: str = "") -> str:
    """The message's text with each audio part replaced by `audio_marker` (default: removed)."""
    out: list[str] = []
    for part in msg["content"]:
        if part["type"] == "text":
            out.append(part["text"])
        else:
            out.append(audio_marker)
    return "".join(out)


def audio_parts(messages: list[Message]) -> list[AudioPart]:
    """All audio parts in conversation order: the order in which a backend must feed the audio."""
    return [p for m in messages for p in m["content"] if p["type"] == "audio"]
