"""The model-backend contract: one async call that continues a conversation with audio.

A backend receives the conversation with audio *references* and hydrates them itself (through an
`AudioResolver`) just before the call, so nothing upstream ever holds samples. It returns exactly
the sampled token ids and their log-probs (token-in/token-out), so a trainer sees what was sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..audio import AudioRef, AudioStore
from ..config import SamplingParams
from ..messages import AudioPart, Message, ToolCall

FinishReason = Literal["stop", "eos", "length", "tool_calls"]


class GenerationRequest(BaseModel):
    """Continue `messages`. When `continue_final` is true the last message is a partial assistant
    turn that the model extends in place (the seg-tag protocol); otherwise a new assistant turn starts."""

    model_config = ConfigDict(frozen=True)

    messages: list[Message]
    continue_final: bool = False
    stop: list[str] = Field(default_factory=list)
    tools: list[dict[str, object]] | None = None
    sampling: SamplingParams = SamplingParams()
    suppress: list[str] = Field(default_factory=list, description="strings the model must not generate")


class Generation(BaseModel):
    """One continuation. `text` decodes `token_ids` exactly when the backend knows the ids."""

    text: str
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] = Field(default_factory=list)
    finish_reason: FinishReason
    stop_string: str | None = Field(default=None, description="the stop string that ended generation, if any")
    stop_string_in_text: bool = Field(
        True,
        description="False when the backend stripped the stop string (servers do); the runtime re-appends it",
    )
    tool_calls: list[ToolCall] = Field(default_factory=list)
    prompt_ids: list[int] | None = Field(default=None, description="the exact prompt token ids, when known")
    # The counts, also where the ids are unknown: an API may report only its usage.
    prompt_tokens: int | None = Field(default=None, ge=0, description="len(prompt_ids), else a server's count")
    completion_tokens: int | None = Field(default=None, ge=0, description="len(token_ids), else a server's count")

    @model_validator(mode="after")
    def _count_the_ids(self) -> Generation:
        if self.prompt_ids:
            self.prompt_tokens = len(self.prompt_ids)
        if self.token_ids:
            self.completion_tokens = len(self.token_ids)
        return self


DeltaCallback = Callable[[str], None]


class AudioResolver:
    """Turns audio references into waveforms at a backend's sample rate, via the shared store."""

    def __init__(self, store: AudioStore, clips: Mapping[str, AudioRef]) -> None:
        self.store = store
        self.clips = clips

    def ref(self, part: AudioPart) -> AudioRef:
        return self.clips[part["clip"]]

    def samples(self, part: AudioPart, sample_rate: int) -> np.ndarray:
        ref = self.ref(part)
        if part["start"] is None or part["end"] is None:
            return self.store.waveform(ref, sample_rate)
        return self.store.slice(ref, part["start"], part["end"], sample_rate)


@runtime_checkable
class ModelBackend(Protocol):
    """What the graph needs from a model."""

    @property
    def name(self) -> str: ...

    @property
    def sample_rate(self) -> int: ...

    async def generate(
        self, request: GenerationRequest, audio: AudioResolver, on_delta: DeltaCallback | None = None
    ) -> Generation:
        """Continue the conversation. `on_delta` receives text as it is generated (in the event loop)."""
        ...
