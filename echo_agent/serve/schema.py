"""The wire format of `echo-agent serve`: OpenAI chat-completions requests in, our conversation out.

Requests are validated with pydantic at the boundary. Audio content parts become clips in the shared
`AudioStore`: uploads (`input_audio`, `audio_url` with a `data:` URL) are validated, then kept under
the server's data directory by content hash, so a chat thread can be resumed after a restart;
`file://` URLs are read only below directories the operator allowed (`--allow-file-dir`), after
resolving symlinks and `..`, so a request can never name a file elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..audio import AudioRef, AudioStore
from ..errors import EchoError
from ..messages import Message, Origin, Part, ToolCall, audio_part, text_part


class RequestError(EchoError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class EchoOptions(BaseModel):
    """The `echo` extension field of a request to the `echo-agent` model (send it with `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    thread_id: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="persist the question in this chat thread"
    )
    choices: list[str] | None = Field(None, max_length=26, description="multiple-choice options")


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions`. Unknown OpenAI fields are accepted and ignored, as vLLM does."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    logprobs: bool = False
    # vLLM's extensions, honoured so that `OpenAIBackend` can use this server as a remote model.
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    bad_words: list[str] | None = None
    echo: EchoOptions | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


_DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*);base64,(?P<data>.*)$", re.DOTALL)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class AudioIntake:
    """Turns audio content parts into validated clips (`AudioRef`s with a file path)."""

    def __init__(self, store: AudioStore, upload_dir: Path, allowed_dirs: list[Path]) -> None:
        self.store = store
        self.upload_dir = upload_dir
        self.allowed_dirs = [d.resolve() for d in allowed_dirs]
        upload_dir.mkdir(parents=True, exist_ok=True)

    def upload_path(self, sha: str) -> Path | None:
        """The kept upload with this content hash, if there is one (the hash is checked, not trusted)."""
        if not _SHA_RE.match(sha):
            return None
        p = self.upload_dir / sha
        return p if p.is_file() else None

    def from_bytes(self, data: bytes) -> AudioRef:
        ref = self.store.load_bytes(data, name="uploaded audio")  # validates: size, duration, decodable
        path = self.upload_dir / ref.sha256
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: a crash never leaves a half-written upload under its hash
        return self.store.load(path)

    def from_file_url(self, url: str) -> AudioRef:
        if not self.allowed_dirs:
            raise RequestError("file:// audio URLs are disabled on this server (start it with --allow-file-dir)", 403)
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise RequestError("file:// URLs must name a local path", 400)
        raw = urllib.parse.unquote(parsed.path)
        try:
            resolved = Path(raw).resolve(strict=True)  # symlinks and '..' resolved before the check
        except (OSError, RuntimeError):
            raise RequestError(f"no such file: {raw}", 400) from None
        if not any(resolved.is_relative_to(d) for d in self.allowed_dirs):
            raise RequestError(f"{raw} is outside the directories this server may read", 403)
        return self.store.load(resolved)

    def part_to_ref(self, part: dict[str, Any]) -> AudioRef:
        kind = part.get("type")
        if kind == "input_audio":
            spec = part.get("input_audio")
            if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
                raise RequestError("input_audio parts need {'data': BASE64, 'format': 'wav'}")
            return self.from_bytes(_b64(spec["data"]))
        spec = part.get("audio_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise RequestError("audio_url parts need {'url': 'data:...' or 'file://...'}")
        if url.startswith("data:"):
            m = _DATA_URL_RE.match(url)
            if m is None:
                raise RequestError("audio_url data: URLs must be base64 (data:audio/wav;base64,...)")
            return self.from_bytes(_b64(m.group("data")))
        if url.startswith("file:"):
            return self.from_file_url(url)
        raise RequestError("audio_url must be a data: or file:// URL; this server fetches nothing from the network")


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("audio data is not valid base64") from None


AUDIO_TYPES = ("input_audio", "audio_url")


class Conversation(BaseModel):
    """A request's messages as our conversation, plus the clips its audio parts became."""

    messages: list[Message]
    clips: dict[str, AudioRef]
    order: list[str] = Field(description="clip ids in order of first appearance")


def _content_parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise RequestError("message content must be a string or a list of content parts")


def to_conversation(raw: list[dict[str, Any]], intake: AudioIntake) -> Conversation:
    """OpenAI messages -> our messages. Each distinct audio becomes one clip, named by its content hash."""
    clips: dict[str, AudioRef] = {}
    order: list[str] = []
    out: list[Message] = []
    for i, msg in enumerate(raw):
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"messages[{i}]: unknown role {role!r}")
        origin: Origin = "model" if role == "assistant" else "user"
        parts: list[Part] = []
        for part in _content_parts(msg.get("content")):
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}]: text parts need a 'text' string")
                parts.append(text_part(part["text"], origin))
            elif kind in AUDIO_TYPES:
                ref = intake.part_to_ref(part)
                cid = ref.sha256[:16]
                if cid not in clips:
                    clips[cid] = ref
                    order.append(cid)
                parts.append(audio_part(cid))
            else:
                raise RequestError(f"messages[{i}]: unsupported content part type {kind!r}")
        entry: Message = {"role": "system" if role == "developer" else role, "content": parts}
        if role == "tool" and isinstance(msg.get("tool_call_id"), str):
            entry["tool_call_id"] = msg["tool_call_id"]
        if role == "assistant" and msg.get("tool_calls"):
            calls: list[ToolCall] = []
            for c in msg["tool_calls"]:
                fn = c.get("function") or {}
                calls.append({"id": str(c.get("id", "")), "name": str(fn.get("name", "")),
                              "arguments": str(fn.get("arguments", ""))})  # fmt: skip
            entry["tool_calls"] = calls
            text = "".join(p["text"] for p in parts if p["type"] == "text")
            if "<tool_call>" not in text:
                # Local chat templates render tool calls from the text (Hermes style, as the local
                # backend parses them), so a client that sent only `tool_calls` gets them written out.
                blocks = "".join(
                    f'<tool_call>\n{{"name": {json.dumps(c["name"])}, "arguments": {c["arguments"] or "{}"}}}'
                    "\n</tool_call>"
                    for c in calls
                )
                parts.append(text_part(blocks, "model"))
        out.append(entry)
    return Conversation(messages=out, clips=clips, order=order)


def last_user_text(messages: list[Message]) -> str:
    for msg in reversed(messages):
        if msg["role"] == "user":
            return "".join(p["text"] for p in msg["content"] if p["type"] == "text").strip()
    return ""


FinishName = Literal["stop", "length", "tool_calls"]
