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
  that chat thread, in the server's SQLite checkpointer) and `choices`.

Also served: `/` (the web chat page), `/api/limits`, `/api/threads` (with the API key only),
`/api/threads/{id}` and `/api/audio/{sha256}` (the page's thread history and uploaded clips).

Every request is bounded (docs/serving.md, "Limits"): its body (size, read time, concurrent large uploads), its
audio, its prompt tokens, its wall-clock time, and what it leaves on disk. A request that fails leaves nothing in
its thread. Requests from foreign `Host` names (DNS rebinding) and cross-origin writes (CSRF) are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import hmac
import ipaddress
import json
import logging
import math
import time
import urllib.parse
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from langgraph.checkpoint.base import BaseCheckpointSaver
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from ..agent import EchoAgent, Result
from ..audio import AudioLimits, AudioRef, AudioStore
from ..backends.base import AudioResolver, DeltaCallback, Generation, GenerationRequest, ModelBackend
from ..chat import next_clip_name, split_choices
from ..config import AgentConfig, SamplingParams
from ..errors import AudioTooLargeError, BackendError, EchoError
from ..graphs import new_question
from ..graphs.state import EchoContext
from ..messages import Message
from ..prompts import INSTRUCTION
from .schema import (
    AudioIntake,
    ChatRequest,
    Conversation,
    EchoOptions,
    RequestError,
    StorageQuota,
    TextGuard,
    last_user_text,
    parse_body,
    special_tokens,
    to_conversation,
)

log = logging.getLogger("echo_agent.serve")

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "tool_calls": "tool_calls"}
_STOP_OVERHANG = 16  # as the local backend: a stop string may end inside the last token
_LARGE_BODY = 1 << 20  # bodies above this (or of unknown length) take an upload slot
_MIN_BODY_RATE = 64 * 1024  # bytes/s a body must average, after --read-timeout of grace
_BYTES_PER_TOKEN = 64  # no token is longer: text above limit x this is refused without tokenizing it
_CHARS_PER_TOKEN = 4  # a remote model's prompt is estimated from its text
MiB = 1 << 20


def default_request_bytes(max_audio_seconds: float) -> int:
    """The default body limit: a 16-bit PCM WAV of `max_audio_seconds` at 48 kHz stereo, base64-encoded (4/3),
    plus 1 MiB for the rest of the request. So every common recording within the duration limit fits."""
    wav = 44 + max_audio_seconds * 48000 * 2 * 2
    return int(math.ceil(wav / 3) * 4) + MiB


class ServeConfig(BaseModel):
    """Everything `echo-agent serve` is started with. Each limit's flag is in its description."""

    model_config = ConfigDict(frozen=True)

    model_name: str = Field(description="id of the raw model in /v1/models")
    agent_name: str = "echo-agent"
    api_token: SecretStr | None = Field(None, description="require `Authorization: Bearer TOKEN` when set")
    allow_file_dirs: list[Path] = Field(default_factory=list, description="file:// audio only below these")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="--allowed-host: Host names accepted besides localhost and IP literals"
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="--allowed-origin: foreign origins (scheme://host:port) that may call"
    )
    max_request_bytes: int | None = Field(
        None, ge=1024, description="--max-request-mb: larger bodies get 413 (default: fits --max-audio-seconds)"
    )
    max_audio_seconds: float = Field(600.0, gt=0, description="--max-audio-seconds: longer clips get 400")
    max_audio_parts: int = Field(8, ge=1, description="--max-audio-parts: audio parts per request")
    max_tokens: int = Field(4096, ge=1, description="--max-tokens: the largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(
        4096, ge=16, description="--max-prompt-tokens: text tokens of each model call's prompt (audio not counted)"
    )
    max_request_seconds: float = Field(300.0, gt=0, description="--max-request-seconds: wall clock per request")
    read_timeout: float = Field(30.0, gt=0, description="--read-timeout: for headers and for each body chunk")
    max_concurrent_uploads: int = Field(2, ge=1, description="--max-concurrent-uploads: large bodies at once")
    max_storage_bytes: int | None = Field(
        4096 * MiB, ge=1, description="--max-storage-mb: uploads plus the thread database (None: no quota)"
    )
    max_batch: int = Field(16, ge=1, description="--max-batch: a local model's continuous batch (1: one at a time)")
    data_dir: Path = Field(description="uploads (by content hash) and the default thread database")
    db: Path | None = Field(None, description="SQLite thread checkpoints (default: DATA_DIR/threads.sqlite)")
    agent: AgentConfig = AgentConfig()

    @property
    def db_path(self) -> Path:
        return self.db or self.data_dir / "threads.sqlite"

    @property
    def request_bytes(self) -> int:
        return self.max_request_bytes or default_request_bytes(self.max_audio_seconds)


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


