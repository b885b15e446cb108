"""Batched generation for a local transformers model shared by many concurrent graph runs.

`BatchingBackend` sits in front of a `TransformersBackend`. Generate requests that arrive within a few
milliseconds of each other (or while the model is busy) are decoded together by `generate_batch`: prompts are
left-padded into one batch, prefilled once, then decoded step by step with a shared KV cache. Each request
keeps its own stop strings, token budget, suppressed strings and sampling seed, and gets back exactly its own
token ids and log-probs. Rows that finish leave the batch (their cache rows are dropped), so a long row never
makes the short ones pay for its steps.

Why a step loop rather than one batched `model.generate`: `generate` samples every row from one global RNG and
stops rows only on shared criteria, so per-request seeds (determinism per (item, sample) in `collect`) and
per-request stop strings and budgets are not possible with it.

Each row reproduces the single-request path: the same logits processors as `generate` builds for our sampling
parameters (bad words, then temperature, top-k, top-p), the same `StopStringCriteria`, and sampling with
`torch.multinomial` from the request's own seed. So a greedy row yields the same tokens as
`TransformersBackend.generate`, and so does a seeded sampled row, up to floating-point effects of batch shape
(a different matmul blocking can move a logit in its last bits; ties that close are vanishingly rare).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import (
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .base import AudioResolver, DeltaCallback, Generation, GenerationRequest
from .transformers import EncodedAudio, EncodedPrompt, TransformersBackend, collate_audio_features

__all__ = ["BatchingBackend", "generate_batch"]

# A stop string ends in the last token; a window this long covers the longest stop string token by token.
_STOP_WINDOW = 64


@dataclass
class _Row:
    request: GenerationRequest
    prompt: EncodedPrompt
    processors: LogitsProcessorList
    stop: StopStringCriteria | None
    generator: torch.Generator | None  # None: greedy
    ids: list[int] = field(default_factory=list)  # prompt + generated, for the processors and stop check
    new_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class _StopCache:
    """`StopStringCriteria` preprocesses the whole vocabulary; build it once per set of stop strings."""

    def __init__(self) -> None:
        self._by_stops: dict[tuple[str, ...], StopStringCriteria] = {}

    def get(self, tokenizer: Any, stops: Sequence[str]) -> StopStringCriteria | None:
        if not stops:
            return None
        key = tuple(stops)
        if key not in self._by_stops:
            self._by_stops[key] = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stops))
        return self._by_stops[key]


_STOPS = _StopCache()


def _row(backend: TransformersBackend, request: GenerationRequest, prompt: EncodedPrompt) -> _Row:
    s = request.sampling
    processors = LogitsProcessorList()
    if request.suppress:
        bad = [backend.encoder.encode_text(w) for w in request.suppress]
        processors.append(NoBadWordsLogitsProcessor(bad, eos_token_id=sorted(backend._eos)))
    generator: torch.Generator | None = None
    if s.temperature > 0:
        if s.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            processors.append(TopKLogitsWarper(top_k=s.top_k))
        if s.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=s.top_p))
        generator = torch.Generator(device=backend.model.device)
        if s.seed is not None:
            generator.manual_seed(s.seed)
        else:
            generator.seed()
    return _Row(request, prompt, processors, _STOPS.get(backend.tokenizer, request.stop), generator,
                ids=list(prompt.input_ids))  # fmt: skip


def _accepts(model: Any, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _positions(family: str, pos: torch.Tensor) -> torch.Tensor:
    # The Omni thinker's M-RoPE takes (3, B, L) positions; with audio only all three axes are the text positions.
    return pos.unsqueeze(0).expand(3, -1, -1) if family == "qwen2_5_omni" else pos


def generate_batch(
    backend: TransformersBackend, items: Sequence[tuple[GenerationRequest, EncodedPrompt]]
) -> list[Generation]:
    """Decode several encoded requests together on `backend.model`; one `Generation` per item, in order."""
    if not items:
        return []
    model, device = backend.model, backend.model.device
    rows = [_row(backend, req, prompt) for req, prompt in items]
    pad = backend.tokenizer.pad_token_id
    if pad is None:
        pad = min(backend._eos)
    width = max(len(r.prompt.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's next token lands in the last column
        n = len(r.prompt.input_ids)
        input_ids[i, width - n :] = torch.tensor(r.prompt.input_ids)
        mask[i, width - n :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": True}
    kwargs["position_ids"] = _positions(backend.family, pos)
    audios: list[EncodedAudio] = [a for r in rows for a in r.prompt.audios]  # row-major: the placeholder order
    if audios:
        feats = collate_audio_features(backend.family, audios)
        kwargs["input_features"] = feats["input_features"].to(device=device, dtype=model.dtype)
        kwargs["feature_attention_mask"] = feats["feature_attention_mask"].to(device)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # only the last position's logits are needed (big vocabularies)
    active = list(range(len(rows)))  # batch position -> row index
    last_pos = pos[:, -1]
    with backend._lock, torch.inference_mode():
        out = model(**kwargs)
        cache = out.cache
        # Bounded: every live row gains one token per step and leaves at its own max_new_tokens.
        for _ in range(max(r.request.sampling.max_new_tokens for r in rows)):
            logits = out.logits[:, -1].float()
            next_tokens: list[int] = []
            keep: list[int] = []
            for b, i in enumerate(active):
                if _step(backend, rows[i], logits[b : b + 1]):
                    keep.append(b)
                next_tokens.append(rows[i].new_ids[-1])
            if not keep:
                break
            if len(keep) < len(active):  # drop finished rows from the cache and the batch
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, last_pos = mask[index], last_pos[index]
                active = [active[b] for b in keep]
                next_tokens = [next_tokens[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            last_pos = last_pos + 1
            out = model(
                input_ids=torch.tensor(next_tokens, device=device).unsqueeze(-1),
                attention_mask=mask,
                position_ids=_positions(backend.family, last_pos.unsqueeze(-1)),
                cache=cache,
                use_cache=True,
            )
    return [backend.to_generation(r.request, r.prompt, r.new_ids, r.logprobs) for r in rows]


def _step(backend: TransformersBackend, row: _Row, logits: torch.Tensor) -> bool:
    """Choose one row's next token from its logits `(1, V)`; return whether the row goes on."""
    s = row.request.sampling
    ids = cast(torch.LongTensor, torch.tensor([row.ids], device=logits.device))
    scores = row.processors(ids, logits)
    if row.generator is None:
        token = int(torch.argmax(scores, dim=-1))
    else:
        token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=row.generator))
    # The log-prob under the distribution sampled from, before truncation (as the single path reports it).
    scaled = logits / s.temperature if row.generator is not None else logits
    row.logprobs.append(float(torch.log_softmax(scaled, dim=-1)[0, token]))
    row.new_ids.append(token)
    row.ids.append(token)
    if token in backend._eos or len(row.new_ids) >= s.max_new_tokens:
        return False
    if row.stop is not None:
        tail = torch.tensor([row.ids[-_STOP_WINDOW:]], device=logits.device)
        if bool(row.stop(tail, logits)[0]):
            return False
    return True


