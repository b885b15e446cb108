"""The wire format of `echo-agent serve`: OpenAI chat-completions requests in, our conversation out.

Requests are validated with pydantic at the boundary, and everything a client sends is refused there with a
4xx when it cannot be served: special tokens in text (they would be read as model structure, never as text),
audio in a tool message, malformed `tool_calls`, a seed outside 64 bits, `n > 1`.

Audio content parts become clips in the shared `AudioStore`. Uploads for the agent (`input_audio`, `audio_url`
with a `data:` URL) are validated, then kept under the server's data directory by content hash, so a chat
thread can be resumed after a restart; uploads for the raw model only live for their request (a remote
`OpenAIBackend` sends every re-listened slice again, which must not fill the disk). `file://` URLs are read
only below directories the operator allowed (`--allow-file-dir`): the file is opened once and the path of the
open descriptor is checked, so a symlink swapped in after the check cannot redirect the read, and every refused
path gets the same answer, so the server is no oracle for what exists elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import stat
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..audio import AudioRef, AudioStore
from ..errors import AudioTooLargeError, AudioTooLongError, EchoError
from ..messages import Message, Origin, Part, ToolCall, audio_part, text_part

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what torch's generators accept (model call i samples with seed + i)


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
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=1024)
    stream: bool = False
    n: int | None = None
    temperature: float | None = Field(None, ge=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    # Bounded: every distinct set of stop strings or bad words costs a pass over the vocabulary.
    stop: str | list[str] | None = Field(None, max_length=8)
    tools: list[dict[str, Any]] | None = Field(None, max_length=64)
    logprobs: bool = False
    # vLLM's extensions, honoured so that `OpenAIBackend` can use this server as a remote model.
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    bad_words: list[str] | None = Field(None, max_length=64)
    echo: EchoOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(f"n={n} is not supported: this server returns one choice per request (send n requests)")
        return n

    @field_validator("stop", "bad_words")
    @classmethod
    def _short_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        for s in [value] if isinstance(value, str) else value or []:
            if not s or len(s) > 256:
                raise ValueError("each stop string and bad word must be 1-256 characters")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# Any `<|name|>` is the shape of a Qwen-family special token; refused whatever the model's vocabulary.
_SPECIAL_SHAPE = r"<\|[^<>|\s]{1,64}\|>"


class TextGuard:
    """Refuses special tokens in client text: they would be read as structure (an audio slot, the end of a turn),
    never as text. `tokens` are the model's own special tokens (when it is local); `<|...|>` is refused always."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        literal = sorted({t for t in tokens if t}, key=len, reverse=True)
        self._re = re.compile("|".join([_SPECIAL_SHAPE, *map(re.escape, literal)]))

    def check(self, text: str, where: str) -> None:
        m = self._re.search(text)
        if m is not None:
            raise RequestError(
                f"{where}: the text contains the special token {m.group(0)[:70]!r}, which this server refuses in "
                "text (send audio as input_audio or audio_url parts)"
            )


# ---- the body: long base64 strings are decoded straight from the raw bytes ----------------------------------

_BLOB_MIN = 64 * 1024  # base64 strings at least this long are lifted out of the body before it is parsed
_BLOB_RE = re.compile(
    rb'"(data:[\w/+.-]{0,100}(?:;[\w=.-]{1,100}){0,8};base64,)?([A-Za-z0-9+/]{%d,}={0,2})"' % _BLOB_MIN
)
_BLOB_MARK = "\x00echo-blob:"


class Blob:
    """Audio bytes lifted out of a request body: a long base64 string (or `data:` URL) decoded straight from the
    body's bytes into a file of its own in the scratch folder, a chunk at a time. So the body, a parsed copy of its
    text and the decoded audio are never in memory together; the audio is then decoded from the file. The part
    that uses it takes the file (`take`); `discard` deletes a file that nobody took."""

    __slots__ = ("_path", "prefix")

    def __init__(self, path: Path, prefix: str) -> None:
        self._path: Path | None = path
        self.prefix = prefix  # "data:audio/wav;base64," for a data: URL, "" for a bare base64 string

    def take(self) -> Path:
        """The file, now the caller's to keep or delete."""
        if self._path is None:
            raise RequestError("an audio part was used twice")
        path, self._path = self._path, None
        return path

    def discard(self) -> None:
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            self._path = None

    def text(self) -> str:
        """The string as it was sent (a long base64 string somewhere else than an audio field)."""
        path = self.take()
        try:
            return self.prefix + base64.b64encode(path.read_bytes()).decode()
        finally:
            with contextlib.suppress(OSError):
                path.unlink()