def _error_event(err: BaseException) -> str:
    """The last event of a stream that failed: an OpenAI-style error object (then `data: [DONE]`)."""
    if isinstance(err, EchoError):
        status, kind = _status_of(err)
        message = str(err)
    else:
        log.exception("unexpected error in a streamed request", exc_info=err)
        status, kind, message = 500, "internal_error", "internal error; the server log has the details"
    return _sse({"error": {"message": message, "type": kind, "code": status}})


# ---- the model as the server uses it ------------------------------------------------------------


class _Scope:
    """One request as its model calls see it (through a context variable, which LangGraph's node tasks inherit):
    the prompt tokens over its calls (None once a call did not report them), and its calls in flight, which are
    cancelled when the request fails. LangGraph lets a node that is running finish when its consumer is
    cancelled, so a client that left would otherwise still wait out the model call."""

    def __init__(self) -> None:
        self.prompt: int | None = 0
        self.calls: set[asyncio.Future[Generation]] = set()
        self.cancelled = False

    def add(self, gen: Generation) -> None:
        if self.prompt is not None:
            self.prompt = None if gen.prompt_ids is None else self.prompt + len(gen.prompt_ids)

    def cancel(self) -> None:
        self.cancelled = True
        for call in list(self.calls):
            call.cancel()


_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("echo_serve_scope", default=None)


class PromptTooLongError(RequestError):
    """A model call whose prompt is over `--max-prompt-tokens`."""


