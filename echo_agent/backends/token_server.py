"""The graph's model behind a token server: ids in, sampled ids and log-probs out (verl's rollout-server shape).

An RL engine's rollout server (verl's `LLMServerClient` over vLLM or SGLang) is called as

    await server.generate(request_id, prompt_ids=..., sampling_params=..., audio_data=..., mm_processor_kwargs=...)
    -> TokenOutput(token_ids, log_probs, stop_reason)

`TokenServer` is that call as a protocol, so nothing here imports an engine. `TokenServerBackend` is a
`ModelBackend` over it, and `LocalTokenServer` is a `TokenServer` over our own `TransformersBackend`, so the same
path runs locally with no engine (tests/test_verl.py compares it token for token with the transformers backend).

**The token trajectory is append-only.** One `TokenServerBackend` serves one graph run (`reset()` starts another).
The first call's prompt is built once by our `PromptEncoder`. Every later call sends the whole trajectory so far:
that prompt, every sampled id exactly as sampled, and only then the new context, encoded piece by piece (a slice
inserted after `</seg>` as its audio placeholder ids, a note or runtime text as its tokens, and after a verifier
retry the chat template's text between the two assistant turns). Nothing is re-tokenised, so the trajectory is at
every moment the exact sequence the policy was conditioned on, and the trainer gets what the server saw:
`response_mask` is 1 on sampled ids and 0 on everything inserted. In a single assistant turn (the seg-tag
protocol without a retry) the ids equal what `PromptEncoder.encode` gives on the conversation
(`check_reencode=True` asserts it at every call); across a retry the first attempt stays as its sampled ids with
mask 1 (the transformers backend re-renders it through the chat template instead, see design §6).

**Compact and expanded audio placeholders.** The trajectory holds *expanded* audio blocks
(`<|audio_bos|>`, N x `<|AUDIO|>`, `<|audio_eos|>`, N from the clip's length), which is what the trainer's forward
pass needs. A vLLM server wants *compact* ids, one `<|AUDIO|>` per clip, and expands them itself (an already
expanded run is silently expanded again). `compact_ids` and `expand_ids` are that mapping, explicit and checked:
the backend records each clip's N when it inserts it and verifies the compaction against it before every call.

**`</seg>` is detected here.** verl folds vLLM's finish reasons "stop" and "length" into `stop_reason="completed"`,
so the backend decodes the sampled ids itself and reports `stop` when the text ends with a stop string (within the
last token's overhang), `eos` on an end-of-turn id, else `length`, exactly as the transformers backend does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, Field

from ..config import SamplingParams
from ..errors import BackendError
from ..messages import AudioPart, Message, Part, text_part
from .base import AudioResolver, DeltaCallback, FinishReason, Generation, GenerationRequest
from .transformers import (
    AUDIO_PLACEHOLDER,
    EncodedAudio,
    EncodedPrompt,
    PromptEncoder,
    _hf_messages,
    encode_audio_placeholder,
)

if TYPE_CHECKING:
    from .transformers import TransformersBackend

__all__ = [
    "AudioTokens",
    "LocalTokenServer",
    "TokenOutput",
    "TokenResult",
    "TokenServer",
    "TokenServerBackend",
    "TokenTrajectory",
    "compact_ids",
    "expand_ids",
    "finish_of",
    "server_sampling_params",
]

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
NEVER_SAMPLED = (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)
"""Tokens the model must never write: a sampled `<|AUDIO|>` would read as an audio slot on the next call."""
_STOP_OVERHANG = 16  # a stop string may end inside the last sampled token (as in the transformers backend)
_CUT = "\u2063echo-token-server-cut\u2063"  # a marker the chat template renders verbatim (never in real text)


# ------------------------------------------------------------------------------------------- the protocol


class TokenOutput(BaseModel):
    """What a token server returns (the fields of verl's `TokenOutput` that this path uses)."""

    token_ids: list[int]
    log_probs: list[float] | None = None
    stop_reason: str | None = Field(default=None, description="verl: 'completed' (stop or length), 'aborted'")


class TokenResult(Protocol):
    """Any object with `TokenOutput`'s fields (verl's own `TokenOutput` qualifies)."""

    @property
    def token_ids(self) -> Sequence[int]: ...

    @property
    def log_probs(self) -> Sequence[float] | None: ...

    @property
    def stop_reason(self) -> str | None: ...


@runtime_checkable
class TokenServer(Protocol):
    """verl's rollout-server call (`LLMServerClient.generate`): token ids in, sampled ids and log-probs out.

    `prompt_ids` carry *compact* audio placeholders (one `<|AUDIO|>` per entry of `audio_data`, in order);
    `audio_data` holds `(waveform, sample_rate)` pairs; `sampling_params` uses vLLM's names."""

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> TokenResult: ...


# ------------------------------------------------------------------------- compact <-> expanded audio ids


@dataclass(frozen=True)
class AudioTokens:
    """The ids of the three audio placeholder tokens of a Qwen-family tokenizer."""

    audio: int
    bos: int
    eos: int

    @classmethod
    def of(cls, tokenizer: Any) -> AudioTokens:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)]
        if any(not isinstance(i, int) or i == tokenizer.unk_token_id for i in ids):
            raise BackendError(f"the tokenizer has no {AUDIO_TOKEN}/{AUDIO_BOS}/{AUDIO_EOS} tokens")
        return cls(audio=ids[0], bos=ids[1], eos=ids[2])

    @property
    def all(self) -> frozenset[int]:
        return frozenset((self.audio, self.bos, self.eos))


