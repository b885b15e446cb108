"""Audio LLMs behind an OpenAI-compatible chat-completions endpoint: vLLM, `echo-agent serve`, or an API.

Mirrors `TransformersBackend` over HTTP:

* Audio is hydrated from the shared store just before the call and sent as base64 WAV, as an
  `input_audio` part (OpenAI's shape) or, with `audio_format="audio_url"`, as a `data:` URL (vLLM's
  other accepted shape). 32-bit float WAV by default, so the server sees the very samples a local
  backend would; `wav_subtype="PCM_16"` for APIs that only take 16-bit audio.
* Seg-tag protocol: stop string `</seg>`, then the same assistant message is continued with
  `continue_final_message=True, add_generation_prompt=False` (vLLM's chat-template options, also
  honoured by `echo-agent serve`). `include_stop_str_in_output` keeps the stop string in the text so
  that text and token ids agree; a server that strips it anyway is handled by the protocol.
* Function-call protocol: the `listen` tool goes out as an OpenAI tool; its result comes back as a
  tool message plus a user message holding the audio (design §3).
* Token-level data: with `return_token_ids`/`logprobs`, vLLM's `token_ids`, `prompt_token_ids` and
  the per-token log-probs flow into `Generation.token_ids`, `.prompt_ids` and `.logprobs`. Without
  ids, the server's `usage` (asked for in streams with `stream_options.include_usage`) gives
  `.prompt_tokens` and `.completion_tokens`, so a run's `generated_tokens` counts what was sampled.
* Failures: 429, 5xx, timeouts and dropped connections (also mid-stream) are retried with bounded,
  jittered exponential backoff (tenacity); the client's own retries are off (`max_retries=0`). When
  the attempts run out, or on any other HTTP error, a `BackendError` names the endpoint, the model
  and the last status. `timeout` bounds one attempt; `deadline` bounds the whole call, retries and
  backoff included, so a stream that never ends costs `deadline`, not `timeout` x `max_attempts`.
* Hostile or broken servers: every field of a response or stream chunk is type-checked before use. A
  200 answer that is no chat completion (`choices` a string, token ids that are not integers, a
  stream chunk that is not JSON, ...) is a `BackendError` naming the endpoint, not retried: the same
  server would answer the same way. The text, the token ids and the tool-call arguments of one
  answer are bounded (`_answer_limit`), so a server cannot fill memory or the conversation.

Model spec for `load_backend`: `openai:MODEL@BASE_URL`, e.g. `openai:Qwen/Qwen2-Audio-7B-Instruct@http://localhost:8000/v1`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import httpx2 as httpx  # openai>=3 is built on httpx2
import numpy as np
import openai
import soundfile as sf
from pydantic import BaseModel, ConfigDict, Field
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from ..errors import BackendError, ConfigError
from ..messages import AudioPart, Message, Part, ToolCall
from .base import AudioResolver, DeltaCallback, FinishReason, Generation, GenerationRequest

API_KEY_ENVS = ("ECHO_API_KEY", "OPENAI_API_KEY")
SPEC_PREFIX = "openai:"
_CLOSE_TAG_RE = re.compile(r"^</([A-Za-z][\w-]*)>$")


class OpenAIOptions(BaseModel):
    """How to talk to one OpenAI-compatible server."""

    model_config = ConfigDict(frozen=True)

    audio_format: Literal["input_audio", "audio_url"] = Field(
        "input_audio", description="input_audio parts (OpenAI) or audio_url data: URLs (vLLM)"
    )
    wav_subtype: Literal["FLOAT", "PCM_16"] = Field(
        "FLOAT", description="WAV sample format: FLOAT keeps the exact samples; PCM_16 for APIs that require it"
    )
    sample_rate: int = Field(16000, gt=0, description="rate the audio is sent at (Qwen-family encoders: 16 kHz)")
    vllm_extensions: bool = Field(
        True,
        description=(
            "send vLLM's request extensions (continue_final_message, add_generation_prompt, "
            "include_stop_str_in_output, top_k, bad_words); turn off for APIs that reject unknown fields"
        ),
    )
    audio_tail: str | None = Field(
        " ",
        description=(
            "text sent after an inserted slice that ends a continued assistant message: transformers' "
            "continue_final_message (which vLLM uses) cuts the prompt after the message's last text block, "
            "which would drop the slice; echo-agent serve ignores this text. None to send nothing"
        ),
    )
    return_token_ids: bool = Field(False, description="ask for token ids (vLLM's return_token_ids)")
    logprobs: bool = Field(False, description="ask for per-token log-probs")
    stream: bool = Field(True, description="stream when the caller wants text deltas")
    timeout: float = Field(300.0, gt=0, description="seconds for one attempt of one call, whole stream included")
    deadline: float | None = Field(
        None, gt=0,
        description="seconds for one whole call, every attempt and backoff included; None: 3 x timeout",
    )  # fmt: skip
    connect_timeout: float = Field(10.0, gt=0)
    max_attempts: int = Field(5, ge=1, description="attempts per call, the first included")
    backoff_initial: float = Field(0.5, ge=0, description="seconds; the backoff doubles per attempt, with jitter")
    backoff_max: float = Field(10.0, ge=0)


class _Malformed(Exception):
    """A 200 answer that is not a chat completion: a broken or hostile server. Not retried."""


class _Retryable(Exception):
    """A failure worth another attempt (the stream broke off, the server was overloaded...)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def parse_spec(spec: str, base_url: str | None = None) -> tuple[str, str]:
    """`openai:MODEL@BASE_URL` (or `openai:MODEL` plus `base_url`) -> (model, base_url)."""
    body = spec.removeprefix(SPEC_PREFIX)
    model, url = body, base_url
    at = body.rfind("@")
    if at > 0 and body[at + 1 :].startswith(("http://", "https://")):
        model, url = body[:at], body[at + 1 :]
    url = url or os.environ.get("OPENAI_BASE_URL")
    if not model:
        raise ConfigError(f"{spec!r}: no model name; write openai:MODEL@http://HOST:PORT/v1")
    if not url:
        raise ConfigError(f"{spec!r}: no server; write openai:MODEL@http://HOST:PORT/v1 or pass --base-url")
    return model, url.rstrip("/")