class _ServedBackend:
    """The backend as every request reaches it: clips are resampled off the event loop, each call's prompt is
    checked against `--max-prompt-tokens` before it is queued, and prompt tokens are counted for `usage`."""

    def __init__(self, inner: ModelBackend, store: AudioStore, max_prompt_tokens: int) -> None:
        self.inner = inner
        self.store = store
        self.max_prompt_tokens = max_prompt_tokens
        self.encoder: Any = getattr(inner, "encoder", None)  # local models only

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def sample_rate(self) -> int:
        return self.inner.sample_rate

    def count_text(self, text: str) -> int:
        """Tokens of `text`: exact with a local model's tokenizer; for a remote model, estimated at 4 characters a
        token (its server enforces its own context length)."""
        if self.encoder is None:
            return -(-len(text) // _CHARS_PER_TOKEN)
        if len(text.encode()) > self.max_prompt_tokens * _BYTES_PER_TOKEN:
            return len(text)  # surely over the limit; not worth tokenizing
        return len(self.encoder.encode_text(text))

    async def prompt_tokens(self, request: GenerationRequest, audio: AudioResolver) -> int:
        """The text tokens of a call's prompt, chat template included (exact for a local model, estimated for a
        remote one). Raises when they are over `--max-prompt-tokens`. Audio tokens are not counted: the audio
        limits and `--max-audio-parts` bound them, and a conversation with its 8 audio inputs must fit."""
        await self._warm(request, audio)
        if self.encoder is None:
            text = "".join(p["text"] for m in request.messages for p in m["content"] if p["type"] == "text")
            n = self.count_text(text)
        else:
            prompt = self.encoder.encode(request, audio)
            n = len(prompt.input_ids) - sum(len(a.input_ids) for a in prompt.audios)
        if n > self.max_prompt_tokens:
            raise PromptTooLongError(
                f"the prompt's text is {n} tokens, over the limit of {self.max_prompt_tokens} (--max-prompt-tokens); "
                "ask a shorter question, or start a new thread"
            )
        return n

    async def _warm(self, request: GenerationRequest, audio: AudioResolver) -> None:
        """Resampling a long clip is CPU work: done here in a thread, so the backend finds it cached."""
        clips = {p["clip"] for m in request.messages for p in m["content"] if p["type"] == "audio"}
        refs = [audio.clips[c] for c in clips if c in audio.clips]
        await asyncio.to_thread(lambda: [self.store.waveform(r, self.sample_rate) for r in refs])

    async def generate(
        self, request: GenerationRequest, audio: AudioResolver, on_delta: DeltaCallback | None = None
    ) -> Generation:
        if self.encoder is not None:
            await self.prompt_tokens(request, audio)
        else:  # a remote model bounds its own context; what a client sends was checked on arrival
            await self._warm(request, audio)
        scope = _SCOPE.get()
        if scope is None:
            return await self.inner.generate(request, audio, on_delta)
        if scope.cancelled:
            raise asyncio.CancelledError
        call = asyncio.ensure_future(self.inner.generate(request, audio, on_delta))
        scope.calls.add(call)
        try:
            gen = await call
        finally:
            scope.calls.discard(call)
        scope.add(gen)
        return gen


# ---- threads: a failed question leaves nothing ----------------------------------------------------


@dataclass
class _Mark:
    existed: bool
    rowids: tuple[int, int] | None  # (checkpoints, writes) before the run, for the SQLite saver


class _Threads:
    """Undoes what a failed question wrote to its thread. Questions are checkpointed once, at exit, and a run that
    fails (an error, a timeout, a client gone) is rolled back: a new thread is deleted, an older one loses the
    rows written after the run started (SQLite), so failed requests never grow the database."""

    def __init__(self, saver: BaseCheckpointSaver[Any]) -> None:
        self.saver = saver
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        self.sqlite = saver if isinstance(saver, AsyncSqliteSaver) else None

    async def mark(self, thread: str) -> _Mark:
        existed = await self.saver.aget_tuple({"configurable": {"thread_id": thread}}) is not None
        rowids = None
        if self.sqlite is not None and existed:
            async with self.sqlite.lock:
                rows = []
                for table in ("checkpoints", "writes"):
                    async with self.sqlite.conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {table}") as cur:
                        row = await cur.fetchone()
                        rows.append(int(row[0]) if row else 0)
                rowids = (rows[0], rows[1])
        return _Mark(existed, rowids)

    async def rollback(self, thread: str, mark: _Mark) -> None:
        if not mark.existed:
            await self.saver.adelete_thread(thread)
            return
        if self.sqlite is None or mark.rowids is None:
            log.warning("thread %s: a failed question could not be rolled back (not a SQLite checkpointer)", thread)
            return
        async with self.sqlite.lock:
            for table, rowid in zip(("checkpoints", "writes"), mark.rowids, strict=True):
                sql = f"DELETE FROM {table} WHERE thread_id = ? AND rowid > ?"
                await self.sqlite.conn.execute(sql, (thread, rowid))
            await self.sqlite.conn.commit()


async def _settled(err: BaseException) -> None:
    """LangGraph hands a cancelled run's unfinished exit (its last checkpoint write) to the caller in the
    CancelledError's args; wait for it, so a rollback comes after it."""
    for arg in getattr(err, "args", ()):
        if isinstance(arg, asyncio.Future):
            await asyncio.wait([arg])


# ---- shared state ---------------------------------------------------------------------------------


class _Server:
    """Shared state of one running server."""

    def __init__(self, backend: ModelBackend, config: ServeConfig, saver: BaseCheckpointSaver[Any]) -> None:
        from ..graphs.runner import batched

        self.config = config
        self.saver = saver
        self.threads = _Threads(saver)
        limits = AudioLimits(max_bytes=config.request_bytes, max_duration=config.max_audio_seconds)
        # Every clip is kept on disk (uploads by hash), so evicted samples reload: a small cache suffices, and a
        # small one bounds memory (a 10-minute 48 kHz clip is ~115 MB of float samples).
        self.store = AudioStore(limits, max_cached=16, max_cached_bytes=96 * MiB)
        self.quota = StorageQuota(config.max_storage_bytes, _mkdir(config.data_dir / "uploads"), self._db_bytes)
        self.intake = AudioIntake(
            self.store, config.data_dir / "uploads", list(config.allow_file_dirs),
            scratch_dir=config.data_dir / "scratch", quota=self.quota,
        )  # fmt: skip
        # A local model decodes concurrent requests in one continuous batch: a long request cannot hold it.
        self.backend = _ServedBackend(batched(backend, config.max_batch), self.store, config.max_prompt_tokens)
        self.guard = TextGuard(special_tokens(backend))
        self.uploads = asyncio.Semaphore(config.max_concurrent_uploads)
        # One compiled graph each for one-off questions and for persisted threads; sampling travels with each run.
        self._agents = {
            persistent: EchoAgent(self.backend, self.store, config.agent, checkpointer=saver if persistent else None)
            for persistent in (False, True)
        }
        # Held only while a question runs; weak values, so finished threads leave nothing behind.
        self._thread_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _db_bytes(self) -> int:
        db = self.config.db_path
        return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())

    def agent(self, persistent: bool) -> EchoAgent:
        """The agent; the persistent one checkpoints into the thread database."""
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
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > self.config.max_tokens:
            raise RequestError(f"max_tokens {asked} is over the limit of {self.config.max_tokens} (--max-tokens)")
        wanted = asked or min(self.config.agent.sampling.max_new_tokens, self.config.max_tokens)
        try:
            return SamplingParams(
                temperature=default_temperature if req.temperature is None else req.temperature,
                top_p=req.top_p or 1.0, top_k=max(0, req.top_k or 0), max_new_tokens=wanted,
                seed=default_seed if req.seed is None else req.seed,
            )  # fmt: skip
        except ValidationError as err:
            raise RequestError(f"bad sampling parameters: {err.errors()[0]['msg']}") from None

    def limits(self) -> dict[str, Any]:
        c = self.config
        return {
            "max_request_bytes": c.request_bytes, "max_audio_seconds": c.max_audio_seconds,
            "max_audio_parts": c.max_audio_parts, "max_tokens": c.max_tokens, "max_prompt_tokens": c.max_prompt_tokens,
            "max_request_seconds": c.max_request_seconds, "auth": c.api_token is not None,
            "thread_listing": c.api_token is not None,
        }  # fmt: skip


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---- the boundary: hosts, origins, content types, auth ---------------------------------------------


