"""How the model asks to re-listen, and how the answer goes back into its context.

Two implementations of one interface:

* `SegTagProtocol` (design §2, the Echo paper): the model writes `<seg>START, END</seg>`,
  generation stops on `</seg>`, and the slice is inserted inline in the *same* assistant turn right
  after the tag, then generation continues. An optional clip prefix (`<seg>clip2: 1.0, 2.0</seg>`)
  addresses a second clip; without it the tag means the current clip, as in the paper.
* `FunctionCallProtocol` (design §3): the model calls the `listen` JSON-schema function. Tool
  messages cannot carry audio on OpenAI-style APIs, so the result is a tool message acknowledging
  the call followed by a user message holding the audio.

Both turn model output into `ListenRequest`s and listen outcomes into conversation updates.
Neither ever raises on model output.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

from .backends.base import Generation
from .messages import Message, Part, TextPart, ToolCall, text_part
from .tools.listen import LISTEN_TOOL_SCHEMA, MAX_CLIP_ID, MAX_RAW, ListenOutcome, ListenRequest, bounded_number, quoted

SEG_OPEN, SEG_CLOSE = "<seg>", "</seg>"
# The paper's grammar (floats in seconds), plus an optional clip id prefix for multi-clip sessions.
SEG_RE = re.compile(r"<seg>\s*(?:([A-Za-z_][\w.-]*)\s*:\s*)?([0-9.]+)\s*,\s*([0-9.]+)\s*</seg>")
_SEG_BODY_RE = re.compile(r"\s*(?:([A-Za-z_][\w.-]*)\s*:\s*)?([0-9.]+)\s*,\s*([0-9.]+)\s*\Z")
_MAX_RAW = MAX_RAW  # keep hostile tags from bloating state and notes


def parse_last_seg(text: str) -> ListenRequest | None:
    """The last well-formed `<seg>` tag in `text`, as a request (numbers unvalidated), else None."""
    last = None
    for last in SEG_RE.finditer(text):  # noqa: B007 - we want the final match
        pass
    if last is None:
        return None
    return _seg_request(last.group(1), last.group(2), last.group(3), last.group(0))


def _seg_request(clip: str | None, start: str, end: str, raw: str) -> ListenRequest:
    # A tag's numbers and clip id can be megabytes long: keep only bounded copies in state and notes.
    return ListenRequest(
        start=bounded_number(start), end=bounded_number(end), clip=quoted(clip, MAX_CLIP_ID) if clip else None,
        raw=raw[:_MAX_RAW], protocol="seg",
    )  # fmt: skip


def parse_closing_seg(text: str) -> ListenRequest:
    """The request made by the tag that `text` ends with (generation stopped on `</seg>`).

    The tag that triggered the stop is the one to honour, so an earlier well-formed tag never
    stands in for a malformed final one; the malformed one becomes an invalid request instead."""
    body_end = text.rfind(SEG_CLOSE)
    body_start = text.rfind(SEG_OPEN, 0, body_end if body_end >= 0 else len(text))
    if body_end < 0 or body_start < 0:
        return ListenRequest(
            start=None, end=None, raw=text[-_MAX_RAW:], protocol="seg",
            error="no <seg> tag before </seg>; write <seg>START, END</seg> in seconds",
        )  # fmt: skip
    raw = text[body_start : body_end + len(SEG_CLOSE)]
    m = _SEG_BODY_RE.match(text, body_start + len(SEG_OPEN), body_end)
    if m is None:
        return ListenRequest(
            start=None, end=None, raw=raw[:_MAX_RAW], protocol="seg",
            error="could not read the span; write <seg>START, END</seg> in seconds",
        )  # fmt: skip
    return _seg_request(m.group(1), m.group(2), m.group(3), raw)


def _model_text(gen: Generation) -> TextPart:
    part = text_part(gen.text, "model")
    if gen.token_ids or not gen.text:  # text without ids (teacher forcing) is tokenised when encoded
        part["token_ids"] = list(gen.token_ids)
        part["logprobs"] = list(gen.logprobs)
    elif gen.completion_tokens:  # an API that reports how many tokens it sampled, but not which
        part["token_count"] = gen.completion_tokens
    return part


class ListenProtocol(ABC):
    name: Literal["seg", "function"]

    @property
    @abstractmethod
    def stop(self) -> list[str]:
        """Stop strings for the backend."""

    @property
    def tools(self) -> list[dict[str, object]] | None:
        return None

    @abstractmethod
    def absorb(
        self, messages: list[Message], gen: Generation, open_turn: bool
    ) -> tuple[list[Message], list[ListenRequest]]:
        """Add the model's output to the conversation; return it and the listen requests it makes."""

    @abstractmethod
    def deliver(self, messages: list[Message], outcomes: Sequence[ListenOutcome]) -> list[Message]:
        """Add listen results (audio or notes) to the conversation."""

    @abstractmethod
    def continues_turn(self, open_turn: bool) -> bool:
        """Whether the next generate call extends the last assistant message in place."""