def compact_ids(ids: Sequence[int], tokens: AudioTokens) -> tuple[list[int], list[int]]:
    """Collapse every expanded audio block `bos, AUDIO x N, eos` to `bos, AUDIO, eos`.

    Returns the compact ids and each block's N in order, so `expand_ids(compact, counts, tokens) == ids`. An
    `<|AUDIO|>` outside a block, a block with no `<|AUDIO|>`, or an unclosed block raises `ValueError`."""
    out: list[int] = []
    counts: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        tok = ids[i]
        if tok == tokens.audio or tok == tokens.eos:
            raise ValueError(f"audio token {tok} at {i} is outside an {AUDIO_BOS} ... {AUDIO_EOS} block")
        out.append(tok)
        i += 1
        if tok != tokens.bos:
            continue
        run = 0
        while i < n and ids[i] == tokens.audio:
            run += 1
            i += 1
        if run == 0 or i >= n or ids[i] != tokens.eos:
            raise ValueError(f"malformed audio block at {i - run - 1}: expected {AUDIO_TOKEN} x N then {AUDIO_EOS}")
        out += [tokens.audio, tokens.eos]
        counts.append(run)
        i += 1
    return out, counts


def expand_ids(compact: Sequence[int], counts: Sequence[int], tokens: AudioTokens) -> list[int]:
    """The inverse of `compact_ids`: each block's single `<|AUDIO|>` repeated `counts[k]` times."""
    out: list[int] = []
    k = 0
    for i, tok in enumerate(compact):
        if tok != tokens.audio:
            out.append(tok)
            continue
        if i == 0 or compact[i - 1] != tokens.bos or i + 1 >= len(compact) or compact[i + 1] != tokens.eos:
            raise ValueError(f"{AUDIO_TOKEN} at {i} is not a compact {AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS} block")
        if k >= len(counts):
            raise ValueError(f"more audio blocks than counts ({len(counts)})")
        out += [tokens.audio] * counts[k]
        k += 1
    if k != len(counts):
        raise ValueError(f"{k} audio blocks but {len(counts)} counts")
    return out


# ------------------------------------------------------------------------------------------ sampling map


def server_sampling_params(
    sampling: SamplingParams, *, max_tokens: int, stop: Sequence[str], bad_words: Sequence[str]
) -> dict[str, Any]:
    """Our per-call sampling as vLLM's `SamplingParams` keywords (verl passes the dict through unchanged).

    Log-probs are always asked for (`logprobs: True`, which verl's vLLM server turns into `logprobs=0`: the sampled
    token's), and the stop string stays in the output (`include_stop_str_in_output`)."""
    params: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "max_tokens": max_tokens,
        "logprobs": True,
    }
    if stop:
        params["stop"] = list(stop)
        params["include_stop_str_in_output"] = True
    if bad_words:
        params["bad_words"] = list(bad_words)
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    return params