def _host_name(netloc: str) -> str:
    """`Host` or origin netloc -> lower-case host without the port (IPv6 keeps no brackets)."""
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")].lower() if "]" in netloc else netloc.lower()
    return netloc.rsplit(":", 1)[0].lower() if netloc.count(":") == 1 else netloc.lower()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Guard:
    """Pure ASGI middleware, so it also covers streamed responses and leaves disconnect handling intact.

    * `Host` must be localhost, an IP literal, the bound host or an `--allowed-host` (DNS rebinding needs a
      name that is none of these);
    * a request with an `Origin` must come from this very origin or an `--allowed-origin` (CSRF);
    * a POST body must not claim another type than `application/json` (a form or `text/plain` body is what a
      foreign page can send without a preflight; a page's request without a type still carries its `Origin`);
    * with an API key, everything but the page itself and its limits needs `Authorization: Bearer KEY`.
    """

    OPEN = ("/", "/favicon.ico", "/api/limits")

    def __init__(self, app: ASGIApp, config: ServeConfig, bound_host: str | None) -> None:
        self.app = app
        hosts = {"localhost", *(h.lower() for h in config.allowed_hosts)}
        if bound_host:
            hosts.add(_host_name(bound_host))
        self.hosts = hosts
        self.origins = {o.rstrip("/").lower() for o in config.allowed_origins}
        self.token = config.api_token.get_secret_value().encode() if config.api_token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refuse(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refuse(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if host and not self._host_ok(_host_name(host)):
            return _error(
                403, f"the Host {host[:100]!r} is not one this server answers to (add it with --allowed-host)",
                "permission_error",
            )  # fmt: skip
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, host, scope):
            return _error(
                403, f"cross-origin request from {origin[:100]!r} refused (allow it with --allowed-origin)",
                "permission_error",
            )  # fmt: skip
        if scope["method"] == "POST" and "content-type" in headers:  # none at all: a client that sets no headers
            ctype = headers["content-type"].split(";")[0].strip().lower()
            if ctype != "application/json":
                return _error(415, "send the request body as Content-Type: application/json", "invalid_request_error")
        if self.token is not None and scope["path"] not in self.OPEN:
            given = headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, b"Bearer " + self.token):
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        return None

    def _host_ok(self, name: str) -> bool:
        return "*" in self.hosts or name in self.hosts or _is_ip(name)

    def _origin_ok(self, origin: str, host: str, scope: Scope) -> bool:
        o = origin.rstrip("/").lower()
        if "*" in self.origins or o in self.origins:
            return True
        parsed = urllib.parse.urlsplit(o)
        scheme = scope.get("scheme", "http")
        return bool(host) and parsed.scheme == scheme and parsed.netloc == host.lower()


# ---- the app --------------------------------------------------------------------------------------