_CHUNK = 4 << 20  # base64 characters decoded at a time (a multiple of 4: every chunk but the last is unpadded)


def _decode_to_file(text: memoryview, folder: Path) -> Path | None:
    """Decode a base64 string into a new file in `folder`; None (and no file) when it is not valid base64."""
    fd, name = tempfile.mkstemp(dir=folder, prefix="blob.")
    try:
        with os.fdopen(fd, "wb") as f:
            for i in range(0, len(text), _CHUNK):
                f.write(binascii.a2b_base64(text[i : i + _CHUNK], strict_mode=True))
    except binascii.Error:
        os.unlink(name)
        return None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


def parse_body(body: bytearray, folder: Path) -> tuple[Any, list[Blob]]:
    """A JSON request body as Python values, and the blobs lifted out of it. Each long, plain base64 string (a
    complete JSON string of base64 characters: no escapes, so its text is exactly its value) is decoded from the
    body's bytes into a file in `folder` first; in an audio field (`input_audio.data`, `audio_url.url`) it stays a
    `Blob`, anywhere else it becomes its text again. On an error no blob file is left behind."""
    blobs: list[Blob] = []
    small = bytearray()
    last = 0
    try:
        for m in _BLOB_RE.finditer(body):
            if (m.end(2) - m.start(2)) % 4:
                continue  # not base64 (left in place; it is refused as bad base64 where it is used)
            path = _decode_to_file(memoryview(body)[m.start(2) : m.end(2)], folder)
            if path is None:
                continue
            small += body[last : m.start()]
            small += b'"\\u0000echo-blob:%d"' % len(blobs)
            last = m.end()
            blobs.append(Blob(path, (m.group(1) or b"").decode()))
        if not blobs:
            return json.loads(body), []
        small += body[last:]
        return _place(json.loads(small), blobs, None), blobs
    except BaseException:
        for b in blobs:
            b.discard()
        raise


def _place(value: Any, blobs: list[Blob], key: str | None, parent: str | None = None) -> Any:
    if isinstance(value, str) and value.startswith(_BLOB_MARK):
        index = value[len(_BLOB_MARK) :]
        if not index.isdigit() or int(index) >= len(blobs):
            return value
        blob = blobs[int(index)]
        audio = (key == "data" and parent == "input_audio") or (key == "url" and parent == "audio_url")
        audio = audio or (key == "audio_url" and parent is None)
        return blob if audio else blob.text()
    if isinstance(value, dict):
        return {k: _place(v, blobs, k, key) for k, v in value.items()}
    if isinstance(value, list):
        return [_place(v, blobs, None, parent) for v in value]
    return value


_DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*);base64,(?P<data>.*)$", re.DOTALL)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PART = ".part"  # suffix of upload files being written; never served, swept at start


class StorageQuota:
    """Bytes kept on disk by the server (uploads plus whatever `extra` reports, e.g. the chat database), against
    a limit. Uploads are counted as they are written, so the directory is scanned only once, at start."""

    def __init__(self, limit: int | None, upload_dir: Path, extra: Callable[[], int] = lambda: 0) -> None:
        self.limit = limit
        self._extra = extra
        self._lock = threading.Lock()
        self._uploads = sum(p.stat().st_size for p in upload_dir.iterdir() if p.is_file())

    def used(self) -> int:
        with self._lock:
            return self._uploads + self._extra()

    def check(self, more: int = 0) -> None:
        """Raise a 507 when `more` bytes would not fit."""
        if self.limit is None:
            return
        used = self.used()
        if used + more > self.limit:
            raise RequestError(
                f"the server's storage is full: {used} bytes used of {self.limit} (--max-storage-mb); "
                "delete old threads and uploads or raise the limit", 507, "insufficient_storage",
            )  # fmt: skip

    def add(self, n: int) -> None:
        with self._lock:
            self._uploads += n


