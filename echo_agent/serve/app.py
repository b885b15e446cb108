"""`echo-agent serve`: an OpenAI-compatible HTTP server for the local model and for the Echo agent.

Two models are listed by `GET /v1/models`:

* the raw model (`ServeConfig.model_name`): plain continuation, with vLLM's extensions honoured
  (`stop`, `continue_final_message` / `add_generation_prompt=false`, `include_stop_str_in_output`,
  `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `logprobs`, `return_token_ids`,
  `bad_words`) so that `OpenAIBackend` can use this server as its remote model. Like vLLM it names the
  stop string that ended generation in `choices[0].stop_reason`. The content is the model's raw text
  (tool-call markup included, with `tool_calls` parsed beside it), so a conversation sent back renders
  to the same tokens.
* the agent (`echo-agent`): the Echo graph. `message.content` is the final answer; `message.echo`
  carries the reasoning, every listen, the verdict and the thread id. Streaming sends the reasoning as
  `delta.reasoning_content` and each listen, retry and verdict as `delta.echo` events as they happen.
  The request's `echo` field (`extra_body={"echo": {...}}`) takes `thread_id` (persist the question in
  that chat thread, in the same SQLite checkpointer as `echo-agent chat`) and `choices`.

Also served: `/` (the web chat page), `/api/threads`, `/api/threads/{id}` and `/api/audio/{sha256}`
(the page's thread history and uploaded clips). Optional bearer-token auth covers everything but `/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from langgraph.checkpoint.base import BaseCheckpointSaver
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from ..agent import EchoAgent, Result
from ..audio import AudioLimits, AudioRef, AudioStore
from ..backends.base import AudioResolver, Generation, GenerationRequest, ModelBackend
from ..chat import next_clip_name, split_choices
from ..config import AgentConfig, SamplingParams
from ..errors import AudioTooLargeError, BackendError, EchoError
from ..messages import Message
from ..prompts import INSTRUCTION
from .schema import AudioIntake, ChatRequest, Conversation, EchoOptions, RequestError, last_user_text, to_conversation

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "tool_calls": "tool_calls"}
_STOP_OVERHANG = 16  # as the local backend: a stop string may end inside the last token


class ServeConfig(BaseModel):
    """Everything `echo-agent serve` is started with."""

    model_config = ConfigDict(frozen=True)

    model_name: str = Field(description="id of the raw model in /v1/models")
    agent_name: str = "echo-agent"
    api_token: SecretStr | None = Field(None, description="require `Authorization: Bearer TOKEN` when set")
    allow_file_dirs: list[Path] = Field(default_factory=list, description="file:// audio only below these")
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_audio_seconds: float = Field(600.0, gt=0, description="longer clips get 400")
    max_tokens: int = Field(4096, ge=1, description="cap on max_tokens per call")
    data_dir: Path = Field(description="uploads (by content hash) and the default chat database")
    db: Path | None = Field(None, description="SQLite chat checkpoints (default: DATA_DIR/chat.sqlite)")
    agent: AgentConfig = AgentConfig()

    @property
    def db_path(self) -> Path:
        return self.db or self.data_dir / "chat.sqlite"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


def _status_of(err: EchoError) -> tuple[int, str]:
    if isinstance(err, RequestError):
        return err.status, err.kind
    if isinstance(err, AudioTooLargeError):
        return 413, "request_too_large"
    if isinstance(err, BackendError):
        return 502, "backend_error"
    return 400, "invalid_request_error"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Server:
    """Shared state of one running server."""

    def __init__(self, backend: ModelBackend, config: ServeConfig, saver: BaseCheckpointSaver[Any]) -> None:
        self.backend = backend
        self.config = config
        self.saver = saver
        limits = AudioLimits(max_bytes=config.max_request_bytes, max_duration=config.max_audio_seconds)
        # Every clip is kept on disk (uploads by hash), so evicted samples reload: a small cache suffices
        # (a 10-minute clip is ~40 MB of float samples per sample rate).
        self.store = AudioStore(limits, max_cached=16)
        self.intake = AudioIntake(self.store, config.data_dir / "uploads", list(config.allow_file_dirs))
        # One compiled graph each for one-off questions and for persisted threads; sampling travels with each run.
        self._agents = {
            persistent: EchoAgent(backend, self.store, config.agent, checkpointer=saver if persistent else None)
            for persistent in (False, True)
        }
        # Held only while a question runs; weak values, so finished threads leave nothing behind.
        self._thread_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def agent(self, persistent: bool) -> EchoAgent:
        """The agent; the persistent one checkpoints into the chat database."""
        return self._agents[persistent]

    def thread_lock(self, thread: str | None) -> contextlib.AbstractAsyncContextManager[Any]:
        """One question at a time per thread (two at once would fork its history); none for no thread."""
        if thread is None:
            return contextlib.nullcontext()
        lock = self._thread_locks.get(thread)
        if lock is None:
            lock = self._thread_locks[thread] = asyncio.Lock()
        return lock

    def sampling(self, req: ChatRequest, default_temperature: float, default_seed: int | None = None) -> SamplingParams:
        wanted = req.max_completion_tokens or req.max_tokens or self.config.agent.sampling.max_new_tokens
        try:
            return SamplingParams(
                temperature=default_temperature if req.temperature is None else req.temperature,
                top_p=req.top_p or 1.0, top_k=max(0, req.top_k or 0),
                max_new_tokens=min(wanted, self.config.max_tokens),
                seed=default_seed if req.seed is None else req.seed,
            )  # fmt: skip
        except ValidationError as err:
            raise RequestError(f"bad sampling parameters: {err.errors()[0]['msg']}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = RequestError(f"request body is over the limit of {limit} bytes", 413, "request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # counted as it arrives, for bodies without a length
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(backend: ModelBackend, config: ServeConfig, *, saver: BaseCheckpointSaver[Any] | None = None) -> FastAPI:
    """The FastAPI app. Without `saver`, it opens an `AsyncSqliteSaver` on `config.db_path` for its lifetime."""
    holder: dict[str, _Server] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if saver is not None:
            holder["s"] = _Server(backend, config, saver)
            yield
            return
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        config.db_path.parent.mkdir(parents=True, exist_ok=True)
        async with AsyncSqliteSaver.from_conn_string(str(config.db_path)) as sqlite:
            holder["s"] = _Server(backend, config, sqlite)
            yield

    app = FastAPI(title="echo-agent", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    token = config.api_token.get_secret_value() if config.api_token else None

    @app.middleware("http")
    async def auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if token is not None and request.url.path not in ("/", "/favicon.ico"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(files("echo_agent").joinpath("assets/web/index.html").read_text())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": config.model_name, "object": "model", "created": now, "owned_by": "echo-agent"},
                {"id": config.agent_name, "object": "model", "created": now, "owned_by": "echo-agent"},
            ],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        server = holder["s"]
        try:
            body = await _read_body(request, config.max_request_bytes)
            try:
                req = ChatRequest.model_validate_json(body)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                raise RequestError(f"invalid request: {where}: {first['msg']}") from None
            if req.model not in (config.model_name, config.agent_name):
                raise RequestError(
                    f"the model {req.model!r} does not exist; this server has {config.model_name!r} and "
                    f"{config.agent_name!r}", 404, "not_found_error",
                )  # fmt: skip
            conv = await asyncio.to_thread(to_conversation, req.messages, server.intake)  # decoding is CPU work
            if req.model == config.agent_name:
                return await _agent_call(server, req, conv)
            return await _raw_call(server, req, conv)
        except EchoError as err:
            status, kind = _status_of(err)
            return _error(status, str(err), kind)

    @app.get("/api/threads")
    async def threads() -> dict[str, Any]:
        return {"threads": await _list_threads(holder["s"].saver)}

    @app.get("/api/threads/{thread_id}")
    async def thread(thread_id: str) -> Response:
        server = holder["s"]
        agent = server.agent(persistent=True)
        snap = await agent.graph.aget_state({"configurable": {"thread_id": thread_id}})
        if not snap or not snap.values:
            return _error(404, f"no thread {thread_id!r}", "not_found_error")
        return JSONResponse(thread_view(thread_id, dict(snap.values)))

    @app.get("/api/audio/{sha256}", response_model=None)
    async def audio(sha256: str) -> Response:
        path = holder["s"].intake.upload_path(sha256)
        if path is None:
            return _error(404, "no such clip", "not_found_error")
        return FileResponse(path, media_type="application/octet-stream")

    return app


# ---- the raw model --------------------------------------------------------------------------


def _shape_text(gen: Generation, include_stop: bool) -> tuple[str, str | None]:
    """The content a server returns, and the stop string to report: like vLLM, the text is cut at the
    stop string (kept only with `include_stop_str_in_output`)."""
    text = gen.text
    if gen.finish_reason != "stop" or gen.stop_string is None:
        return text, None
    stop = gen.stop_string
    if gen.stop_string_in_text:
        idx = text.rfind(stop, max(0, len(text) - len(stop) - _STOP_OVERHANG))
        if idx >= 0:
            text = text[: idx + (len(stop) if include_stop else 0)]
    elif include_stop:
        text += stop
    return text, stop


def _tool_calls_json(gen: Generation) -> list[dict[str, Any]]:
    return [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in gen.tool_calls
    ]


def _logprobs_json(gen: Generation) -> dict[str, Any]:
    # Tokens as `token_id:N`, vLLM's --return-tokens-as-token-ids form: exact, whatever the vocabulary.
    return {
        "content": [
            {"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
            for t, lp in zip(gen.token_ids, gen.logprobs, strict=False)
        ]
    }


def _raw_request(server: _Server, req: ChatRequest, conv: Conversation) -> GenerationRequest:
    if req.continue_final_message and req.add_generation_prompt:
        raise RequestError("continue_final_message=true needs add_generation_prompt=false")
    if req.continue_final_message and conv.messages[-1]["role"] != "assistant":
        raise RequestError("continue_final_message=true needs a final assistant message")
    messages = conv.messages
    if req.continue_final_message:
        parts = messages[-1]["content"]
        if (
            len(parts) >= 2
            and parts[-2]["type"] == "audio"
            and parts[-1]["type"] == "text"
            and not parts[-1]["text"].strip()
        ):
            # OpenAIBackend's `audio_tail`, a workaround for transformers' template cut; our prompts need none.
            messages = [*messages[:-1], {**messages[-1], "content": parts[:-1]}]
    return GenerationRequest(
        messages=messages, continue_final=req.continue_final_message, stop=req.stops(), tools=req.tools,
        sampling=server.sampling(req, default_temperature=1.0), suppress=list(req.bad_words or []),
    )  # fmt: skip


async def _raw_call(server: _Server, req: ChatRequest, conv: Conversation) -> Response:
    gen_req = _raw_request(server, req, conv)
    audio = AudioResolver(server.store, conv.clips)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not req.stream:
        gen = await server.backend.generate(gen_req, audio)
        content, stop_reason = _shape_text(gen, req.include_stop_str_in_output)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if gen.tool_calls:
            message["tool_calls"] = _tool_calls_json(gen)
        choice: dict[str, Any] = {
            "index": 0, "message": message, "finish_reason": _FINISH[gen.finish_reason], "stop_reason": stop_reason,
            "logprobs": _logprobs_json(gen) if req.logprobs else None,
        }  # fmt: skip
        body: dict[str, Any] = {
            "id": cid, "object": "chat.completion", "created": created, "model": req.model, "choices": [choice],
            "usage": _usage(gen),
        }  # fmt: skip
        if req.return_token_ids:
            choice["token_ids"] = gen.token_ids
            body["prompt_token_ids"] = gen.prompt_ids
        return JSONResponse(body)
    return StreamingResponse(_raw_stream(server, req, gen_req, audio, cid, created), media_type="text/event-stream")


def _usage(gen: Generation) -> dict[str, int]:
    prompt = len(gen.prompt_ids or [])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": len(gen.token_ids),
        "total_tokens": prompt + len(gen.token_ids),
    }


async def _raw_stream(
    server: _Server, req: ChatRequest, gen_req: GenerationRequest, audio: AudioResolver, cid: str, created: int
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, **extra}
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                     "choices": [choice]})  # fmt: skip

    queue: asyncio.Queue[str | None] = asyncio.Queue()
    task = asyncio.create_task(server.backend.generate(gen_req, audio, on_delta=queue.put_nowait))
    task.add_done_callback(lambda _t: queue.put_nowait(None))
    # Hold back enough text to cut a stop string (and its overhang) out before it is sent.
    hold = max((len(s) for s in gen_req.stop), default=-_STOP_OVERHANG) + _STOP_OVERHANG
    buffer, sent = "", 0
    yield chunk({"role": "assistant", "content": ""})
    while (delta := await queue.get()) is not None:
        buffer += delta
        safe = len(buffer) - hold
        if safe > sent:
            yield chunk({"content": buffer[sent:safe]})
            sent = safe
    try:
        gen = task.result()
    except EchoError as err:
        status, kind = _status_of(err)
        yield _sse({"error": {"message": str(err), "type": kind, "code": status}})
        yield "data: [DONE]\n\n"
        return
    content, stop_reason = _shape_text(gen, req.include_stop_str_in_output)
    if len(content) > sent:
        yield chunk({"content": content[sent:]})
    final: dict[str, Any] = {"finish_reason": _FINISH[gen.finish_reason], "stop_reason": stop_reason}
    if req.logprobs:
        final["logprobs"] = _logprobs_json(gen)
    if req.return_token_ids:
        final["token_ids"] = gen.token_ids
    delta_final: dict[str, Any] = {}
    if gen.tool_calls:
        delta_final["tool_calls"] = [{"index": i, **c} for i, c in enumerate(_tool_calls_json(gen))]
    last = json.loads(chunk(delta_final, **final)[len("data: ") :])
    if req.return_token_ids:
        last["prompt_token_ids"] = gen.prompt_ids  # vLLM sends it in the first chunk; we know it at the end
    yield _sse(last)
    yield "data: [DONE]\n\n"


# ---- the agent ------------------------------------------------------------------------------


_AgentInputs = tuple[str, list[str] | None, dict[str, AudioRef] | None, dict[str, Any]]


def _clip_table(state_clips: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        cid: {"sha256": ref["sha256"], "duration": ref["frames"] / ref["sample_rate"]}
        for cid, ref in state_clips.items()
    }


async def _agent_inputs(
    server: _Server, req: ChatRequest, conv: Conversation, agent: EchoAgent, thread: str | None
) -> _AgentInputs:
    opts = req.echo or EchoOptions()
    question = last_user_text(conv.messages)
    if not question:
        raise RequestError("the last user message has no question text")
    choices = opts.choices
    if choices is None:
        question, parsed = split_choices(question)
        choices = parsed or None
    known: dict[str, Any] = {}
    if thread is not None:
        snap = await agent.graph.aget_state({"configurable": {"thread_id": thread}})
        known = dict((snap.values or {}).get("clips", {})) if snap else {}
    shas = {ref["sha256"] for ref in known.values()}
    new: dict[str, AudioRef] = {}
    for cid in conv.order:
        ref = conv.clips[cid]
        if ref.sha256 in shas:
            continue
        shas.add(ref.sha256)
        name = next_clip_name([*known, *new])
        new[name] = ref
    if not known and not new:
        raise RequestError("no audio: send the clip as an input_audio or audio_url part")
    clips = {**known, **{c: r.model_dump() for c, r in new.items()}}
    return question, choices, new or None, clips


async def _agent_call(server: _Server, req: ChatRequest, conv: Conversation) -> Response:
    thread = req.echo.thread_id if req.echo else None
    defaults = server.config.agent.sampling
    sampling = server.sampling(req, default_temperature=defaults.temperature, default_seed=defaults.seed)
    agent = server.agent(persistent=thread is not None)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not req.stream:
        async with server.thread_lock(thread):
            question, choices, audio, clips = await _agent_inputs(server, req, conv, agent, thread)
            result = await agent.ask(audio, question, choices, thread_id=thread, sampling=sampling)
        echo = _echo_body(result, thread, clips)
        message = {"role": "assistant", "content": result.answer or "", "echo": echo}
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 0, "completion_tokens": result.generated_tokens,
                      "total_tokens": result.generated_tokens},
        })  # fmt: skip
    # Validate before the 200 of the stream goes out, so bad input is a clean 4xx. The stream takes the
    # thread's lock itself (a generator that never starts must not hold it) and reads the thread again.
    await _agent_inputs(server, req, conv, agent, thread)
    return StreamingResponse(
        _agent_stream(server, agent, req, conv, thread, cid, created, sampling), media_type="text/event-stream"
    )


def _echo_body(result: Result, thread: str | None, clips: dict[str, Any]) -> dict[str, Any]:
    return {
        "thread_id": thread, "answer": result.answer, "choice": result.choice, "status": result.status,
        "reasoning": result.text, "listens": [c.model_dump() for c in result.listens],
        "verdict": result.verdict.model_dump() if result.verdict else None,
        "generated_tokens": result.generated_tokens, "clips": _clip_table(clips),
    }  # fmt: skip


async def _agent_stream(
    server: _Server, agent: EchoAgent, req: ChatRequest, conv: Conversation, thread: str | None, cid: str,
    created: int, sampling: SamplingParams,
) -> AsyncIterator[str]:  # fmt: skip
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})  # fmt: skip

    async with server.thread_lock(thread):
        async for event in _agent_events(agent, req, conv, thread, server, chunk, sampling):
            yield event
    yield "data: [DONE]\n\n"


async def _agent_events(
    agent: EchoAgent, req: ChatRequest, conv: Conversation, thread: str | None, server: _Server,
    chunk: Callable[..., str], sampling: SamplingParams,
) -> AsyncIterator[str]:  # fmt: skip
    try:
        question, choices, audio, clips = await _agent_inputs(server, req, conv, agent, thread)
        yield chunk({"role": "assistant", "content": "", "echo": {"type": "start", "thread_id": thread,
                                                                  "clips": _clip_table(clips)}})  # fmt: skip
        async for event in agent.astream(audio, question, choices, thread_id=thread, sampling=sampling):
            kind = event["type"]
            if kind == "text":
                yield chunk({"reasoning_content": event["delta"]})
            elif kind == "result":
                result = Result.model_validate(event["result"])
                yield chunk({"content": result.answer or ""})
                yield chunk({"echo": {"type": "result", **_echo_body(result, thread, clips)}}, finish="stop")
            else:
                yield chunk({"echo": event})
    except EchoError as err:
        status, kind = _status_of(err)
        yield _sse({"error": {"message": str(err), "type": kind, "code": status}})


# ---- threads for the web page ---------------------------------------------------------------


async def _list_threads(saver: BaseCheckpointSaver[Any]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    async for tup in saver.alist(None, limit=2000):  # newest first
        tid = tup.config["configurable"]["thread_id"]
        if tid in seen or tup.config["configurable"].get("checkpoint_ns"):
            continue
        values = tup.checkpoint.get("channel_values", {})
        seen[tid] = {"thread_id": tid, "question": values.get("question", ""), "ts": tup.checkpoint.get("ts")}
        if len(seen) >= 100:
            break
    return list(seen.values())


def thread_view(thread_id: str, state: dict[str, Any]) -> dict[str, Any]:
    """A thread's questions with their reasoning, answers and re-listened spans, from its conversation.
    `items` interleaves reasoning text and spans in the order they happened."""
    turns: list[dict[str, Any]] = []
    conversation: list[Message] = state.get("conversation", [])
    for msg in conversation:
        user_text = [p["text"] for p in msg["content"] if p["type"] == "text" and p["origin"] == "user"]
        if msg["role"] == "user" and user_text:
            question = "".join(user_text).replace(INSTRUCTION, "").strip()
            turns.append({"question": question, "reasoning": "", "spans": [], "items": []})
            continue
        if not turns:
            continue
        for part in msg["content"]:
            if part["type"] == "audio" and part["start"] is not None:
                span = {"clip": part["clip"], "start": part["start"], "end": part["end"]}
                turns[-1]["spans"].append(span)
                turns[-1]["items"].append({"span": span})
            elif part["type"] == "text" and msg["role"] == "assistant" and part["origin"] != "note":
                turns[-1]["reasoning"] += part["text"]
                turns[-1]["items"].append({"text": part["text"]})
    from ..verifier import extract_answer

    for turn in turns:
        turn["answer"] = extract_answer(turn["reasoning"])
    return {"thread_id": thread_id, "clips": _clip_table(state.get("clips", {})), "turns": turns,
            "status": state.get("status")}  # fmt: skip