def create_app(
    backend: ModelBackend, config: ServeConfig, *, saver: BaseCheckpointSaver[Any] | None = None,
    bound_host: str | None = None,
) -> FastAPI:  # fmt: skip
    """The FastAPI app. Without `saver`, it opens an `AsyncSqliteSaver` on `config.db_path` for its lifetime.
    `bound_host` is the address the server listens on; its name is accepted in `Host` headers."""
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
    app.add_middleware(_Guard, config=config, bound_host=bound_host)

    @app.exception_handler(Exception)
    async def internal(_request: Request, err: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=err)
        return _error(500, "internal error; the server log has the details", "internal_error")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(files("echo_agent").joinpath("assets/web/index.html").read_text())

    @app.get("/api/limits")
    async def limits() -> dict[str, Any]:
        return holder["s"].limits()

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
        deadline = asyncio.get_running_loop().time() + config.max_request_seconds
        conv: Conversation | None = None
        handed = False  # a stream deletes the request's scratch files itself
        try:
            async with asyncio.timeout_at(deadline):
                req, conv = await _intake(server, request)
                if req.stream:
                    stream = await _start_stream(server, req, conv, deadline)
                    handed = True
                    return StreamingResponse(stream, media_type="text/event-stream")
                return await _unless_disconnected(request, _complete(server, req, conv))
        except TimeoutError:
            return _error(*_timeout(config))
        except EchoError as err:
            status, kind = _status_of(err)
            return _error(status, str(err), kind)
        finally:
            if conv is not None and not handed:
                _drop(conv)

    @app.get("/api/threads")
    async def threads() -> Response:
        if config.api_token is None:
            return _error(
                403, "listing threads needs an API key (start serve with --auth-token-env VAR); a thread opens by "
                "its id", "permission_error",
            )  # fmt: skip
        return JSONResponse({"threads": await _list_threads(holder["s"].saver)})

    @app.get("/api/threads/{thread_id}")
    async def thread(thread_id: str) -> Response:
        agent = holder["s"].agent(persistent=True)
        snap = await agent.graph.aget_state({"configurable": {"thread_id": thread_id}})
        if not snap or not snap.values:
            return _error(404, f"no thread {thread_id[:80]!r}", "not_found_error")
        return JSONResponse(thread_view(thread_id, dict(snap.values)))

    @app.get("/api/audio/{sha256}", response_model=None)
    async def audio(sha256: str) -> Response:
        path = holder["s"].intake.upload_path(sha256)
        if path is None:
            return _error(404, "no such clip", "not_found_error")
        return FileResponse(path, media_type="application/octet-stream")

    return app


def _timeout(config: ServeConfig) -> tuple[int, str, str]:
    return 504, f"the request ran past the limit of {config.max_request_seconds:g} s (--max-request-seconds)", "timeout"


def _drop(conv: Conversation) -> None:
    for p in conv.scratch:
        with contextlib.suppress(OSError):
            p.unlink()
    if conv.large:
        _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS after a large request (glibc keeps it otherwise, so a server that once
    decoded a 10-minute clip would keep its peak for good)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None


async def _intake(server: _Server, request: Request) -> tuple[ChatRequest, Conversation]:
    """Read, validate and decode a request. A large body holds one of `--max-concurrent-uploads` slots until its
    audio is decoded, so memory is bounded however many clients upload at once."""
    config = server.config
    length = request.headers.get("content-length")
    large = length is None or not length.isdigit() or int(length) > _LARGE_BODY
    slot: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()
    if large:
        if server.uploads.locked():
            raise RequestError(
                f"{config.max_concurrent_uploads} uploads are in progress, the most this server takes at once "
                "(--max-concurrent-uploads); retry shortly", 429, "rate_limit_error",
            )  # fmt: skip
        slot = server.uploads
    async with slot:
        body = await _read_body(request, config.request_bytes, config.read_timeout)
        try:
            # Long base64 strings are decoded from the body's bytes into scratch files (`parse_body`): the body,
            # its text and the audio are never all in memory at once. Parsing is CPU work, done off the event loop.
            parsed, blobs = await asyncio.to_thread(parse_body, body, server.intake.scratch_dir)
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise RequestError(f"invalid request: the body is not JSON ({str(err)[:200]})") from None
        del body
        try:
            return await _to_request(server, parsed, large)
        finally:
            for blob in blobs:  # the files of blobs no audio part took (a refused request)
                blob.discard()