def _audio_limit_hint(err: EchoError) -> EchoError:
    """The store's limit errors, with the `serve` flag that changes the limit."""
    if isinstance(err, AudioTooLongError):
        return RequestError(f"{err} (--max-audio-seconds)")
    if isinstance(err, AudioTooLargeError):
        return RequestError(f"{err} (--max-request-mb)", 413, "request_too_large")
    return err


class AudioIntake:
    """Turns audio content parts into validated clips (`AudioRef`s with a file path)."""

    def __init__(
        self, store: AudioStore, upload_dir: Path, allowed_dirs: list[Path], *, scratch_dir: Path | None = None,
        quota: StorageQuota | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.upload_dir = upload_dir
        self.scratch_dir = scratch_dir or upload_dir.parent / "scratch"
        self.allowed_dirs = [d.resolve() for d in allowed_dirs]
        for d in (upload_dir, self.scratch_dir):
            d.mkdir(parents=True, exist_ok=True)
        for p in [*upload_dir.glob(f"*{_PART}"), *self.scratch_dir.iterdir()]:  # left by a killed server
            with contextlib.suppress(OSError):
                p.unlink()
        self.quota = quota or StorageQuota(None, upload_dir)

    def upload_path(self, sha: str) -> Path | None:
        """The kept upload with this content hash, if there is one (the hash is checked, not trusted)."""
        if not _SHA_RE.match(sha):
            return None
        p = self.upload_dir / sha
        return p if p.is_file() else None

    def from_bytes(self, data: bytes, scratch: list[Path] | None = None) -> AudioRef:
        """Validate `data` and keep it on disk: under its hash for good, or (with `scratch`) in a file of its own
        that the caller deletes after the request (its path is appended to `scratch`)."""
        try:
            ref = self.store.load_bytes(data, name="uploaded audio")  # validates: size, duration, decodable
        except EchoError as err:
            raise _audio_limit_hint(err) from None
        if scratch is not None:
            path = self._write(self.scratch_dir, data, f"{ref.sha256[:16]}.", durable=False)
            scratch.append(path)
            return self.store.load(path)
        path = self.upload_dir / ref.sha256
        if not path.exists():
            self.quota.check(len(data))
            # A name of its own per writer, then an atomic rename: concurrent uploads of one clip never share a
            # temporary file, and a crash never leaves a half-written upload under its hash.
            tmp = self._write(self.upload_dir, data, f".{ref.sha256[:16]}.", _PART)
            os.replace(tmp, path)
            self.quota.add(len(data))
        return self.store.load(path)

    def from_blob(self, blob: Blob, scratch: list[Path] | None = None) -> AudioRef:
        """As `from_bytes`, for audio already decoded into a file of the scratch folder: it is validated and
        decoded from that file, then kept under its hash (renamed, not copied) or, with `scratch`, left for the
        caller to delete."""
        path = blob.take()
        try:
            ref = self.store.load(path, name="uploaded audio")
        except BaseException as err:
            with contextlib.suppress(OSError):
                path.unlink()
            if isinstance(err, EchoError):
                raise _audio_limit_hint(err) from None
            raise
        if scratch is not None:
            scratch.append(path)
            return ref
        dest = self.upload_dir / ref.sha256
        try:
            if not dest.exists():
                size = path.stat().st_size
                self.quota.check(size)
                with open(path, "rb") as f:  # a kept upload outlives the process (threads resume after a restart)
                    os.fsync(f.fileno())
                os.replace(path, dest)  # atomic: a crash never leaves a half-written upload under its hash
                self.quota.add(size)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        return self.store.load(dest)

    @staticmethod
    def _write(folder: Path, data: bytes, prefix: str, suffix: str = "", durable: bool = True) -> Path:
        fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if durable:  # a kept upload outlives the process (threads resume after a restart)
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return Path(name)

    def read_file_url(self, url: str) -> bytes:
        """The bytes of a `file://` URL below an allowed directory. The file is opened once; the path of the open
        descriptor is checked, then read from that descriptor, so a symlink swapped in between cannot redirect
        the read. Every refused path (missing, outside, not a regular file, unreadable) gets the same answer."""
        if not self.allowed_dirs:
            raise RequestError("file:// audio URLs are disabled on this server (start it with --allow-file-dir)", 403)
        parsed = urllib.parse.urlparse(url)
        raw = urllib.parse.unquote(parsed.path)
        shown = raw.replace("\0", "\\0")[:300]
        refused = RequestError(
            f"file://{shown}: not a readable file, or outside the directories this server may read (--allow-file-dir)",
            403, "permission_error",
        )  # fmt: skip
        if parsed.netloc not in ("", "localhost") or "\0" in raw or not raw.startswith("/"):
            raise refused
        # O_NONBLOCK: opening a FIFO must not hang the server (it is refused below as not a regular file).
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
        try:
            fd = os.open(raw, flags)
        except (OSError, ValueError):
            raise refused from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not self._inside(self._fd_path(fd, raw, st)):
                raise refused
            limit = self.store.limits.max_bytes
            if st.st_size > limit:
                raise RequestError(
                    f"file://{shown}: {st.st_size} bytes is over the limit of {limit} bytes (--max-request-mb)", 413,
                    "request_too_large",
                )  # fmt: skip
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, 1 << 20):
                size += len(chunk)
                if size > limit:  # the file grew after fstat
                    raise RequestError(f"file://{shown}: over the limit of {limit} bytes (--max-request-mb)", 413)
                chunks.append(chunk)
        except OSError:
            raise refused from None
        finally:
            os.close(fd)
        return b"".join(chunks)

    def from_file_url(self, url: str, scratch: list[Path] | None = None) -> AudioRef:
        """The clip at a `file://` URL (see `read_file_url`), kept as an upload is."""
        return self.from_bytes(self.read_file_url(url), scratch)

    def _inside(self, path: str | None) -> bool:
        return path is not None and any(Path(path).is_relative_to(d) for d in self.allowed_dirs)

    @staticmethod
    def _fd_path(fd: int, raw: str, st: os.stat_result) -> str | None:
        """The real path of the open file: from /proc on Linux; elsewhere the resolved path, accepted only when it
        is the very file that was opened (same device and inode)."""
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc):
            return os.readlink(proc)
        try:
            real = os.path.realpath(raw, strict=True)
            now = os.stat(real)
        except OSError:
            return None
        return real if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) else None

    def part_to_ref(self, part: dict[str, Any], scratch: list[Path] | None = None) -> AudioRef:
        kind = part.get("type")
        if kind == "input_audio":
            spec = part.get("input_audio")
            if not isinstance(spec, dict) or not isinstance(spec.get("data"), (str, Blob)):
                raise RequestError("input_audio parts need {'data': BASE64, 'format': 'wav'}")
            raw = spec.pop("data")  # popped: the request no longer holds it once it is decoded
            if isinstance(raw, Blob):
                if raw.prefix:
                    raise RequestError("input_audio data must be plain base64, not a data: URL")
                return self.from_blob(raw, scratch)
            return self.from_bytes(_b64(raw), scratch)
        spec = part.get("audio_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if isinstance(url, Blob):
            if not url.prefix:
                raise RequestError("audio_url must be a data: or file:// URL, not bare base64")
            return self.from_blob(url, scratch)
        if not isinstance(url, str):
            raise RequestError("audio_url parts need {'url': 'data:...' or 'file://...'}")
        if url.startswith("data:"):
            m = _DATA_URL_RE.match(url)
            if m is None:
                raise RequestError("audio_url data: URLs must be base64 (data:audio/wav;base64,...)")
            data = _b64(m.group("data"))
            del m, url
            if isinstance(spec, dict):
                spec.pop("url", None)
            else:
                part.pop("audio_url", None)
            return self.from_bytes(data, scratch)
        if url.startswith("file:"):
            return self.from_file_url(url, scratch)
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
    scratch: list[Path] = Field(default_factory=list, description="request-scoped upload files, deleted after it")
    large: bool = Field(False, description="its body took an upload slot (the server trims its heap after it)")

    def text(self) -> str:
        """All text of the conversation, for counting prompt tokens."""
        return "".join(p["text"] for m in self.messages for p in m["content"] if p["type"] == "text")


def _content_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise RequestError(f"{where}: message content must be a string or a list of content parts")


def _tool_calls(raw: Any, where: str) -> list[ToolCall]:
    """OpenAI `tool_calls`: a list of {id, type: function, function: {name, arguments: JSON text}}."""
    if not isinstance(raw, list):
        raise RequestError(f"{where}.tool_calls must be a list of tool-call objects")
    calls: list[ToolCall] = []
    for j, c in enumerate(raw):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"{where}.tool_calls[{j}] must be an object with a function {{name, arguments}}")
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            raise RequestError(f"{where}.tool_calls[{j}].function.arguments must be a string of JSON")
        cid = c.get("id", "")
        if not isinstance(cid, str):
            raise RequestError(f"{where}.tool_calls[{j}].id must be a string")
        calls.append({"id": cid, "name": fn["name"], "arguments": args})
    return calls