class SegTagProtocol(ListenProtocol):
    name: Literal["seg", "function"] = "seg"

    @property
    def stop(self) -> list[str]:
        return [SEG_CLOSE]

    def continues_turn(self, open_turn: bool) -> bool:
        return open_turn

    def absorb(
        self, messages: list[Message], gen: Generation, open_turn: bool
    ) -> tuple[list[Message], list[ListenRequest]]:
        parts: list[Part] = [_model_text(gen)]
        stopped_on_seg = gen.finish_reason == "stop" and gen.stop_string == SEG_CLOSE
        text = gen.text
        if stopped_on_seg and not gen.stop_string_in_text:
            # Servers strip stop strings; put it back. It was not sampled here, so it is runtime text.
            parts.append(text_part(SEG_CLOSE, "runtime"))
            text += SEG_CLOSE
        msgs = list(messages)
        if open_turn and msgs and msgs[-1]["role"] == "assistant":
            last = msgs[-1]
            msgs[-1] = {**last, "content": [*last["content"], *parts]}
        else:
            msgs.append({"role": "assistant", "content": parts})
        if not stopped_on_seg:
            return msgs, []
        # Only the text of the current turn matters: a closing tag split across two generate calls
        # cannot happen because each call starts after an inserted slice or note.
        return msgs, [parse_closing_seg(text)]

    def deliver(self, messages: list[Message], outcomes: Sequence[ListenOutcome]) -> list[Message]:
        msgs = list(messages)
        last = msgs[-1]
        new_parts: list[Part] = []
        for out in outcomes:
            if out.audio is not None:
                new_parts.append(out.audio)
            else:
                new_parts.append(text_part(f" {out.note} ", "note"))
        msgs[-1] = {**last, "content": [*last["content"], *new_parts]}
        return msgs


class FunctionCallProtocol(ListenProtocol):
    name: Literal["seg", "function"] = "function"

    @property
    def stop(self) -> list[str]:
        return []

    @property
    def tools(self) -> list[dict[str, object]] | None:
        return [LISTEN_TOOL_SCHEMA]

    def continues_turn(self, open_turn: bool) -> bool:
        return False

    @staticmethod
    def parse_tool_call(call: ToolCall) -> ListenRequest:
        raw = f"{call['name']}({call['arguments']})"[:_MAX_RAW]
        if call["name"] != "listen":
            return ListenRequest(
                start=None, end=None, raw=raw, protocol="function", call_id=call["id"],
                error=f"unknown tool '{call['name'][:40]}'; the only tool is listen(start, end, clip)",
            )  # fmt: skip
        try:
            args = json.loads(call["arguments"] or "{}")
        except (ValueError, RecursionError):  # JSONDecodeError, and ints over Python's 4300-digit limit
            args = None
        if not isinstance(args, dict):
            return ListenRequest(
                start=None, end=None, raw=raw, protocol="function", call_id=call["id"],
                error="arguments must be a JSON object like {\"start\": 1.0, \"end\": 2.5}",
            )  # fmt: skip

        def num(v: object) -> str | float | None:
            if isinstance(v, bool):
                return None
            if isinstance(v, int | float):
                try:
                    return float(v)
                except OverflowError:  # an int too large for a float: a number, but not a finite one
                    return math.inf if v > 0 else -math.inf
            if isinstance(v, str):
                return bounded_number(v)
            return None

        clip = args.get("clip")
        return ListenRequest(
            start=num(args.get("start")), end=num(args.get("end")),
            clip=quoted(clip, MAX_CLIP_ID) if isinstance(clip, str) and clip else None,
            raw=raw, protocol="function", call_id=call["id"],
        )  # fmt: skip

    def absorb(
        self, messages: list[Message], gen: Generation, open_turn: bool
    ) -> tuple[list[Message], list[ListenRequest]]:
        msg: Message = {"role": "assistant", "content": [_model_text(gen)]}
        if gen.tool_calls:
            msg["tool_calls"] = list(gen.tool_calls)
        requests = [self.parse_tool_call(c) for c in gen.tool_calls]
        return [*messages, msg], requests

    def deliver(self, messages: list[Message], outcomes: Sequence[ListenOutcome]) -> list[Message]:
        msgs = list(messages)
        audio_msg: list[Part] = []
        for out in outcomes:
            call = out.call
            if out.audio is not None:
                ack = f"ok: listening to clip '{call.clip}' from {call.start:.2f} s to {call.end:.2f} s"
                audio_msg.append(
                    text_part(f"Audio of clip '{call.clip}' from {call.start:.2f} s to {call.end:.2f} s:\n")
                )
                audio_msg.append(out.audio)
            else:
                ack = out.note or "(cannot listen)"
            tool_msg: Message = {
                "role": "tool",
                "content": [text_part(ack, "note" if out.audio is None else "runtime")],
            }
            if call.call_id is not None:
                tool_msg["tool_call_id"] = call.call_id
            msgs.append(tool_msg)
        if audio_msg:
            msgs.append({"role": "user", "content": audio_msg})
        return msgs


def make_protocol(name: str) -> ListenProtocol:
    if name == "seg":
        return SegTagProtocol()
    if name == "function":
        return FunctionCallProtocol()
    raise ValueError(f"unknown protocol {name!r} (expected 'seg' or 'function')")