def finish_of(
    text: str, token_ids: Sequence[int], stop: Sequence[str], eos_ids: Iterable[int]
) -> tuple[FinishReason, str | None]:
    """How a generation ended and on which stop string, from its ids and decoded text: verl's server reports
    "completed" for a stop string and for the token limit alike, so its stop reason cannot tell them apart."""
    if token_ids and token_ids[-1] in set(eos_ids):
        return "eos", None
    for s in stop:
        idx = text.rfind(s)
        if idx >= 0 and len(text) - idx - len(s) <= _STOP_OVERHANG:
            return "stop", s
    return "length", None


# ---------------------------------------------------------------------------------------- the trajectory


@dataclass
class TokenTrajectory:
    """The append-only token sequence of one graph run, shaped like verl's `AgentLoopOutput`."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    """1 on sampled ids, 0 on inserted audio, notes, runtime and template text."""
    response_logprobs: list[float] = field(default_factory=list)
    """The server's log-prob of each sampled id; 0.0 where the mask is 0."""
    audio: list[AudioPart] = field(default_factory=list)
    """Every audio input in placeholder order (the clip first, then each inserted slice)."""
    audio_tokens: list[int] = field(default_factory=list)
    """Each audio input's expanded `<|AUDIO|>` count N, in the same order."""
    calls: int = 0
    truncated: bool = False
    """The response budget ran out: a later call was not sent and its context was not appended."""
    server_seconds: float = 0.0

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def copy(self) -> TokenTrajectory:
        return TokenTrajectory(
            list(self.prompt_ids), list(self.response_ids), list(self.response_mask), list(self.response_logprobs),
            list(self.audio), list(self.audio_tokens), self.calls, self.truncated, self.server_seconds,
        )  # fmt: skip


@dataclass
class _Pending:
    """New context not yet committed to the trajectory (it is dropped if the response budget cannot take it)."""

    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    audio: list[AudioPart] = field(default_factory=list)
    audio_tokens: list[int] = field(default_factory=list)

    def add(self, ids: Sequence[int], sampled: Sequence[float] | None = None) -> None:
        self.ids += ids
        self.mask += [1 if sampled is not None else 0] * len(ids)
        self.logprobs += list(sampled) if sampled is not None else [0.0] * len(ids)

    def add_audio(self, part: AudioPart, enc: EncodedAudio) -> None:
        self.add(enc.input_ids)
        self.audio.append(part)
        self.audio_tokens.append(enc.num_audio_tokens)