def to_conversation(
    raw: list[dict[str, Any]], intake: AudioIntake, *, guard: TextGuard | None = None, keep: bool = True,
    max_audio_parts: int | None = None,
) -> Conversation:  # fmt: skip
    """OpenAI messages -> our messages. Each distinct audio becomes one clip, named by its content hash. With
    `keep=False` uploads live only for the request: their files are listed in `scratch` for the caller to delete."""
    guard = guard or TextGuard()
    scratch: list[Path] | None = None if keep else []
    try:
        return _convert(raw, intake, guard, scratch, max_audio_parts)
    except BaseException:
        for p in scratch or []:
            with contextlib.suppress(OSError):
                p.unlink()
        raise


def _convert(
    raw: list[dict[str, Any]], intake: AudioIntake, guard: TextGuard, scratch: list[Path] | None,
    max_audio_parts: int | None,
) -> Conversation:  # fmt: skip
    clips: dict[str, AudioRef] = {}
    order: list[str] = []
    out: list[Message] = []
    audio_count = 0
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"{where}: unknown role {role!r}")
        origin: Origin = "model" if role == "assistant" else "user"
        parts: list[Part] = []
        for part in _content_parts(msg.get("content"), where):
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{where}: text parts need a 'text' string")
                guard.check(part["text"], where)
                parts.append(text_part(part["text"], origin))
            elif kind in AUDIO_TYPES:
                if role == "tool":
                    raise RequestError(f"{where}: tool messages cannot carry audio; send it in a user message")
                audio_count += 1
                if max_audio_parts is not None and audio_count > max_audio_parts:
                    raise RequestError(f"a request may hold at most {max_audio_parts} audio parts (--max-audio-parts)")
                ref = intake.part_to_ref(part, scratch)
                cid = ref.sha256[:16]
                if cid not in clips:
                    clips[cid] = ref
                    order.append(cid)
                parts.append(audio_part(cid))
            else:
                raise RequestError(f"{where}: unsupported content part type {kind!r}")
        entry: Message = {"role": "system" if role == "developer" else role, "content": parts}
        if role == "tool" and isinstance(msg.get("tool_call_id"), str):
            entry["tool_call_id"] = msg["tool_call_id"]
        if role == "assistant" and msg.get("tool_calls") is not None:
            calls = _tool_calls(msg["tool_calls"], where)
            for c in calls:
                guard.check(c["name"] + c["arguments"], where)
            if calls:
                entry["tool_calls"] = calls
            text = "".join(p["text"] for p in parts if p["type"] == "text")
            if calls and "<tool_call>" not in text:
                # Local chat templates render tool calls from the text (Hermes style, as the local
                # backend parses them), so a client that sent only `tool_calls` gets them written out.
                blocks = "".join(
                    f'<tool_call>\n{{"name": {json.dumps(c["name"])}, "arguments": {c["arguments"] or "{}"}}}'
                    "\n</tool_call>"
                    for c in calls
                )
                parts.append(text_part(blocks, "model"))
        out.append(entry)
    return Conversation(messages=out, clips=clips, order=order, scratch=scratch or [])


def last_user_text(messages: list[Message]) -> str:
    for msg in reversed(messages):
        if msg["role"] == "user":
            return "".join(p["text"] for p in msg["content"] if p["type"] == "text").strip()
    return ""


def special_tokens(backend: Any) -> Collection[str]:
    """The special tokens of a local backend's tokenizer (none for a remote one)."""
    tok = getattr(getattr(backend, "encoder", None), "tokenizer", None) or getattr(backend, "tokenizer", None)
    if tok is None:
        return ()
    found = set(getattr(tok, "all_special_tokens", []) or [])
    for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    return found


FinishName = Literal["stop", "length", "tool_calls"]