def api_key_from_env(env_name: str | None = None) -> str:
    """The API key from `env_name`, else $ECHO_API_KEY, else $OPENAI_API_KEY; a placeholder when none is
    set (vLLM without --api-key accepts anything)."""
    if env_name is not None:
        key = os.environ.get(env_name)
        if not key:
            raise ConfigError(f"--api-key-env {env_name}: the environment variable is not set")
        return key
    for name in API_KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return "EMPTY"


def wav_bytes(samples: np.ndarray, sample_rate: int, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), sample_rate, format="WAV", subtype=subtype)
    return buf.getvalue()


class OpenAIBackend:
    """Implements `ModelBackend` over an OpenAI-compatible `/v1/chat/completions`."""

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key: str | None = None,
        options: OpenAIOptions | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.options = options or OpenAIOptions()
        timeout = httpx.Timeout(self.options.timeout, connect=self.options.connect_timeout)
        # Retries are ours (tenacity, with jitter, mid-stream drops included), so the client's are off.
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key or api_key_from_env(), max_retries=0, timeout=timeout,
            http_client=http_client,
        )  # fmt: skip
        self.attempts = 0  # total HTTP attempts made, for tests and logs
        # Every call resends the whole conversation's audio; encode each (clip, span) once.
        self._encoded: OrderedDict[tuple[str, float | None, float | None], str] = OrderedDict()

    @property
    def name(self) -> str:
        return f"openai:{self.model}@{self.base_url}"

    @property
    def sample_rate(self) -> int:
        return self.options.sample_rate

    async def aclose(self) -> None:
        await self.client.close()

    # ---- request construction --------------------------------------------------------------

    def _audio_part(self, part: AudioPart, audio: AudioResolver) -> dict[str, Any]:
        key = (audio.ref(part).sha256, part["start"], part["end"])
        data = self._encoded.get(key)
        if data is None:
            wav = wav_bytes(audio.samples(part, self.sample_rate), self.sample_rate, self.options.wav_subtype)
            data = self._encoded[key] = base64.b64encode(wav).decode()
            if len(self._encoded) > 64:
                self._encoded.popitem(last=False)
        else:
            self._encoded.move_to_end(key)
        if self.options.audio_format == "audio_url":
            return {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{data}"}}
        return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}

    def _content(self, parts: Sequence[Part], audio: AudioResolver) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for part in parts:
            if part["type"] == "audio":
                out.append(self._audio_part(part, audio))
            elif out and out[-1]["type"] == "text":
                # Adjacent text parts are one string: servers join separate text parts with newlines.
                out[-1]["text"] += part["text"]
            else:
                out.append({"type": "text", "text": part["text"]})
        return out

    def to_openai_messages(self, messages: Sequence[Message], audio: AudioResolver) -> list[dict[str, Any]]:
        """Our conversation (text + audio references) as OpenAI chat messages with the audio inlined."""
        out: list[dict[str, Any]] = []
        for msg in messages:
            if msg["role"] == "tool":
                text = "".join(p["text"] for p in msg["content"] if p["type"] == "text")
                out.append({"role": "tool", "tool_call_id": msg.get("tool_call_id", ""), "content": text})
                continue
            content = self._content(msg["content"], audio)
            entry: dict[str, Any] = {"role": msg["role"]}
            has_audio = any(c["type"] != "text" for c in content)
            entry["content"] = content if has_audio else "".join(c["text"] for c in content)
            if msg.get("tool_calls"):
                entry["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in msg["tool_calls"]
                ]
            out.append(entry)
        return out

    def build_kwargs(self, request: GenerationRequest, audio: AudioResolver, stream: bool) -> dict[str, Any]:
        """Keyword arguments for `chat.completions.create` (public so tests can inspect the wire shape)."""
        s = request.sampling
        opts = self.options
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": self.to_openai_messages(request.messages, audio),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
            "stream": stream,
        }
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if request.stop:
            kwargs["stop"] = list(request.stop)
        if request.tools:
            kwargs["tools"] = list(request.tools)
        if opts.logprobs:
            kwargs["logprobs"] = True
        if stream:  # the token counts come in a last chunk (OpenAI's and vLLM's usage)
            kwargs["stream_options"] = {"include_usage": True}
        extra: dict[str, Any] = {}
        if opts.vllm_extensions:
            if request.continue_final:
                extra.update(continue_final_message=True, add_generation_prompt=False)
                last = kwargs["messages"][-1]
                if opts.audio_tail and isinstance(last["content"], list) and last["content"][-1]["type"] != "text":
                    last["content"].append({"type": "text", "text": opts.audio_tail})
            if request.stop:
                extra["include_stop_str_in_output"] = True
            if s.top_k:
                extra["top_k"] = s.top_k
            if request.suppress:
                extra["bad_words"] = list(request.suppress)
        if opts.return_token_ids:
            extra["return_token_ids"] = True
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    # ---- the call ----------------------------------------------------------------------------

    async def generate(
        self, request: GenerationRequest, audio: AudioResolver, on_delta: DeltaCallback | None = None
    ) -> Generation:
        stream = self.options.stream and on_delta is not None
        kwargs = self.build_kwargs(request, audio, stream)
        last = "no attempt"
        attempts = 0
        forward = _ReplayFilter(on_delta) if on_delta is not None else None
        deadline = self.deadline
        try:
            # One clock for the whole call: the per-attempt timeout alone lets a server that never finishes
            # hold a call for timeout x attempts. Cancelling closes the stream (see `_streamed`).
            async with asyncio.timeout(deadline):
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.options.max_attempts),
                    wait=wait_random_exponential(multiplier=self.options.backoff_initial, max=self.options.backoff_max),
                    retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
                    reraise=True,
                ):
                    with attempt:
                        self.attempts += 1
                        attempts += 1
                        try:
                            if forward is not None:
                                forward.new_attempt()
                            return await self._attempt(kwargs, request, forward if stream else None)
                        except _Retryable as err:
                            last = err.status
                            raise
        except _Retryable:
            pass
        except TimeoutError:  # the attempts turn their own timeouts into _Retryable: this is the deadline
            raise BackendError(
                f"{self.base_url} (model {self.model}): no complete answer within the {deadline:g} s deadline "
                f"of one call ({attempts} attempt{'s' if attempts != 1 else ''}; last error: {last})"
            ) from None
        raise BackendError(
            f"{self.base_url} (model {self.model}): gave up after {self.options.max_attempts} attempts; "
            f"last error: {last}"
        )

    @property
    def deadline(self) -> float:
        """Seconds one `generate` call may take, every attempt and backoff included."""
        return self.options.deadline or 3 * self.options.timeout

    async def _attempt(
        self, kwargs: dict[str, Any], request: GenerationRequest, on_delta: DeltaCallback | None
    ) -> Generation:
        try:
            async with asyncio.timeout(self.options.timeout):
                if on_delta is not None:
                    return await self._streamed(kwargs, request, on_delta)
                # The raw body, read as JSON here: the client's own parsing raises bare JSON errors.
                raw = await self.client.chat.completions.with_raw_response.create(**kwargs)
                try:
                    data = json.loads(raw.content)
                except _READ_ERRORS as err:  # not JSON, not UTF-8, nested too deep
                    raise _Malformed(f"the response is not JSON ({_error_text(err)})") from None
                return self._from_response(data, request)
        except _Malformed as err:
            raise BackendError(f"{self.base_url} (model {self.model}): malformed response: {err}") from None
        except TimeoutError:
            raise _Retryable(f"timed out after {self.options.timeout:g} s") from None
        except openai.APITimeoutError:
            raise _Retryable("request timed out") from None
        except openai.APIConnectionError as err:
            raise _Retryable(f"connection failed ({err.__cause__ or err})") from None
        except (httpx.TransportError, httpx.StreamError) as err:  # raised while iterating a stream
            raise _Retryable(f"connection dropped ({type(err).__name__}: {err})") from None
        except openai.APIStatusError as err:
            status = f"HTTP {err.status_code}: {_error_message(err)}"
            if err.status_code == 429 or err.status_code >= 500:
                raise _Retryable(status) from None
            raise BackendError(f"{self.base_url} (model {self.model}): {status}") from None
        except openai.APIError as err:  # e.g. an error event in the middle of a stream
            raise BackendError(f"{self.base_url} (model {self.model}): {err.message[:300]}") from None

    async def _streamed(
        self, kwargs: dict[str, Any], request: GenerationRequest, on_delta: DeltaCallback
    ) -> Generation:
        acc = _Accumulator(_answer_limit(request))
        stream = await self.client.chat.completions.create(**kwargs)
        # `async with`: a cancelled call (the deadline, a client that went away) closes the connection now.
        async with stream:
            chunks = aiter(stream)
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except _READ_ERRORS as err:  # the client's json.loads of an event's data, or its model building
                    raise _Malformed(f"a stream event could not be read ({_error_text(err)})") from None
                with _malformed_on_error("a stream chunk"):
                    text = acc.add_chunk(_obj(_plain(chunk), "a stream chunk"))
                if text:
                    on_delta(text)
        if acc.finish is None:
            # The server closed the stream without saying why it stopped: the connection was cut.
            raise _Retryable("stream ended without a finish_reason (connection dropped)")
        return self._generation(
            "".join(acc.text), acc.finish, acc.stop_reason, acc.tool_calls(), acc.token_ids, acc.logprobs,
            acc.prompt_ids, acc.usage, request,
        )  # fmt: skip

    def _from_response(self, raw: object, request: GenerationRequest) -> Generation:
        with _malformed_on_error("the response"):
            data = _obj(raw, "the response")
            choices = _list(data.get("choices"), "choices")
            if not choices:
                raise _Retryable("response has no choices")
            choice = _obj(choices[0], "choices[0]")
            msg = _obj(choice.get("message"), "choices[0].message")
            acc = _Accumulator(_answer_limit(request))
            acc.add_text(_opt_str(msg.get("content"), "message.content"))
            for i, c in enumerate(_list(msg.get("tool_calls"), "message.tool_calls")):
                where = f"message.tool_calls[{i}]"
                call = _obj(c, where)
                fn = _obj(call.get("function"), f"{where}.function")
                name = _opt_str(fn.get("name"), f"{where}.function.name")
                if not name:
                    raise _Malformed(f"{where}.function.name is missing")
                acc.add_tool_delta({**call, "index": i}, where)
            acc.add_logprobs(choice.get("logprobs"), "choices[0].logprobs")
            acc.add_token_ids(choice.get("token_ids"), "choices[0].token_ids")
            prompt_ids = _token_ids(data.get("prompt_token_ids"), "prompt_token_ids")
            finish = _opt_str(choice.get("finish_reason"), "choices[0].finish_reason") or "stop"
            return self._generation(
                "".join(acc.text), finish, choice.get("stop_reason", _ABSENT), acc.tool_calls(), acc.token_ids,
                acc.logprobs, prompt_ids, _usage(data.get("usage")), request,
            )  # fmt: skip

    @staticmethod
    def _generation(
        text: str, finish: str, stop_reason: object, calls: list[ToolCall], token_ids: list[int],
        logprobs: list[float], prompt_ids: list[int] | None, usage: tuple[int | None, int | None],
        request: GenerationRequest,
    ) -> Generation:  # fmt: skip
        reason: FinishReason
        stop_string: str | None = None
        if calls or finish == "tool_calls":
            reason = "tool_calls"
        elif finish == "length":
            reason = "length"
        elif isinstance(stop_reason, str) and stop_reason in request.stop:
            reason, stop_string = "stop", stop_reason  # vLLM (and echo-agent serve) name the stop string
        elif stop_reason is _ABSENT:
            # A server that does not say which stop ended generation: infer a tag-style stop string
            # (`</x>`) from an `<x>` left open at the end of the text; otherwise it was end-of-sequence.
            stop_string = _infer_stop(text, request.stop)
            reason = "stop" if stop_string else "eos"
        else:
            reason = "eos"
        in_text = stop_string is None or text.endswith(stop_string)
        return Generation(
            text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=reason, stop_string=stop_string,
            stop_string_in_text=in_text, tool_calls=calls, prompt_ids=list(prompt_ids) if prompt_ids else None,
            prompt_tokens=usage[0], completion_tokens=usage[1],  # the ids' counts win, when there are ids
        )  # fmt: skip