@dataclass
class _Pending:
    request: GenerationRequest
    prompt: EncodedPrompt
    future: asyncio.Future[Generation]


class BatchingBackend:
    """A `ModelBackend` that batches concurrent requests to one `TransformersBackend`.

    The first request of a batch waits `window_s` for company (requests arriving while a batch decodes join
    the next one without waiting); a batch holds at most `max_batch` requests. Text is not streamed: `on_delta`
    receives the whole continuation once it is done. Prompts are encoded exactly as the wrapped backend does.
    """

    def __init__(self, backend: TransformersBackend, *, max_batch: int = 32, window_s: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend = backend
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # every batch decoded, for tests and benchmarks

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def sample_rate(self) -> int:
        return self.backend.sample_rate

    @property
    def encoder(self) -> Any:
        return self.backend.encoder

    async def generate(
        self, request: GenerationRequest, audio: AudioResolver, on_delta: DeltaCallback | None = None
    ) -> Generation:
        prompt = self.backend.encode(request, audio)
        self.backend.last_prompt = prompt
        loop = asyncio.get_running_loop()
        pending = _Pending(request, prompt, loop.create_future())
        self._queue.append(pending)
        if self._wake is None or self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        self._wake.set()
        gen = await pending.future
        if on_delta is not None and gen.text:
            on_delta(gen.text)
        return gen

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._queue:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                except TimeoutError:
                    if not self._queue:
                        return  # idle: the next request starts a new worker
                continue
            if len(self._queue) < self.max_batch and self.window_s > 0:
                await asyncio.sleep(self.window_s)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                gens = await asyncio.to_thread(generate_batch, self.backend, [(p.request, p.prompt) for p in batch])
            except Exception as err:  # the callers see the model's error; the worker serves the next batch
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            for p, gen in zip(batch, gens, strict=True):
                if not p.future.done():
                    p.future.set_result(gen)