async def _to_request(server: _Server, parsed: Any, large: bool) -> tuple[ChatRequest, Conversation]:
    config = server.config
    try:
        req = ChatRequest.model_validate(parsed)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RequestError(f"invalid request: {where}: {first['msg']}"[:500]) from None
    del parsed
    if req.model not in (config.model_name, config.agent_name):
        raise RequestError(
            f"the model {req.model[:100]!r} does not exist; this server has {config.model_name!r} and "
            f"{config.agent_name!r}", 404, "not_found_error",
        )  # fmt: skip
    if req.echo is not None:
        for choice in req.echo.choices or []:
            server.guard.check(choice, "echo.choices")
    keep = req.model == config.agent_name  # the agent's clips outlive the request (threads); the raw model's not
    if keep and req.echo is not None and req.echo.thread_id is not None:
        server.quota.check()
    conv = await asyncio.to_thread(
        to_conversation,
        req.messages,
        server.intake,
        guard=server.guard,
        keep=keep,
        max_audio_parts=config.max_audio_parts,
    )  # fmt: skip  (decoding is CPU work)
    req.messages = []  # decoded: the base64 text is no longer needed
    conv.large = large
    return req, conv


async def _read_body(request: Request, limit: int, read_timeout: float) -> bytearray:
    """The body, refused past `limit` bytes, when a chunk takes longer than `read_timeout` to come, or when it
    averages under 64 KiB/s after `read_timeout` of grace (a slow client cannot hold a slot for long)."""
    too_big = RequestError(
        f"the request body is over the limit of {limit} bytes (--max-request-mb)", 413, "request_too_large"
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    # Sized up front when the length is known: growing a 150 MB buffer chunk by chunk copies it on every resize.
    body = bytearray(int(length)) if length is not None and length.isdigit() else bytearray()
    size = 0
    start = time.monotonic()
    chunks = request.stream().__aiter__()

    async def next_chunk() -> bytes | None:
        # The end comes back as None, not as StopAsyncIteration through `wait_for`: a task that stores an
        # exception keeps its traceback, whose frames (this one among them) would keep the body alive until the
        # cyclic GC ran.
        try:
            return await chunks.__anext__()
        except StopAsyncIteration:
            return None

    while True:
        try:
            chunk = await asyncio.wait_for(next_chunk(), read_timeout)
        except TimeoutError:
            raise RequestError(
                f"the request body stalled for over {read_timeout:g} s (--read-timeout)", 408, "timeout"
            ) from None
        except ClientDisconnect:
            raise RequestError("the client disconnected while sending the request", 400) from None
        if chunk is None:
            break
        if size + len(chunk) > len(body):  # no length given, or more than it said
            if size + len(chunk) > limit:
                raise too_big
            body += b"\0" * (size + len(chunk) - len(body))
        body[size : size + len(chunk)] = chunk
        size += len(chunk)
        if time.monotonic() - start > read_timeout + size / _MIN_BODY_RATE:
            raise RequestError(
                f"the request body arrived slower than {_MIN_BODY_RATE // 1024} KiB/s (--read-timeout)", 408, "timeout"
            )
    if size < len(body):  # fewer bytes than its Content-Length said (h11 refuses that; kept for other servers)
        del body[size:]
    return body


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it (and so the model call) when the client goes away."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return _error(400, "the client disconnected", "invalid_request_error")  # nobody reads it


async def _complete(server: _Server, req: ChatRequest, conv: Conversation) -> Response:
    if req.model == server.config.agent_name:
        return await _agent_call(server, req, conv)
    return await _raw_call(server, req, conv)


async def _start_stream(server: _Server, req: ChatRequest, conv: Conversation, deadline: float) -> AsyncIterator[str]:
    """Validate a streamed request before its 200 goes out (bad input is a clean 4xx), then hand back the stream.
    The stream ends with an error event and `[DONE]` whatever happens, and deletes the request's scratch files."""
    if req.model == server.config.agent_name:
        inner = await _agent_stream_prepared(server, req, conv)
    else:
        inner = await _raw_stream_prepared(server, req, conv)

    async def stream() -> AsyncIterator[str]:
        try:
            async with asyncio.timeout_at(deadline):
                async for event in inner:
                    yield event
        except TimeoutError:
            status, message, kind = _timeout(server.config)
            yield _sse({"error": {"message": message, "type": kind, "code": status}})
        except Exception as err:  # a stream must end with an error event, never be cut
            yield _error_event(err)
        finally:
            _drop(conv)
            with contextlib.suppress(Exception):
                await inner.aclose()  # type: ignore[attr-defined]
        yield "data: [DONE]\n\n"

    return stream()


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
    if req.continue_final_message and len(conv.messages) < 2:
        raise RequestError("continue_final_message=true needs a message before the final assistant one")
    for word in req.bad_words or []:
        server.guard.check(word, "bad_words")
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


async def _raw_prepare(
    server: _Server, req: ChatRequest, conv: Conversation
) -> tuple[GenerationRequest, AudioResolver]:
    gen_req = _raw_request(server, req, conv)
    audio = AudioResolver(server.store, conv.clips)
    try:
        await server.backend.prompt_tokens(gen_req, audio)  # a clean 400 before anything runs
    except EchoError:
        raise
    except Exception as err:  # the client built these messages; the chat template could not render them
        raise RequestError(f"the model's chat template cannot render these messages: {str(err)[:200]}") from None
    return gen_req, audio


async def _raw_call(server: _Server, req: ChatRequest, conv: Conversation) -> Response:
    gen_req, audio = await _raw_prepare(server, req, conv)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
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
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": req.model, "choices": [choice],
        "usage": _usage(None if gen.prompt_ids is None else len(gen.prompt_ids), len(gen.token_ids)),
    }  # fmt: skip
    if req.return_token_ids:
        choice["token_ids"] = gen.token_ids
        body["prompt_token_ids"] = gen.prompt_ids
    return JSONResponse(body)