_ABSENT = object()


def _infer_stop(text: str, stops: Sequence[str]) -> str | None:
    for stop in stops:
        if text.endswith(stop):
            return stop
        m = _CLOSE_TAG_RE.match(stop)
        if m and text.rfind(f"<{m.group(1)}>") > text.rfind(stop):
            return stop
    return None


def _error_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
        if isinstance(inner, str):
            return inner[:300]
    return str(err.message)[:300]


class _ReplayFilter:
    """Forwards streamed text to the caller once, across retries: an attempt after a broken stream
    replays the text already shown (greedy decoding repeats it exactly), so only what goes past it is
    forwarded. If the new attempt diverges, its text is forwarded from the point where it passes
    what was shown (what was shown cannot be taken back)."""

    def __init__(self, callback: DeltaCallback) -> None:
        self.callback = callback
        self.shown = ""
        self.attempt = ""

    def new_attempt(self) -> None:
        self.attempt = ""

    def __call__(self, delta: str) -> None:
        self.attempt += delta
        if len(self.attempt) > len(self.shown):
            new = self.attempt[len(self.shown) :]
            self.shown += new
            self.callback(new)


class _Accumulator:
    """Collects a completion (a stream's chunks, or the one message of a plain response), checking each
    field's type and the size of the whole: text, token ids, log-probs and tool-call text together stay
    under `limit` (the server may be hostile)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.text: list[str] = []
        self.chars = 0
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_ids: list[int] | None = None
        self.finish: str | None = None
        self.stop_reason: object = _ABSENT
        self.usage: tuple[int | None, int | None] = (None, None)
        self._calls: dict[int, dict[str, str]] = {}

    def _grow(self, n: int, what: str) -> None:
        self.chars += n
        if self.chars > self.limit:
            raise _Malformed(f"more {what} than max_tokens allows (over {self.limit} characters or tokens)")

    def add_chunk(self, data: dict[str, Any]) -> str:
        """Add one stream chunk; return its new text."""
        new: list[str] = []
        prompt_ids = _token_ids(data.get("prompt_token_ids"), "prompt_token_ids")
        if prompt_ids is not None:
            self.prompt_ids = prompt_ids
        if data.get("usage") is not None:  # the last chunk, with stream_options.include_usage
            self.usage = _usage(data["usage"])
        for i, c in enumerate(_list(data.get("choices"), "choices")):
            choice = _obj(c, f"choices[{i}]")
            delta = _obj(choice.get("delta"), f"choices[{i}].delta")
            text = _opt_str(delta.get("content"), "delta.content")
            if text:
                self.add_text(text)
                new.append(text)
            for j, tc in enumerate(_list(delta.get("tool_calls"), "delta.tool_calls")):
                self.add_tool_delta(_obj(tc, f"delta.tool_calls[{j}]"), f"delta.tool_calls[{j}]")
            self.add_logprobs(choice.get("logprobs"), f"choices[{i}].logprobs")
            self.add_token_ids(choice.get("token_ids"), f"choices[{i}].token_ids")
            finish = _opt_str(choice.get("finish_reason"), f"choices[{i}].finish_reason")
            if finish:
                self.finish = finish
                self.stop_reason = choice.get("stop_reason", _ABSENT)
        return "".join(new)

    def add_text(self, text: str | None) -> None:
        if text:
            self._grow(len(text), "text")
            self.text.append(text)

    def add_token_ids(self, ids: object, where: str) -> None:
        checked = _token_ids(ids, where) or []
        self._grow(len(checked), "token ids")
        self.token_ids.extend(checked)

    def add_logprobs(self, lp: object, where: str) -> None:
        content = _list(_obj(lp, where).get("content"), f"{where}.content")
        self._grow(len(content), "log-probs")
        for i, item in enumerate(content):
            value = _obj(item, f"{where}.content[{i}]").get("logprob")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _Malformed(f"{where}.content[{i}].logprob is {_what(value)}, expected a number")
            self.logprobs.append(float(value))

    def add_tool_delta(self, tc: dict[str, Any], where: str) -> None:
        index = tc.get("index")
        if index is None:
            index = 0
        elif not isinstance(index, int) or isinstance(index, bool):
            raise _Malformed(f"{where}.index is {_what(index)}, expected an integer")
        slot = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        call_id = _opt_str(tc.get("id"), f"{where}.id")
        if call_id:
            if len(call_id) > _MAX_ID:
                raise _Malformed(f"{where}.id is {len(call_id)} characters long (at most {_MAX_ID})")
            slot["id"] = call_id
        fn = _obj(tc.get("function"), f"{where}.function")
        for key in ("name", "arguments"):
            piece = _opt_str(fn.get(key), f"{where}.function.{key}")
            if piece:
                self._grow(len(piece), "tool-call text")
                slot[key] += piece

    def tool_calls(self) -> list[ToolCall]:
        return [
            {"id": c["id"] or f"call_{i}", "name": c["name"], "arguments": c["arguments"]}
            for i, c in sorted(self._calls.items())
        ]


# ---- checking what a server sent ---------------------------------------------------------------------

_MAX_ID = 256  # characters of a tool-call id; ids go back to the server and into the conversation
# What reading a malformed answer can raise (json's JSONDecodeError and pydantic's ValidationError are ValueErrors).
_READ_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError, RecursionError)


def _answer_limit(request: GenerationRequest) -> int:
    """The most characters of text (and the most token ids, log-probs, tool-call characters) one answer
    may hold: far more than `max_new_tokens` tokens can decode to, far less than what fills memory."""
    return max(1 << 20, 256 * request.sampling.max_new_tokens)


def _plain(obj: object) -> object:
    """The JSON the server sent, as plain values. The client builds its models without validation, so
    wrong types survive into the dump (where they are checked); warnings about them are noise here."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(warnings=False)
    return obj


