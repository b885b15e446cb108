"""The OpenAI backend against a hostile server on loopback (`HostileServer`, a TEST DOUBLE: it stands in
for a broken or malicious OpenAI-compatible backend, which no real server can be made to be on demand).

* A stream that never ends: the call ends with a `BackendError` at its overall deadline, however many
  attempts are left, and the connection is closed (issue 14, item 5).
* A 800 kB unreadable `<seg>` number through the whole graph: the note is short, so later prompts carry
  the model's text and little else (item 3).
* Token counts from the server's `usage` when it sends no ids, so `generated_tokens` is honest (item 16).
* Ten malformed answers (`choices` a string, token ids that are strings, null or string log-probs, ...),
  streamed and not: each is a `BackendError` naming the endpoint, never a traceback (item 10).
* A seeded mutation loop over well-formed answers and stream chunks: every answer is a `Generation` or a
  `BackendError` (the fuzz line of the acceptance criteria).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import json_paths
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from served import ThreadServer

from echo_agent.agent import EchoAgent
from echo_agent.audio import AudioStore
from echo_agent.backends.base import AudioResolver, Generation, GenerationRequest
from echo_agent.backends.openai import OpenAIBackend, OpenAIOptions
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.errors import BackendError
from echo_agent.messages import audio_part, text_part
from echo_agent.tools.listen import LISTEN_TOOL_SCHEMA

Answer = dict[str, Any] | bytes  # a response body: JSON, or raw bytes sent as they are


class HostileServer:
    """TEST DOUBLE (a broken backend): `/v1/chat/completions` answers with what the test scripted.

    `plain` is the body of a non-streamed answer; `events` are the SSE events of a streamed one (each a
    JSON object, or raw bytes for the `data:` field), and `forever` streams content deltas without end.
    `open_streams` counts streams whose connection is still open; `requests` counts requests."""

    def __init__(self) -> None:
        self.plain: Answer = {}
        self.events: list[Answer] = []
        self.forever = False
        self.requests = 0
        self.body_sizes: list[int] = []
        self.last_body: dict[str, Any] = {}
        self.open_streams = 0
        self._lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions", response_model=None)
        async def chat(request: Request) -> Response:
            raw = await request.body()
            body = self.last_body = json.loads(raw)
            self.requests += 1
            self.body_sizes.append(len(raw))
            if body.get("stream"):
                return StreamingResponse(self._stream(), media_type="text/event-stream")
            if isinstance(self.plain, bytes):
                return Response(self.plain, media_type="application/json")
            return Response(json.dumps(self.plain), media_type="application/json")

        self.server = ThreadServer(app)
        self.url = f"{self.server.url}/v1"

    async def _stream(self) -> AsyncIterator[bytes]:
        with self._lock:
            self.open_streams += 1
        try:
            if self.forever:
                while True:  # a well-formed stream that never says it finished
                    yield _sse(chunk(content="a"))
                    await asyncio.sleep(0.02)
            for event in self.events:
                yield _sse(event)
            yield b"data: [DONE]\n\n"
        finally:  # runs when the client closes the connection, too
            with self._lock:
                self.open_streams -= 1


def _sse(event: Answer) -> bytes:
    data = event if isinstance(event, bytes) else json.dumps(event).encode()
    return b"data: " + data + b"\n\n"


def completion(content: str | None = "<think>ok</think><answer>4</answer>", **choice: Any) -> dict[str, Any]:
    """A well-formed non-streamed answer, with vLLM's token-level extras."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if "tool_calls" in choice:
        message["tool_calls"] = choice.pop("tool_calls")
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "hostile",
        "prompt_token_ids": [1, 2, 3],
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "stop_reason": None,
                     "token_ids": [7, 8], "logprobs": {"content": [{"token": "a", "logprob": -0.5}]}, **choice}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }  # fmt: skip


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """One well-formed stream chunk."""
    delta: dict[str, Any] = {"role": "assistant"}
    if content is not None:
        delta["content"] = content
    if "tool_calls" in extra:
        delta["tool_calls"] = extra.pop("tool_calls")
    top = {k: extra.pop(k) for k in ("prompt_token_ids", "usage") if k in extra}
    choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "hostile",
            "choices": [choice], **top}  # fmt: skip


