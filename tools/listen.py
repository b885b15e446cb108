"""The `listen(start, end, clip)` tool: validate a model-requested span and cut it from the clip.

The model writes the span, so every input here is hostile until checked. The tool never raises on
it: a bad span yields an invalid `ListenCall` plus a short note the runtime shows the model instead
of audio, and the trajectory keeps the call as invalid (design §2). Nothing is silently skipped.

Nothing the model wrote is copied unbounded: a note quotes at most `MAX_QUOTED` characters of a value,
and a record keeps at most `MAX_RAW` characters of the tag or call. A note goes into the conversation,
so every later prompt and checkpoint would otherwise carry a hostile 10 MB number again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..audio import AudioRef
from ..config import ListenLimits
from ..messages import AudioPart, audio_part

LISTEN_TOOL_SCHEMA: dict[str, object] = {
    "type": "function",
    "function": {
        "name": "listen",
        "description": (
            "Re-listen to a slice of an audio clip. Use it to check details (counts, pitch, what happens "
            "at a given time). The slice is played back to you as audio."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "start": {"type": "number", "description": "start of the slice, in seconds"},
                "end": {"type": "number", "description": "end of the slice, in seconds"},
                "clip": {"type": "string", "description": "which clip (default: main)", "default": "main"},
            },
            "required": ["start", "end"],
        },
    },
}


class ListenRequest(BaseModel):
    """A listen request as the model wrote it, before validation. Values may be unparseable."""

    model_config = ConfigDict(frozen=True)

    start: str | float | None
    end: str | float | None
    clip: str | None = None
    raw: str
    protocol: Literal["seg", "function"]
    call_id: str | None = None
    error: str | None = None  # set when the request could not even be parsed (bad tag body, bad JSON)


class ListenCall(BaseModel):
    """The normalised record of one listen call, whichever protocol produced it."""

    model_config = ConfigDict(frozen=True)

    clip: str
    start: float | None  # effective span (after clamping) when valid; as requested when parseable
    end: float | None
    valid: bool
    reason: str | None = None  # why it is invalid, or what was adjusted (e.g. clamping)
    raw: str
    protocol: Literal["seg", "function"]
    call_id: str | None = None


class ListenOutcome(BaseModel):
    """What the runtime inserts: audio for a valid call, a note for an invalid one."""

    model_config = ConfigDict(frozen=True)

    call: ListenCall
    audio: AudioPart | None
    note: str | None

    @property
    def valid(self) -> bool:
        return self.call.valid


_EPS = 1e-9  # seconds; far below one sample at any audio rate
MAX_QUOTED = 40  # characters of a model-written value (a number, a clip id) that a note or record quotes
MAX_RAW = 200  # characters of the model's tag or call kept in `ListenCall.raw`
MAX_CLIP_ID = 60  # characters of a model-written clip id kept; loaded clips have short ids (main, clip2)
_MAX_REASON = 300


def quoted(text: str, limit: int = MAX_QUOTED) -> str:
    """`text`, cut to `limit` characters with an ellipsis when it is longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded_number(text: str) -> str | float:
    """A number as the model wrote it, for a `ListenRequest`: short text as it is (the tool parses and
    quotes it); longer text parsed now, or cut when it is no number, so that no copy of it is long.
    A cut one stays unparseable: the ellipsis is no digit."""
    if len(text) <= MAX_QUOTED:
        return text
    value = _to_float(text)
    return value if value is not None else quoted(text)


def _to_float(value: str | float | None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value.strip())
    except ValueError:
        return None


def _fmt(x: float | str | None) -> str:
    if isinstance(x, float) and math.isfinite(x):
        return f"{x:g}"
    return quoted(str(x))


class ListenTool:
    """Validates spans against the clip table and the per-question budget; returns references only."""

    name = "listen"

    def __init__(self, limits: ListenLimits | None = None, default_clip: str = "main") -> None:
        self.limits = limits or ListenLimits()
        self.default_clip = default_clip

    def __call__(
        self,
        request: ListenRequest,
        clips: Mapping[str, AudioRef],
        audios_used: int,
        default_clip: str | None = None,
    ) -> ListenOutcome:
        """`audios_used` counts audio inputs already in this question's context (the clip included)."""
        lim = self.limits
        clip = request.clip or default_clip or self.default_clip
        start, end = _to_float(request.start), _to_float(request.end)

        def invalid(reason: str) -> ListenOutcome:
            reason = quoted(reason, _MAX_REASON)
            call = ListenCall(
                clip=quoted(clip, MAX_CLIP_ID), start=start, end=end, valid=False, reason=reason,
                raw=request.raw[:MAX_RAW], protocol=request.protocol, call_id=request.call_id,
            )  # fmt: skip
            shown_start = start if start is not None else request.start
            shown_end = end if end is not None else request.end
            span = f"{_fmt(shown_start)}-{_fmt(shown_end)} s"
            return ListenOutcome(call=call, audio=None, note=f"(cannot listen to {span}: {reason})")

        if request.error is not None:
            return invalid(request.error)
        if clip not in clips:
            known = ", ".join(sorted(clips)) or "none"
            return invalid(f"unknown clip '{quoted(clip, MAX_CLIP_ID)}' (loaded: {quoted(known, 200)})")
        if start is None or end is None:
            return invalid("start and end must be numbers of seconds")
        if not (math.isfinite(start) and math.isfinite(end)):
            return invalid("start and end must be finite")
        if audios_used >= lim.max_audios:
            return invalid(f"listen budget used up ({lim.max_audios} audio inputs per question); answer now")
        duration = clips[clip].duration
        notes: list[str] = []
        if start < 0:
            start, notes = 0.0, [*notes, "start clamped to 0 s"]
        if start >= end:
            return invalid("start must be before end")
        if start >= duration:
            return invalid(f"start is past the end of the clip ({duration:.2f} s)")
        if end > duration:
            end = duration
            notes.append(f"end clamped to {duration:.2f} s")
        length = end - start
        # Tolerate float rounding, so that e.g. 1.1-1.3 s (0.19999999999999996) counts as 0.2 s.
        if length < lim.min_slice - _EPS:
            return invalid(f"slice shorter than {lim.min_slice:g} s")
        if length > lim.max_slice + _EPS:
            return invalid(f"slice longer than {lim.max_slice:g} s; listen to a shorter span")
        call = ListenCall(
            clip=clip, start=start, end=end, valid=True, reason="; ".join(notes) or None, raw=request.raw[:MAX_RAW],
            protocol=request.protocol, call_id=request.call_id,
        )  # fmt: skip
        return ListenOutcome(call=call, audio=audio_part(clip, start, end), note=None)