def _what(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _obj(v: object, where: str) -> dict[str, Any]:
    """An object, or {} for null/absent."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Malformed(f"{where} is {_what(v)}, expected an object")
    return v


def _list(v: object, where: str) -> list[Any]:
    """An array, or [] for null/absent."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Malformed(f"{where} is {_what(v)}, expected an array")
    return v


def _opt_str(v: object, where: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise _Malformed(f"{where} is {_what(v)}, expected a string")


def _token_ids(v: object, where: str) -> list[int] | None:
    """An array of token ids, or None for null/absent."""
    if v is None:
        return None
    if not isinstance(v, list):
        raise _Malformed(f"{where} is {_what(v)}, expected an array of integer token ids")
    for i, t in enumerate(v):
        if not isinstance(t, int) or isinstance(t, bool):
            raise _Malformed(f"{where}[{i}] is {_what(t)}, expected an integer token id")
    return v


def _usage(v: object) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from a `usage` object; None where it says nothing."""
    usage = _obj(v, "usage")
    counts: list[int | None] = []
    for key in ("prompt_tokens", "completion_tokens"):
        n = usage.get(key)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise _Malformed(f"usage.{key} is {_what(n)}, expected a count of tokens")
        counts.append(n)
    return counts[0], counts[1]


@contextmanager
def _malformed_on_error(what: str) -> Iterator[None]:
    """Turns an unexpected type error while reading a response into `_Malformed`: a last guard, so that no
    server answer can end in a traceback (pydantic's ValidationError is a ValueError). The checks above
    give the clearer messages."""
    try:
        yield
    except _READ_ERRORS as exc:
        raise _Malformed(f"{what} could not be read ({_error_text(exc)})") from exc


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:200]}"