def stream_of(*middle: Answer) -> list[Answer]:
    """A well-formed stream around `middle`: a first chunk, `middle`, then the finish."""
    return [chunk(content="<think>", prompt_token_ids=[1, 2, 3]), *middle, chunk(content="ok", finish="stop")]


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    yield server
    server.server.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    sf.write(str(path), np.zeros(16000, dtype=np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def audio(clip: Path) -> AudioResolver:
    store = AudioStore()
    return AudioResolver(store, {"main": store.load(clip)})


REQUEST = GenerationRequest(
    messages=[{"role": "user", "content": [audio_part("main"), text_part("How many beeps?")]}],
    tools=[LISTEN_TOOL_SCHEMA], sampling=SamplingParams(max_new_tokens=16),
)  # fmt: skip
QUICK = {"backoff_initial": 0.0, "backoff_max": 0.0, "connect_timeout": 5.0}


def backend(server: HostileServer, **options: Any) -> OpenAIBackend:
    opts = {"max_attempts": 1, "return_token_ids": True, "logprobs": True, **QUICK, **options}
    return OpenAIBackend("hostile", server.url, options=OpenAIOptions(**opts))


async def call(server: HostileServer, audio: AudioResolver, stream: bool, **options: Any) -> Generation:
    """One generate call; streamed when `stream` (the caller wants deltas)."""
    b = backend(server, **options)
    try:
        return await b.generate(REQUEST, audio, (lambda _: None) if stream else None)
    finally:
        await b.aclose()


# ---- the well-formed answers the double sends are read correctly ---------------------------------------


async def test_well_formed_answers_are_read(hostile: HostileServer, audio: AudioResolver) -> None:
    hostile.plain = completion()
    gen = await call(hostile, audio, stream=False)
    assert (gen.text, gen.token_ids, gen.prompt_ids, gen.logprobs) == (
        "<think>ok</think><answer>4</answer>", [7, 8], [1, 2, 3], [-0.5])  # fmt: skip
    calls = [{"id": "c1", "type": "function", "function": {"name": "listen", "arguments": '{"start": 1, "end": 2}'}}]
    hostile.plain = completion(content=None, tool_calls=calls, finish_reason="tool_calls")
    gen = await call(hostile, audio, stream=False)
    assert gen.tool_calls == [{"id": "c1", "name": "listen", "arguments": '{"start": 1, "end": 2}'}]
    assert gen.finish_reason == "tool_calls"

    deltas = [{"index": 0, "id": "c1", "function": {"name": "listen", "arguments": '{"start": 1,'}},
              {"index": 0, "function": {"arguments": ' "end": 2}'}}]  # fmt: skip
    hostile.events = stream_of(chunk(tool_calls=deltas[:1], token_ids=[5]), chunk(tool_calls=deltas[1:]))
    shown: list[str] = []
    b = backend(hostile)
    gen = await b.generate(REQUEST, audio, shown.append)
    await b.aclose()
    assert gen.text == "".join(shown) == "<think>ok" and gen.prompt_ids == [1, 2, 3] and gen.token_ids == [5]
    assert gen.tool_calls == [{"id": "c1", "name": "listen", "arguments": '{"start": 1, "end": 2}'}]


# ---- item 16: token counts from the server's usage, when it sends no ids --------------------------------


async def test_token_counts_come_from_usage_without_ids(
    hostile: HostileServer, audio: AudioResolver, clip: Path
) -> None:
    answer = {**completion(), "usage": {"prompt_tokens": 30, "completion_tokens": 9}}
    del answer["prompt_token_ids"], answer["choices"][0]["token_ids"]
    hostile.plain = answer
    gen = await call(hostile, audio, stream=False)
    assert (gen.token_ids, gen.prompt_ids, gen.prompt_tokens, gen.completion_tokens) == ([], None, 30, 9)
    # With ids, the ids are the count (whatever the usage says).
    hostile.plain = {**completion(), "usage": {"prompt_tokens": 30, "completion_tokens": 9}}
    gen = await call(hostile, audio, stream=False)
    assert (gen.prompt_tokens, gen.completion_tokens) == (3, 2)

    # A stream asks for its usage, which comes in a last chunk without choices.
    usage = {**chunk(), "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 4}}
    hostile.events = [chunk(content="<think>ok</think>"), chunk(content="<answer>4</answer>", finish="stop"), usage]
    gen = await call(hostile, audio, stream=True)
    assert hostile.last_body["stream_options"] == {"include_usage": True}
    assert (gen.text, gen.prompt_tokens, gen.completion_tokens) == ("<think>ok</think><answer>4</answer>", 30, 4)

    # A run through the graph counts those tokens: before, `generated_tokens` was 0 over such an API.
    hostile.plain = answer
    b = backend(hostile, return_token_ids=False, logprobs=False, stream=False)
    try:
        result = await EchoAgent(b, AudioStore(), AgentConfig()).ask(clip, "How many beeps?", ["3", "4"])
    finally:
        await b.aclose()
    assert result.answer == "4" and result.generated_tokens == 9

    hostile.plain = {**completion(), "usage": {"prompt_tokens": 3, "completion_tokens": "9"}}
    with pytest.raises(BackendError, match=r"malformed response: usage.completion_tokens is a string"):
        await call(hostile, audio, stream=False)


# ---- item 5: a never-ending stream ends at the call's deadline ----------------------------------------


async def test_a_never_ending_stream_ends_at_the_deadline(hostile: HostileServer, audio: AudioResolver) -> None:
    hostile.forever = True
    try:
        # The attempt timeout alone (30 s x 5 attempts) would hold this call for 150 s.
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"within the 1 s deadline of one call \(1 attempt;") as err:
            await call(hostile, audio, stream=True, timeout=30.0, deadline=1.0, max_attempts=5)
        assert time.monotonic() - t0 < 30.0  # ended before even one attempt timed out
        assert str(err.value).startswith(hostile.url)

        # Short attempts: each is retried, and the deadline still ends the whole call.
        before = hostile.requests
        with pytest.raises(BackendError, match="deadline of one call") as err:
            await call(hostile, audio, stream=True, timeout=0.3, deadline=1.5, max_attempts=1000)
        attempts = hostile.requests - before
        assert 2 <= attempts < 1000 and "timed out after 0.3 s" in str(err.value)

        # Every stream the client gave up on was closed, so the server stops generating for it.
        for _ in range(200):
            if hostile.open_streams == 0:
                break
            await asyncio.sleep(0.05)
        assert hostile.open_streams == 0
    finally:
        hostile.forever = False


def test_the_default_deadline_is_a_few_attempt_timeouts() -> None:
    assert OpenAIBackend("m", "http://127.0.0.1:9/v1").deadline == 900.0
    assert OpenAIBackend("m", "http://127.0.0.1:9/v1", options=OpenAIOptions(timeout=10)).deadline == 30.0
    assert OpenAIBackend("m", "http://127.0.0.1:9/v1", options=OpenAIOptions(deadline=5)).deadline == 5.0
    with pytest.raises(ValueError, match="greater than 0"):
        OpenAIOptions(deadline=0)


# ---- item 3: a hostile tag does not grow every later prompt ---------------------------------------------


async def test_a_huge_unreadable_tag_is_not_echoed_into_later_prompts(hostile: HostileServer, clip: Path) -> None:
    """Issue 14: a 10 MB unparseable `<seg>` number came back as a 10 MB note, so each call's prompt grew by
    twice the tag. Now the note is short: the prompts carry the model's own text and little else."""
    text = "<think>there <seg>" + "1.2." * 200_000 + ", 2"  # 800 kB, stopped on </seg>
    hostile.plain = completion(content=text, stop_reason="</seg>")
    config = AgentConfig(max_model_calls=4, sampling=SamplingParams(max_new_tokens=4096))
    b = backend(hostile, return_token_ids=False, logprobs=False, stream=False)
    before = len(hostile.body_sizes)
    try:
        result = await EchoAgent(b, AudioStore(), config).ask(clip, "How many beeps?", ["1", "2"])
    finally:
        await b.aclose()
    sizes = hostile.body_sizes[before:]
    assert len(sizes) == 4 and result.status == "no_answer"
    assert [c.valid for c in result.listens] == [False] * 4
    assert all(len(c.raw) <= 200 and len(c.reason or "") < 100 for c in result.listens)
    # The last prompt: three earlier answers of 800 kB, the clip (about 85 kB of base64) and short notes.
    assert sizes[-1] < 3 * len(text) + 150_000, sizes
    assert max(b - a for a, b in itertools.pairwise(sizes)) < len(text) + 5_000


# ---- item 10: ten malformed answers, streamed and not --------------------------------------------------

TOOL = {"id": "c1", "type": "function", "function": {"name": "listen", "arguments": "{}"}}


def _tool(**change: Any) -> dict[str, Any]:
    out = copy.deepcopy(TOOL)
    for key, value in change.items():
        if key in ("name", "arguments"):
            out["function"][key] = value
        else:
            out[key] = value
    return out


def _delta(**change: Any) -> dict[str, Any]:
    return {"index": 0, **_tool(**change), "type": "function"}


# name -> (non-streamed body or None, streamed events or None, what the error must mention)
MALFORMED: dict[str, tuple[Answer | None, list[Answer] | None, str]] = {
    "choices-a-string": (
        {**completion(), "choices": "abc"},
        stream_of({**chunk(content="x"), "choices": "abc"}),
        "choices is a string",
    ),
    "token_ids-a-string": (
        completion(token_ids="7 8"),
        stream_of(chunk(content="x", token_ids="7 8")),
        "token_ids is a string",
    ),
    "prompt_token_ids-a-string": (
        {**completion(), "prompt_token_ids": "1,2,3"},
        [chunk(content="x", prompt_token_ids="1,2,3"), chunk(finish="stop")],
        "prompt_token_ids is a string",
    ),
    "null-logprob": (
        completion(logprobs={"content": [{"token": "a", "logprob": None}]}),
        stream_of(chunk(content="x", logprobs={"content": [{"token": "a", "logprob": None}]})),
        "logprob is null",
    ),
    "string-logprobs": (
        completion(logprobs="-0.5"),
        stream_of(chunk(content="x", logprobs="-0.5")),
        "logprobs is a string",
    ),
    "tool-arguments-an-object": (
        completion(tool_calls=[_tool(arguments={"start": 1})]),
        stream_of(chunk(tool_calls=[_delta(arguments={"start": 1})])),
        "arguments is an object",
    ),
    "tool_calls-a-string": (
        completion(tool_calls="listen(1, 2)"),
        stream_of(chunk(tool_calls="listen(1, 2)")),
        "tool_calls is a string",
    ),
    "integer-tool-id": (
        completion(tool_calls=[_tool(id=5)]),
        stream_of(chunk(tool_calls=[_delta(id=5)])),
        "id is a number",
    ),
    "garbage-chunk": (b'{"choices": [{"mess', stream_of(b"{not json at all"), "JSONDecodeError"),
    "non-numeric-tool-index": (None, stream_of(chunk(tool_calls=[{**_delta(), "index": "x"}])), "index is a string"),
}


@pytest.mark.parametrize(
    ("case", "stream"),
    [(case, stream) for case, (plain, _, _) in MALFORMED.items() for stream in (False, True) if stream or plain],
    ids=lambda v: v if isinstance(v, str) else ("streamed" if v else "plain"),
)
async def test_a_malformed_answer_is_a_backend_error(
    hostile: HostileServer, audio: AudioResolver, case: str, stream: bool
) -> None:
    plain, events, mention = MALFORMED[case]
    if stream:
        hostile.events = events or []
    else:
        assert plain is not None
        hostile.plain = plain
    before = hostile.requests
    with pytest.raises(BackendError) as err:
        await call(hostile, audio, stream=stream, max_attempts=3)
    message = str(err.value)
    assert message.startswith(f"{hostile.url} (model hostile): malformed response: "), message
    assert mention in message, message
    assert "\n" not in message and len(message) < 500
    assert hostile.requests - before == 1  # not retried: the same server would answer the same way


# ---- fuzz: mutated answers and stream chunks ----------------------------------------------------------

# Values that break assumptions about types, ranges and encodings.
ODD_VALUES: list[Any] = [
    None, "", "x", "</seg>", "\x00", "\ud800", 0, -1, 7, 2**70, int("9" * 400), 1.5, -1e308, True, False,
    [], {}, [1, "a"], [None], {"a": 1}, {"content": None}, {"index": "0"}, "tool_calls", "stop", "length",
]  # fmt: skip
GARBAGE_EVENTS: list[bytes] = [
    b"", b"{", b"[DONE", b"null", b"5", b'"text"', b"[1, 2]", b"\xff\xfe\xfd", b'{"a": 1}\n\ndata: {',
    b'{"error": 5}', b'{"error": {"message": 7}}', b'{"choices": [' * 50 + b"]" * 50, b"[" * 100_000 + b"]" * 100_000,
]  # fmt: skip


def mutate(value: Any, rng: random.Random) -> Any:
    """`value` with 1-3 nodes replaced by odd values, deleted, or wrapped."""
    value = copy.deepcopy(value)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in json_paths(value) if p]
        if not paths:
            return rng.choice(ODD_VALUES)
        path = rng.choice(paths)
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = rng.random()
        if op < 0.15 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.25:
            parent[key] = [parent[key]]
        elif op < 0.35:
            parent[key] = json.dumps(parent[key])
        else:
            parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    return value


def well_formed_answers() -> tuple[list[dict[str, Any]], list[list[Answer]]]:
    calls = [{"id": "c1", "type": "function", "function": {"name": "listen", "arguments": '{"start": 1, "end": 2}'}}]
    plain = [completion(), completion(content=None, tool_calls=calls, finish_reason="tool_calls"),
             completion(finish_reason="stop", stop_reason="</seg>")]  # fmt: skip
    deltas = [{"index": 0, "id": "c1", "type": "function", "function": {"name": "listen", "arguments": "{"}},
              {"index": 0, "function": {"arguments": '"start": 1, "end": 2}'}}]  # fmt: skip
    streams = [
        stream_of(chunk(content=" and", token_ids=[4], logprobs={"content": [{"token": "a", "logprob": -0.1}]})),
        stream_of(chunk(tool_calls=deltas[:1]), chunk(tool_calls=deltas[1:])),
        [*stream_of(chunk(content="<seg>1, 2")), chunk(usage={"prompt_tokens": 3, "completion_tokens": 4})],
    ]
    return plain, streams


def test_fuzzed_answers_are_generations_or_backend_errors(hostile: HostileServer, audio: AudioResolver) -> None:
    """A seeded mutation loop (bounded: 400 answers, a few seconds): no answer ends in anything but a
    `Generation` or a `BackendError` naming the endpoint."""
    rng = random.Random(14)
    plain, streams = well_formed_answers()
    outcomes = {"generation": 0, "backend_error": 0}

    async def run() -> None:
        b = backend(hostile, max_attempts=1)
        try:
            for i in range(400):
                stream = i % 2 == 1
                if stream:
                    events = [copy.deepcopy(e) for e in rng.choice(streams)]
                    at = rng.randrange(len(events))
                    if rng.random() < 0.3:
                        events[at] = rng.choice(GARBAGE_EVENTS)
                    else:
                        events[at] = mutate(events[at], rng)
                    hostile.events = events
                    case: Any = events
                else:
                    hostile.plain = case = mutate(rng.choice(plain), rng)
                try:
                    gen = await b.generate(REQUEST, audio, (lambda _: None) if stream else None)
                except BackendError as err:
                    assert str(err).startswith(hostile.url), str(err)
                    outcomes["backend_error"] += 1
                except Exception as err:  # the failure this test exists to find
                    raise AssertionError(f"case {i} ({'streamed' if stream else 'plain'}): {case!r:.1500}") from err
                else:
                    assert isinstance(gen, Generation)
                    outcomes["generation"] += 1
        finally:
            await b.aclose()

    asyncio.run(run())
    # Both kinds happen, so the mutations neither all break the answer nor all miss the checks.
    assert outcomes["generation"] > 40 and outcomes["backend_error"] > 40, outcomes