def _usage(prompt: int | None, completion: int) -> dict[str, int | None]:
    """OpenAI's usage; `prompt_tokens` is null when the backend did not report the prompt, never a false 0."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": None if prompt is None else prompt + completion,
    }


async def _raw_stream_prepared(server: _Server, req: ChatRequest, conv: Conversation) -> AsyncIterator[str]:
    gen_req, audio = await _raw_prepare(server, req, conv)
    return _raw_stream(server, req, gen_req, audio, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))


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
    try:
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
        gen = task.result()  # its error ends the stream with an error event
    finally:
        task.cancel()  # a client that left (or a timeout) stops the model call
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
    # As OpenAI and vLLM do with `stream_options.include_usage`; sent always (clients ignore fields they lack).
    last["usage"] = _usage(None if gen.prompt_ids is None else len(gen.prompt_ids), len(gen.token_ids))
    yield _sse(last)


# ---- the agent ------------------------------------------------------------------------------


@dataclass
class _AgentRun:
    question: str
    choices: list[str] | None
    new: dict[str, AudioRef] | None
    clips: dict[str, Any]
    thread: str | None
    sampling: SamplingParams


def _clip_table(state_clips: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        cid: {"sha256": ref["sha256"], "duration": ref["frames"] / ref["sample_rate"]}
        for cid, ref in state_clips.items()
    }


async def _agent_inputs(server: _Server, req: ChatRequest, conv: Conversation) -> _AgentRun:
    opts = req.echo or EchoOptions()
    thread = opts.thread_id
    defaults = server.config.agent.sampling
    sampling = server.sampling(req, default_temperature=defaults.temperature, default_seed=defaults.seed)
    question = last_user_text(conv.messages)
    if not question:
        raise RequestError("the last user message has no question text")
    choices = opts.choices
    if choices is None:
        question, parsed = split_choices(question)
        choices = parsed or None
    asked = server.backend.count_text(question + "".join(choices or []))
    if asked > server.config.max_prompt_tokens:
        raise PromptTooLongError(
            f"the question and its choices are {asked} tokens, over the limit of {server.config.max_prompt_tokens} "
            "(--max-prompt-tokens)"
        )
    known: dict[str, Any] = {}
    if thread is not None:
        snap = await server.agent(True).graph.aget_state({"configurable": {"thread_id": thread}})
        known = dict((snap.values or {}).get("clips", {})) if snap else {}
    shas = {ref["sha256"] for ref in known.values()}
    new: dict[str, AudioRef] = {}
    for cid in conv.order:
        ref = conv.clips[cid]
        if ref.sha256 in shas:
            continue
        shas.add(ref.sha256)
        new[next_clip_name([*known, *new])] = ref
    if not known and not new:
        raise RequestError("no audio: send the clip as an input_audio or audio_url part")
    clips = {**known, **{c: r.model_dump() for c, r in new.items()}}
    return _AgentRun(question, choices, new or None, clips, thread, sampling)


def _graph_args(server: _Server, run: _AgentRun) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    agent = server.agent(persistent=run.thread is not None)
    inputs = new_question(run.question, {c: r.model_dump() for c, r in (run.new or {}).items()}, run.choices)
    kwargs: dict[str, Any] = {"context": EchoContext(sampling=run.sampling)}
    config: dict[str, Any] = {}
    if run.thread is not None:
        config = {"configurable": {"thread_id": run.thread}}
        kwargs["durability"] = "exit"  # one checkpoint per question, written when it is done
    return agent.graph, {"input": inputs, "config": config}, kwargs


async def _persisted(
    server: _Server, thread: str | None, prepare: Callable[[], Awaitable[_AgentRun]],
    body: Callable[[_AgentRun], AsyncIterator[str]],
) -> AsyncIterator[str]:  # fmt: skip
    """Under the thread's lock, read the thread (`prepare`) and run `body`; if the run fails in any way (an error,
    the timeout, the client gone), roll the thread back to before it."""
    scope = _SCOPE.get()
    async with server.thread_lock(thread):
        run = await prepare()
        mark = None
        if thread is not None:
            server.quota.check()
            mark = await server.threads.mark(thread)
        try:
            async for event in body(run):
                yield event
        except BaseException as err:
            if scope is not None:
                scope.cancel()  # the model calls still in flight
            await _settled(err)
            if thread is not None and mark is not None:
                await asyncio.shield(server.threads.rollback(thread, mark))
            raise


async def _agent_call(server: _Server, req: ChatRequest, conv: Conversation) -> Response:
    usage = _Scope()
    _SCOPE.set(usage)
    state: dict[str, Any] = {}
    runs: list[_AgentRun] = []

    async def body(run: _AgentRun) -> AsyncIterator[str]:
        runs.append(run)
        graph, args, kwargs = _graph_args(server, run)
        state.update(await graph.ainvoke(args["input"], args["config"], **kwargs))
        yield ""

    thread = req.echo.thread_id if req.echo else None
    async for _ in _persisted(server, thread, lambda: _agent_inputs(server, req, conv), body):
        pass
    result = Result.from_state(state)
    echo = _echo_body(result, thread, runs[0].clips)
    message = {"role": "assistant", "content": result.answer or "", "echo": echo}
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": req.model, "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
        "usage": _usage(usage.prompt, result.generated_tokens),
    })  # fmt: skip


def _echo_body(result: Result, thread: str | None, clips: dict[str, Any]) -> dict[str, Any]:
    return {
        "thread_id": thread, "answer": result.answer, "choice": result.choice, "status": result.status,
        "reasoning": result.text, "listens": [c.model_dump() for c in result.listens],
        "verdict": result.verdict.model_dump() if result.verdict else None,
        "generated_tokens": result.generated_tokens, "clips": _clip_table(clips),
    }  # fmt: skip


async def _agent_stream_prepared(server: _Server, req: ChatRequest, conv: Conversation) -> AsyncIterator[str]:
    # Validated here, before the 200; the stream takes the thread's lock itself (a generator that never starts
    # must not hold it) and reads the thread again under it.
    await _agent_inputs(server, req, conv)
    return _agent_stream(server, req, conv)


async def _agent_stream(server: _Server, req: ChatRequest, conv: Conversation) -> AsyncIterator[str]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                     **extra})  # fmt: skip

    usage = _Scope()
    _SCOPE.set(usage)

    async def body(run: _AgentRun) -> AsyncIterator[str]:
        graph, args, kwargs = _graph_args(server, run)
        yield chunk({"role": "assistant", "content": "", "echo": {"type": "start", "thread_id": run.thread,
                                                                  "clips": _clip_table(run.clips)}})  # fmt: skip
        final: dict[str, Any] = {}
        async for mode, event in graph.astream(
            args["input"], args["config"], stream_mode=["custom", "values"], **kwargs
        ):
            if mode == "values":
                final = event
                continue
            if event["type"] == "text":
                yield chunk({"reasoning_content": event["delta"]})
            else:
                yield chunk({"echo": event})
        result = Result.from_state(final)
        yield chunk({"content": result.answer or ""})
        yield chunk(
            {"echo": {"type": "result", **_echo_body(result, run.thread, run.clips)}}, finish="stop",
            usage=_usage(usage.prompt, result.generated_tokens),
        )  # fmt: skip

    thread = req.echo.thread_id if req.echo else None
    # The thread is read again under its lock: it may have moved on since the request was validated.
    async for event in _persisted(server, thread, lambda: _agent_inputs(server, req, conv), body):
        yield event


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
    `items` interleaves reasoning text and spans in the order they happened. `choices` and `choice` are the last
    question's: its choices and the one its answer selects (null: none of them)."""
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
            "status": state.get("status"), "choices": list(state.get("choices") or []),
            "choice": state.get("choice")}  # fmt: skip


def accepted_hosts(config: ServeConfig, bound_host: str) -> Iterable[str]:
    """The Host names `serve` answers to besides IP literals (for its start-up line)."""
    return sorted({"localhost", _host_name(bound_host), *config.allowed_hosts} - {""})