class TokenServerBackend:
    """A `ModelBackend` over a `TokenServer` that keeps one run's append-only token trajectory (module doc).

    One instance per graph run: verl builds one agent loop per sample, and the agent loop builds one of these.
    A request that does not continue this trajectory (another run's conversation) raises `BackendError`."""

    def __init__(
        self,
        server: TokenServer,
        encoder: PromptEncoder,
        *,
        eos_token_ids: Iterable[int],
        name: str = "token-server",
        request_id: str = "echo",
        max_response_tokens: int | None = None,
        mm_processor_kwargs: Mapping[str, Any] | None = None,
        check_reencode: bool = False,
    ) -> None:
        if max_response_tokens is not None and max_response_tokens < 1:
            raise BackendError(f"max_response_tokens must be >= 1, got {max_response_tokens}")
        self.server = server
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.tokens = AudioTokens.of(self.tokenizer)
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        if not self.eos_token_ids:
            raise BackendError("eos_token_ids is empty")
        self._name = name
        self.request_id = request_id
        self.max_response_tokens = max_response_tokens
        self.mm_processor_kwargs = dict(mm_processor_kwargs) if mm_processor_kwargs else None
        self.check_reencode = check_reencode
        self.reset()

    @property
    def name(self) -> str:
        return self._name

    @property
    def sample_rate(self) -> int:
        return self.encoder.sample_rate

    @property
    def trajectory(self) -> TokenTrajectory | None:
        """A copy of this run's token trajectory (None before the first call)."""
        return self._traj.copy() if self._traj is not None else None

    def reset(self) -> None:
        """Forget the trajectory: the next call starts a new run."""
        self._traj: TokenTrajectory | None = None
        self._msgs = 0  # messages of the conversation accounted for (the last one possibly in part)
        self._parts = 0  # parts of message _msgs - 1 accounted for
        self._last: tuple[bool, list[int]] | None = None  # (continued the turn, sampled ids) of the last call
        self._one_turn = True  # no template text between two assistant turns yet (re-encode must match)

    # ---- building the trajectory ------------------------------------------------------------------------

    def _start(self, request: GenerationRequest, audio: AudioResolver) -> EncodedPrompt:
        enc = self.encoder.encode(request, audio)
        parts = [p for m in request.messages for p in m["content"] if p["type"] == "audio"]
        self._traj = TokenTrajectory(
            prompt_ids=list(enc.input_ids), audio=parts, audio_tokens=[a.num_audio_tokens for a in enc.audios]
        )
        self._msgs = len(request.messages)
        self._parts = len(request.messages[-1]["content"]) if request.messages else 0
        return enc

    def _add_part(self, new: _Pending, part: Part, audio: AudioResolver) -> None:
        if part["type"] == "audio":
            new.add_audio(part, self.encoder.encode_audio_part(part, audio))
        elif part["origin"] == "model" and "token_ids" in part and "logprobs" in part:
            if len(part["logprobs"]) != len(part["token_ids"]):
                raise BackendError("a model text part has token ids and log-probs of different lengths")
            new.add(part["token_ids"], part["logprobs"])
        else:
            # User, runtime and note text; and model text this server did not sample (teacher forcing): context.
            new.add(self.encoder.encode_text(part["text"]))

    def _template_tail(self, history: list[Message], new_msgs: list[Message]) -> str:
        """The chat template's text after the last assistant message of `history`: its close, every new message,
        and the generation prompt, with each audio part of `new_msgs` as `AUDIO_PLACEHOLDER`."""
        last = history[-1]
        marked: list[Message] = [
            *history[:-1],
            {**last, "content": [*last["content"], text_part(_CUT, "runtime")]},
            *new_msgs,
        ]
        rendered = self.encoder.processor.apply_chat_template(
            _hf_messages(marked), add_generation_prompt=True, tokenize=False
        )
        if isinstance(rendered, list):
            rendered = rendered[0]
        if rendered.count(_CUT) != 1:
            raise BackendError("the chat template did not render the assistant turn verbatim")
        return str(rendered[rendered.index(_CUT) + len(_CUT) :])

    def _add_turns(
        self,
        new: _Pending,
        history: list[Message],
        new_msgs: list[Message],
        ends_with_eos: int | None,
        audio: AudioResolver,
    ) -> None:
        """Close the assistant turn that `history` ends with and open the next one, through the chat template."""
        tail = self._template_tail(history, new_msgs)
        if ends_with_eos is not None:
            # The model closed its turn itself: that id is already in the trajectory, as sampled.
            eos_text = self.tokenizer.convert_ids_to_tokens(ends_with_eos)
            if isinstance(eos_text, str) and tail.startswith(eos_text):
                tail = tail[len(eos_text) :]
        pieces = tail.split(AUDIO_PLACEHOLDER)
        parts = [p for m in new_msgs for p in m["content"] if p["type"] == "audio"]
        if len(pieces) - 1 != len(parts):
            raise BackendError(
                f"chat template rendered {len(pieces) - 1} audio placeholders for {len(parts)} audio parts"
            )
        for i, piece in enumerate(pieces):
            new.add(self.encoder.encode_text(piece))
            if i < len(parts):
                new.add_audio(parts[i], self.encoder.encode_audio_part(parts[i], audio))
        self._one_turn = False

    def _extend(self, request: GenerationRequest, audio: AudioResolver) -> _Pending:
        """The context that `request` adds after this trajectory's last sampled ids."""
        assert self._traj is not None and self._last is not None
        msgs = list(request.messages)
        continued, sampled = self._last
        i, j = (self._msgs - 1, self._parts) if continued else (self._msgs, 0)
        ours: Part | None = msgs[i]["content"][j] if 0 <= i < len(msgs) and j < len(msgs[i]["content"]) else None
        if ours is None or msgs[i]["role"] != "assistant" or ours["type"] != "text" or ours.get("token_ids") != sampled:
            raise BackendError(
                "the conversation does not continue this backend's token trajectory "
                "(use one TokenServerBackend per graph run, or reset() it)"
            )
        new = _Pending()
        for part in msgs[i]["content"][j + 1 :]:  # in-turn context: a slice or a note after </seg>
            self._add_part(new, part, audio)
        rest = msgs[i + 1 :]
        if request.continue_final and not rest:
            self._msgs, self._parts = i + 1, len(msgs[i]["content"])
            return new
        complete, partial = (rest[:-1], rest[-1]) if request.continue_final else (rest, None)
        if partial is not None and partial["role"] != "assistant":
            raise BackendError("continue_final needs a final assistant message")
        last_id = self._traj.ids[-1]
        closed_by_model = last_id if not new.ids and last_id in self.eos_token_ids else None
        self._add_turns(new, msgs[: i + 1], complete, closed_by_model, audio)
        if partial is not None:
            for part in partial["content"]:
                self._add_part(new, part, audio)
        self._msgs, self._parts = len(msgs), len(msgs[-1]["content"])
        return new

    # ---- one call ------------------------------------------------------------------------------------------

    def _audio_data(self, audio: AudioResolver) -> list[tuple[np.ndarray, int]]:
        assert self._traj is not None
        sr = self.sample_rate
        return [(audio.samples(p, sr), sr) for p in self._traj.audio]

    def compact_prompt(self) -> list[int]:
        """The trajectory so far with compact audio placeholders, checked against the recorded counts."""
        assert self._traj is not None
        compact, counts = compact_ids(self._traj.ids, self.tokens)
        if counts != self._traj.audio_tokens:
            raise BackendError(f"audio blocks {counts} do not match the inserted audio {self._traj.audio_tokens}")
        return compact

    async def generate(
        self, request: GenerationRequest, audio: AudioResolver, on_delta: DeltaCallback | None = None
    ) -> Generation:
        if request.tools:
            raise BackendError("the token-server backend speaks the seg-tag protocol only (no tools)")
        if self._traj is not None and self._traj.truncated:
            return self._empty()
        if self._traj is None:
            self._start(request, audio)
            traj = self._traj
            assert traj is not None
        else:
            traj = self._traj
            new = self._extend(request, audio)
            used = len(traj.response_ids) + len(new.ids)
            if self.max_response_tokens is not None and used >= self.max_response_tokens:
                traj.truncated = True  # the new context is not appended: no audio block is ever cut
                return self._empty()
            traj.response_ids += new.ids
            traj.response_mask += new.mask
            traj.response_logprobs += new.logprobs
            traj.audio += new.audio
            traj.audio_tokens += new.audio_tokens
        if self.check_reencode and self._one_turn:
            expected = self.encoder.encode(request, audio).input_ids
            if expected != traj.ids:
                raise BackendError("the append-only trajectory differs from a re-encode of the conversation")
        s = request.sampling
        budget = s.max_new_tokens
        if self.max_response_tokens is not None:
            budget = min(budget, self.max_response_tokens - len(traj.response_ids))
        params = server_sampling_params(
            s, max_tokens=budget, stop=request.stop, bad_words=[*request.suppress, *NEVER_SAMPLED]
        )
        sent = traj.ids
        t0 = time.perf_counter()
        out = await self.server.generate(
            self.request_id,
            prompt_ids=self.compact_prompt(),
            sampling_params=params,
            audio_data=self._audio_data(audio) or None,
            mm_processor_kwargs=self.mm_processor_kwargs,
        )
        traj.server_seconds += time.perf_counter() - t0
        ids = [int(t) for t in out.token_ids]
        if out.log_probs is None or len(out.log_probs) != len(ids):
            raise BackendError("the token server returned no log-prob for some sampled token (logprobs were asked)")
        logprobs = [float(x) for x in out.log_probs]
        if self.tokens.all.intersection(ids):
            raise BackendError("the token server sampled an audio placeholder token (it must ban them: bad_words)")
        traj.response_ids += ids
        traj.response_mask += [1] * len(ids)
        traj.response_logprobs += logprobs
        traj.calls += 1
        self._last = (request.continue_final, ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if on_delta is not None and text:
            on_delta(text)
        finish, stop_string = finish_of(text, ids, request.stop, self.eos_token_ids)
        return Generation(
            text=text, token_ids=ids, logprobs=logprobs, finish_reason=finish, stop_string=stop_string,
            stop_string_in_text=True, prompt_ids=sent,
        )  # fmt: skip

    def _empty(self) -> Generation:
        """The answer once the response budget is spent: nothing sampled (the graph then judges what it has)."""
        self._last = None
        return Generation(text="", token_ids=[], logprobs=[], finish_reason="length")


# --------------------------------------------------------------------------------------- the local server


class LocalTokenServer:
    """A `TokenServer` over our `TransformersBackend`: the verl rollout-server call with no engine.

    It expands the compact placeholders with the real processor (each `<|AUDIO|>` becomes the clip's N tokens,
    and the clip's features are computed as the transformers backend computes them) and generates token-in/
    token-out with the backend's own generate step, so for the same ids, audio and seed it samples exactly what
    the backend samples. Like verl's vLLM server it reports every finish as `"completed"`."""

    def __init__(self, backend: TransformersBackend) -> None:
        self.backend = backend
        self.processor = backend.processor
        self.tokens = AudioTokens.of(backend.tokenizer)
        self.sample_rate = backend.sample_rate
        self.requests: list[dict[str, Any]] = []
        """Every request as received (compact ids) and as run (expanded ids), for inspection and tests."""

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The ids that end a turn for the model behind this server."""
        return frozenset(self.backend._eos)

    def expand(self, prompt_ids: Sequence[int], audio_data: Sequence[Any]) -> EncodedPrompt:
        """Compact ids and their audio -> the expanded ids and the clips' features, in order."""
        compact = list(prompt_ids)
        n_blocks = compact.count(self.tokens.audio)
        if n_blocks != len(audio_data):
            raise BackendError(f"{n_blocks} {AUDIO_TOKEN} placeholders but {len(audio_data)} audio inputs")
        encoded: list[EncodedAudio] = []
        for item in audio_data:
            wave, sr = item if isinstance(item, tuple) else (item, self.sample_rate)
            if int(sr) != self.sample_rate:
                raise BackendError(f"audio at {sr} Hz; this model takes {self.sample_rate} Hz")
            encoded.append(encode_audio_placeholder(self.processor, np.asarray(wave, dtype=np.float32), int(sr)))
        try:
            ids = expand_ids(compact, [e.num_audio_tokens for e in encoded], self.tokens)
        except ValueError as err:
            raise BackendError(f"bad compact prompt: {err}") from None
        return EncodedPrompt(input_ids=ids, audios=encoded, loss_mask=[0] * len(ids))

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        **unused: Any,
    ) -> TokenOutput:
        p = dict(sampling_params)
        if float(p.pop("repetition_penalty", 1.0)) != 1.0 or p.pop("ignore_eos", False):
            raise BackendError("LocalTokenServer supports repetition_penalty 1.0 and ignore_eos False only")
        top_k = int(p.get("top_k", -1))
        sampling = SamplingParams(
            temperature=float(p.get("temperature", 1.0)),
            top_p=float(p.get("top_p", 1.0)),
            top_k=top_k if top_k > 0 else 0,
            max_new_tokens=int(p.get("max_tokens", 16)),
            seed=p.get("seed"),
        )
        # The backend bans the audio placeholder tokens itself; every other bad word is a string to suppress.
        never = [[i] for i in self.backend.never_ids]
        suppress = [w for w in p.get("bad_words", []) if self.backend._encode_text(w) not in never]
        request = GenerationRequest(messages=[], stop=list(p.get("stop", [])), suppress=suppress, sampling=sampling)
        prompt = self.expand(prompt_ids, audio_data or [])
        self.requests.append({"request_id": request_id, "compact_ids": list(prompt_ids), "ids": prompt.input_ids,
                              "sampling_params": dict(sampling_params)})  # fmt: skip
        gen = await asyncio.to_thread(self.backend._generate_sync, request, prompt, None)
        return TokenOutput(
            token_ids=gen.token_ids, log_probs=gen.logprobs if p.get("logprobs") else None, stop_reason="completed"
        )
