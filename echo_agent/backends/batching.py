"""Batched generation for a local transformers model shared by many concurrent graph runs.

`BatchingBackend` sits in front of a `TransformersBackend` and decodes the generate requests of all the graph
runs in flight together, continuously: one decoder thread steps a batch of rows with a shared KV cache; a request
that arrives while it runs is prefilled (left-padded with the other newcomers) and joins the batch at the next
step, and a row that finishes leaves the batch and is answered at once, so its graph run can go on (listen,
verify, ask again) while the others decode. Each request keeps its own stop strings, token budget, suppressed
strings and sampling seed, and gets back exactly its own token ids and log-probs. `generate_batch` runs the same
decoder over a fixed list of requests.

Why a step loop rather than one batched `model.generate`: `generate` samples every row from one global RNG and
stops rows only on shared criteria, so per-request seeds (determinism per (item, sample) in `collect`) and
per-request stop strings and budgets are not possible with it.

Each row reproduces the single-request path: the same logits processing as `generate` applies for our sampling
parameters (bad words, temperature, top-k, top-p), the same `StopStringCriteria`, and the same draws as
`torch.multinomial` from a generator seeded with the request's seed. So a greedy row yields the same tokens as
`TransformersBackend.generate`, and so does a seeded sampled row, up to floating-point effects of batch shape
(a different matmul blocking can move a logit in its last bits; ties that close are vanishingly rare).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    DynamicLayer,
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    StopStringCriteria,
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
    processors: LogitsProcessorList  # empty for plain greedy or temperature-1 sampling (the fast path)
    stop: StopStringCriteria | None
    generator: torch.Generator | None  # None: greedy
    ids: list[int] = field(default_factory=list)  # prompt + generated, for the processors and stop check
    new_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # Whether the caller gave up (its task was cancelled): the row then leaves the batch at the next step instead of
    # decoding to its token budget, so a cancelled run (a failed `collect`, a closed connection) frees the model.
    cancelled: Callable[[], bool] = field(default=lambda: False)
    prefix: _Prefix | None = None  # cached KV of this prompt's first `prefix_len` tokens, reused at admission
    prefix_len: int = 0

    def audio_keys(self) -> list[bytes]:
        """A digest of each audio input's features, in placeholder order (computed once)."""
        if self._audio_keys is None:
            self._audio_keys = [_digest(a.features) for a in self.prompt.audios]
        return self._audio_keys

    _audio_keys: list[bytes] | None = None


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(t.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


@dataclass
class _Prefix:
    """The KV cache of a finished row: for a later prompt that starts with the same tokens and the same audio."""

    ids: np.ndarray  # the tokens whose keys and values are kept
    audio: list[bytes]  # digests of the audio inputs among them, in placeholder order
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values (kv_heads, len(ids), head_dim)
    nbytes: int


class _PrefixCache:
    """Finished rows' KV caches, an LRU bounded by bytes, for prefix reuse.

    A graph run calls the model again after each `</seg>`: its next prompt is the previous prompt, the tokens just
    written and then the inserted slice. Without reuse that whole prefix (the clip's audio tokens included) is
    prefilled again at every call. A row that ended on a stop string leaves its keys and values here; a newcomer
    whose prompt starts with the same tokens and the same audio takes them and prefills only the rest. Several
    samples of one question share their prompt, so the first to finish serves the others' later calls too.
    Rows' keys carry their own positions (0 = first token), so a prefix means the same at the front of any row."""

    MIN_TOKENS = 16  # a shorter match saves less than it costs to assemble
    MAX_ENTRIES = 256  # bounds the scan at admission too, not only the bytes

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, _Prefix] = OrderedDict()
        self.hits = self.reused_tokens = 0

    def put(self, entry: _Prefix) -> None:
        if entry.nbytes > self.max_bytes or len(entry.ids) < self.MIN_TOKENS:
            return
        self._entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes or len(self._entries) > self.MAX_ENTRIES:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def match(self, row: _Row) -> tuple[_Prefix, int] | None:
        """The entry sharing the longest usable prefix with the row's prompt, and that length. Usable: at most all
        but the prompt's last token (its logits are needed), never ending inside an audio block, and every audio
        input before it identical."""
        ids = np.asarray(row.prompt.input_ids, dtype=np.int64)
        best: tuple[_Prefix, int] | None = None
        for entry in reversed(self._entries.values()):  # newest first: the likeliest continuation
            n = min(len(entry.ids), len(ids) - 1)
            if n < self.MIN_TOKENS or (best is not None and n <= best[1]):
                continue
            same = entry.ids[:n] == ids[:n]
            c = n if bool(same.all()) else int(np.argmin(same))
            c = self._audio_safe(row, entry, ids, c)
            if c >= self.MIN_TOKENS and (best is None or c > best[1]):
                best = (entry, c)
        if best is not None and id(best[0]) in self._entries:
            self._entries.move_to_end(id(best[0]))
        return best

    @staticmethod
    def _audio_safe(row: _Row, entry: _Prefix, ids: np.ndarray, c: int) -> int:
        """Cut `c` back to the start of the first audio block it would cut or whose audio differs."""
        audios = row.prompt.audios
        if not audios or c == 0:
            return c
        bos, eos = audios[0].input_ids[0], audios[0].input_ids[-1]
        starts = np.flatnonzero(ids[:c] == bos)
        ends = np.flatnonzero(ids[:c] == eos)
        if len(starts) > len(ends):  # the prefix would end inside an audio block
            c = int(starts[len(ends)])
            starts = starts[: len(ends)]
        keys = row.audio_keys()
        for k in range(len(starts)):
            if k >= len(entry.audio) or entry.audio[k] != keys[k]:
                return int(starts[k])
        return c


class _StopCache:
    """`StopStringCriteria` preprocesses the whole vocabulary; build it once per tokenizer and set of stop strings.
    Keyed by the tokenizer object too (weakly): criteria built for one vocabulary stop wrong on another's ids, and
    one process may hold several models (tests, `collect` over several checkpoints)."""

    MAX_ENTRIES = 32

    def __init__(self) -> None:
        self._by_tokenizer: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], StopStringCriteria]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, tokenizer: Any, stops: Sequence[str]) -> StopStringCriteria | None:
        if not stops:
            return None
        key = tuple(stops)
        by_stops = self._by_tokenizer.setdefault(tokenizer, {})
        if key not in by_stops:
            if len(by_stops) >= self.MAX_ENTRIES:  # stop strings come from requests: keep the memory bounded
                by_stops.pop(next(iter(by_stops)))
            by_stops[key] = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stops))
        return by_stops[key]


_STOPS = _StopCache()


def _row(backend: TransformersBackend, request: GenerationRequest, prompt: EncodedPrompt) -> _Row:
    s = request.sampling
    processors = LogitsProcessorList()
    if request.suppress:
        bad = [backend.encoder.encode_text(w) for w in request.suppress]
        processors.append(NoBadWordsLogitsProcessor(bad, eos_token_id=sorted(backend._eos)))
    generator: torch.Generator | None = None
    if s.temperature > 0:  # temperature itself is applied to all rows at once (`_choose`)
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


class _GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that writes new keys and values into buffers with spare room (capacity doubles) instead of
    concatenating: `DynamicLayer` copies the whole cache at every step, which for a wide batch costs more than
    the step's compute. `keys` and `values` stay views of the filled part, as the attention code expects."""

    _k: torch.Tensor
    _v: torch.Tensor
    filled: int = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.filled = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if self.filled == 0 or end > self._k.shape[-2]:
            self._grow(key_states, value_states, max(end, 2 * self.filled, 64))
        self._k[..., self.filled : end, :] = key_states
        self._v[..., self.filled : end, :] = value_states
        self.filled = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        k = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        v = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if self.filled:
            k[..., : self.filled, :] = self._k[..., : self.filled, :]
            v[..., : self.filled, :] = self._v[..., : self.filled, :]
        self._k, self._v = k, v

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents (after rows join, leave, or padding columns are trimmed)."""
        self._k, self._v, self.filled = keys.contiguous(), values.contiguous(), keys.shape[-2]
        self.keys, self.values = self._k, self._v

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.assign(self._k[indices, :, : self.filled], self._v[indices, :, : self.filled])


def _new_cache(model: Any) -> Any:
    """A cache of `_GrowingLayer`s, or None (the model's own) when its attention is not plain full attention."""
    text = model.config.get_text_config(decoder=True)
    if any(t != "full_attention" for t in getattr(text, "layer_types", None) or []):
        return None
    cache = DynamicCache()
    cache.layer_class_to_replicate = _GrowingLayer
    return cache


@dataclass
class _Fill:
    """A long prompt being prefilled a piece at a time (`_Decoder.fill`), between decode steps of the batch."""

    row: _Row
    owner: Any
    audio_end: int  # the first piece reaches at least this far: past the last audio placeholder
    into: _Decoder  # the batch it joins
    cache: Any = None
    filled: int = 0


class _Decoder:
    """A batch of rows being decoded: their KV cache, attention mask, positions and next-token logits.

    `admit` prefills new rows and merges them into the batch; `step` picks one token per row, retires the rows
    that are done and runs the model one step for the rest. Rows are independent: left padding plus explicit
    positions make each row compute what it would alone.
    """

    def __init__(self, backend: TransformersBackend, prefixes: _PrefixCache | None = None) -> None:
        self.backend = backend
        self.prefixes = prefixes  # where finished rows leave their KV (None: not kept)
        self.model = backend.model
        self.device = backend.model.device
        pad = backend.tokenizer.pad_token_id
        self.pad = int(pad if pad is not None else min(backend._eos))
        self.keep_logits = _accepts(self.model, "logits_to_keep")
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.last_pos = torch.zeros((0,), dtype=torch.long, device=self.device)
        self.logits = torch.zeros((0, 0), device=self.device)
        # Joining a running batch edits the cache's tensors: only our full-attention layers allow it.
        self.joinable = True

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, rows: list[_Row]) -> None:
        """Prefill `rows` together and add them to the batch. A row with a `prefix` starts from those cached keys and
        values and prefills only the rest of its prompt. Row i's columns: left padding, its prefix (right-aligned
        in the first P columns), padding, the rest of its prompt (right-aligned in the last R); positions are
        explicit, so the gap is just masked out, and every row's next token lands in the last column."""
        if not rows:
            return
        starts = [r.prefix_len if r.prefix is not None else 0 for r in rows]
        width_p = max(starts)
        width_r = max(len(r.prompt.input_ids) - s for r, s in zip(rows, starts, strict=True))
        ids = torch.full((len(rows), width_r), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width_p + width_r), dtype=torch.long)
        pos = torch.zeros((len(rows), width_r), dtype=torch.long)
        audios: list[EncodedAudio] = []  # row-major: placeholder order
        for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
            n = len(r.prompt.input_ids)
            ids[i, width_r - (n - s) :] = torch.tensor(r.prompt.input_ids[s:])
            mask[i, width_p - s : width_p] = 1
            mask[i, width_p + width_r - (n - s) :] = 1
            pos[i, width_r - (n - s) :] = torch.arange(s, n)
            before = r.prompt.input_ids[:s].count(r.prompt.audios[0].input_ids[-1]) if r.prompt.audios else 0
            audios += r.prompt.audios[before:]  # those in the prefix are in its keys and values already
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        cache = _new_cache(self.model)
        if width_p and self.prefixes is not None:  # counted where used (a long prompt's pieces start from 0)
            self.prefixes.hits += sum(r.prefix is not None for r in rows)
            self.prefixes.reused_tokens += sum(starts)
        if width_p:
            layer_count = len(next(r.prefix.layers for r in rows if r.prefix is not None))
            for layer in range(layer_count):
                keys = values = None
                for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
                    if r.prefix is None:
                        continue
                    k, v = r.prefix.layers[layer]
                    if keys is None or values is None:
                        keys = k.new_zeros((len(rows), k.shape[0], width_p, k.shape[-1]))
                        values = v.new_zeros((len(rows), v.shape[0], width_p, v.shape[-1]))
                    keys[i, :, width_p - s :] = k[:, :s]
                    values[i, :, width_p - s :] = v[:, :s]
                assert keys is not None and values is not None
                cache.update(keys, values, layer)
        out = self._forward(ids, mask, pos, cache, audios)
        for r in rows:
            r.prefix = None  # the batch's cache holds it now
        self._join(rows, out.cache, mask, pos[:, -1], out.logits[:, -1].float())

    def fill(self, f: _Fill, chunk: int) -> bool:
        """Prefill the next piece of one long prompt (about `chunk` tokens) into its own cache; True once all of
        it is in and the row has joined the batch. The first piece reaches past the prompt's last audio, so every
        clip's features go in with all of its placeholders."""
        ids = f.row.prompt.input_ids
        start = f.filled
        end = min(len(ids), max(start + chunk, f.audio_end if start == 0 else 0))
        piece = torch.tensor([ids[start:end]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        pos = torch.arange(start, end, device=self.device).unsqueeze(0)
        out = self._forward(piece, mask, pos, f.cache if start else _new_cache(self.model),
                            f.row.prompt.audios if start == 0 else [])  # fmt: skip
        f.cache, f.filled = out.cache, end
        if end < len(ids):
            return False
        self._join([f.row], f.cache, mask, pos[:, -1], out.logits[:, -1].float())
        return True

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any,
                 audios: list[EncodedAudio]) -> Any:  # fmt: skip
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        kwargs["position_ids"] = _positions(self.backend.family, pos)
        if cache is not None:
            kwargs["cache"] = cache
        if audios:
            feats = collate_audio_features(self.backend.family, audios)
            kwargs["input_features"] = feats["input_features"].to(device=self.device, dtype=self.model.dtype)
            kwargs["feature_attention_mask"] = feats["feature_attention_mask"].to(self.device)
        if self.keep_logits:
            kwargs["logits_to_keep"] = 1  # only the last position's logits are needed (big vocabularies)
        with self.backend._lock, torch.inference_mode():
            return self.model(**kwargs)

    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor, last_pos: torch.Tensor,
              logits: torch.Tensor) -> None:  # fmt: skip
        """Add prefilled rows (their cache, mask, last positions and next-token logits) to the batch."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.last_pos, self.logits = rows, cache, mask, last_pos, logits
            self.joinable = all(isinstance(layer, _GrowingLayer) for layer in getattr(cache, "layers", [None]))
            return
        if not self.joinable:
            raise RuntimeError("this model's cache cannot take rows into a running batch")
        # Merge: left-pad the narrower of the two caches so the columns line up at the right edge.
        width = mask.shape[1]
        grow_old, grow_new = max(0, width - self.mask.shape[1]), max(0, self.mask.shape[1] - width)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            keys, values = (
                torch.cat([F.pad(a, (0, 0, grow_old, 0)), F.pad(b, (0, 0, grow_new, 0))])
                for a, b in ((old_layer.keys, new_layer.keys), (old_layer.values, new_layer.values))
            )
            old_layer.assign(keys, values)
        self.mask = torch.cat([F.pad(self.mask, (grow_old, 0)), F.pad(mask, (grow_new, 0))])
        self.last_pos = torch.cat([self.last_pos, last_pos])
        self.logits = torch.cat([self.logits, logits])
        self.rows += rows

    def _keep(self, b: int, row: _Row) -> None:
        """Leave row b's keys and values (every token but the one just chosen) in the prefix cache."""
        assert self.prefixes is not None
        valid = self.mask[b].bool()
        n = int(valid.sum())
        if n != len(row.ids) - 1:  # the cache must hold exactly the row's tokens; else keep nothing
            return
        layers = [(layer.keys[b][:, valid].clone(), layer.values[b][:, valid].clone()) for layer in self.cache.layers]
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        ids = np.asarray(row.ids[:-1], dtype=np.int64)
        self.prefixes.put(_Prefix(ids, row.audio_keys(), layers, nbytes))

    def step(self) -> list[_Row]:
        """One token for every row; returns the rows that finished (they have left the batch)."""
        if not self.rows:
            return []
        with torch.inference_mode():
            tokens = _choose(self.rows, self.logits, self.backend.never_ids)
        going: list[int] = []
        done: list[_Row] = []
        stopped = _stopped(self.rows)
        for b, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            s = row.request.sampling
            if token in self.backend._eos or len(row.new_ids) >= s.max_new_tokens or stopped[b] or row.cancelled():
                done.append(row)
                if stopped[b] and self.prefixes is not None and self.joinable and not row.cancelled():
                    self._keep(b, row)
            else:
                going.append(b)
        if len(going) < len(self.rows):  # drop finished rows from the cache and the batch
            index = torch.tensor(going, dtype=torch.long, device=self.device)
            self.rows = [self.rows[b] for b in going]
            self.mask, self.last_pos = self.mask[index], self.last_pos[index]
            tokens = [tokens[b] for b in going]
            if not self.rows:
                self.cache = None
                return done
            self.cache.batch_select_indices(index)
            first = int((self.mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every row go
            if first > 0 and self.joinable:
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.assign(layer.keys[:, :, first:], layer.values[:, :, first:])
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=-1)
        self.last_pos = self.last_pos + 1
        with self.backend._lock, torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor(tokens, device=self.device).unsqueeze(-1),
                attention_mask=self.mask,
                position_ids=_positions(self.backend.family, self.last_pos.unsqueeze(-1)),
                cache=self.cache,
                use_cache=True,
            )
        self.logits = out.logits[:, -1].float()
        return done


def _choose(rows: list[_Row], logits: torch.Tensor, never: list[int]) -> list[int]:
    """Pick each row's next token from its raw logits `(n, V)` and record it with its log-prob."""
    temps = torch.tensor([r.request.sampling.temperature if r.generator is not None else 1.0 for r in rows])
    scores = logits / temps.to(logits.device).unsqueeze(-1)  # `TemperatureLogitsWarper` for every row at once
    # Log-probs under the distribution sampled from, before truncation (as the single path reports them).
    logprobs = torch.log_softmax(scores, dim=-1)
    if never:  # the single path's single-token bad words (`NoBadWordsLogitsProcessor` sets them to -inf)
        scores[:, never] = -float("inf")
    for b, row in enumerate(rows):  # the other processors (suppressed strings, top-k, top-p), row by row
        if len(row.processors):
            ids = cast(torch.LongTensor, torch.tensor([row.ids], device=logits.device))
            scores[b : b + 1] = row.processors(ids, scores[b : b + 1])
    tokens = torch.argmax(scores, dim=-1)
    sampled = [b for b, row in enumerate(rows) if row.generator is not None]
    if sampled:
        # `torch.multinomial(p, 1, generator=g)` is argmax(p / q) with q ~ Exp(1) drawn from g (ATen's one-sample
        # path): the same draws per row, with one softmax and one argmax for all sampled rows.
        probs = torch.softmax(scores[sampled], dim=-1)
        q = torch.empty_like(probs)
        for i, b in enumerate(sampled):
            q[i].exponential_(1, generator=rows[b].generator)
        tokens[sampled] = torch.argmax(probs / q, dim=-1)
    out: list[int] = tokens.tolist()
    for b, (row, token) in enumerate(zip(rows, out, strict=True)):
        row.logprobs.append(float(logprobs[b, token]))
        row.new_ids.append(token)
        row.ids.append(token)
    return out


def _stopped(rows: list[_Row]) -> list[bool]:
    """Whether each row's text now ends with one of its stop strings; one check per set of stop strings."""
    out = [False] * len(rows)
    groups: dict[int, list[int]] = {}
    for b, row in enumerate(rows):
        if row.stop is not None:
            groups.setdefault(id(row.stop), []).append(b)
    for members in groups.values():
        crit = rows[members[0]].stop
        assert crit is not None
        n = min(_STOP_WINDOW, *(len(rows[b].ids) for b in members))
        tails = cast(torch.LongTensor, torch.tensor([rows[b].ids[-n:] for b in members]))
        hit = crit(tails, torch.empty(0)).tolist()
        for b, h in zip(members, hit, strict=True):
            out[b] = bool(h)
    return out


def generate_batch(
    backend: TransformersBackend, items: Sequence[tuple[GenerationRequest, EncodedPrompt]]
) -> list[Generation]:
    """Decode several encoded requests together on `backend.model`; one `Generation` per item, in order."""
    rows = [_row(backend, req, prompt) for req, prompt in items]
    decoder = _Decoder(backend)
    decoder.admit(rows)
    # Bounded: every row gains one token per step and leaves at its own max_new_tokens.
    for _ in range(max((r.request.sampling.max_new_tokens for r in rows), default=0)):
        decoder.step()
        if not decoder:
            break
    return [backend.to_generation(r.request, r.prompt, r.new_ids, r.logprobs) for r in rows]


@dataclass
class _Pending:
    request: GenerationRequest
    prompt: EncodedPrompt
    future: asyncio.Future[Generation]
    loop: asyncio.AbstractEventLoop
    row: _Row | None = None  # made by the decoder thread when it takes the request


class BatchingBackend:
    """A `ModelBackend` that decodes concurrent requests to one `TransformersBackend` in a shared, continuous batch.

    A decoder thread runs while there is work. When it starts from idle it waits `window_s` for company; after
    that, requests join the running batch between steps, in groups (a join copies the batch's KV cache): once
    they are an eighth of the batch, or after `join_steps` steps at most. At most `max_batch` rows decode at once.
    A prompt of `long_prompt` tokens or more is prefilled `prefill_chunk` tokens per step into a cache of its own and
    joins when it is complete, so a maximal prompt delays the others' steps by one piece's prefill, not by its whole.
    Shorter prompts are prefilled whole, together with the other newcomers: one at a time in pieces, the ordinary
    continuation prompts of a busy rollout (300-450 tokens for echo-tiny) queued behind each other and the batch
    ran at a third of its width.
    Prompts of `wide_tokens` or more decode in a second batch that steps every other time while the first has rows.
    Text is not streamed: `on_delta` receives the whole continuation when it is done. Prompts are encoded exactly
    as the wrapped backend encodes them.
    """

    def __init__(
        self,
        backend: TransformersBackend,
        *,
        max_batch: int = 32,
        window_s: float = 0.01,
        idle_s: float = 1.0,
        join_steps: int = 8,
        prefill_chunk: int = 256,
        long_prompt: int = 512,
        wide_tokens: int = 1024,
        prefix_cache_mb: float = 256,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend = backend
        self.max_batch = max_batch
        self.window_s = window_s
        self.idle_s = idle_s
        self.join_steps = join_steps
        self.prefill_chunk = prefill_chunk  # tokens of a long prompt prefilled per step (0: whole prompts at once)
        self.long_prompt = long_prompt  # prompts this long are prefilled in pieces
        # Finished rows' KV for the same run's next call (0: off); kept across decoder threads.
        self.prefixes = _PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.wide_tokens = wide_tokens  # prompts this long decode in a batch of their own (see `_serve`)
        self._inbox: queue.Queue[_Pending] = queue.Queue()
        self._lock = threading.Lock()
        self._running = False
        self.batch_sizes: list[int] = []  # rows decoded at each step, for tests and benchmarks
        self.prefill_pieces = 0  # pieces of long prompts prefilled, likewise

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
        pending = _Pending(request, prompt, loop.create_future(), loop)
        with self._lock:
            self._inbox.put(pending)
            if not self._running:
                self._running = True
                threading.Thread(target=self._serve, name="echo-batcher", daemon=True).start()
        gen = await pending.future
        if on_delta is not None and gen.text:
            on_delta(gen.text)
        return gen

    def _take(self, n: int, wait: float | None) -> list[_Pending]:
        """Up to `n` pending requests; blocks up to `wait` seconds for the first (None: do not block)."""
        out: list[_Pending] = []
        if n < 1:
            return out
        try:
            out.append(self._inbox.get(timeout=wait) if wait is not None else self._inbox.get_nowait())
            while len(out) < n:
                out.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return [p for p in out if not p.future.cancelled()]

    def _serve(self) -> None:
        # Two batches: `narrow` for ordinary prompts, `wide` for prompts of `wide_tokens` or more. Every row of a
        # batch attends over the batch's widest row, so a maximal request in the same batch would make every small
        # request's step cost as much as its own; and while both have rows, `wide` steps every other time only,
        # so maximal requests take at most about half of the model's time from the others.
        prefixes = self.prefixes if _new_cache(self.backend.model) is not None else None
        narrow, wide = _Decoder(self.backend, prefixes), _Decoder(self.backend, prefixes)
        owners: dict[int, _Pending] = {}
        # Long prompts are prefilled `prefill_chunk` tokens per step, between the batches' decode steps, so one
        # request's prefill never stalls the other rows (models whose cache can take rows mid-batch only).
        chunked = self.prefill_chunk > 0 and _new_cache(self.backend.model) is not None
        audio_eos = self.backend.tokenizer.convert_tokens_to_ids("<|audio_eos|>")
        long = max(self.long_prompt, self.prefill_chunk + 1)
        filling: list[_Fill] = []
        tick = 0

        def answer(p: _Pending, result: Generation | BaseException) -> None:
            setter: Callable[[Any], None] = (
                p.future.set_exception if isinstance(result, BaseException) else p.future.set_result
            )

            def deliver() -> None:
                if not p.future.done():
                    setter(result)

            p.loop.call_soon_threadsafe(deliver)

        def row_of(p: _Pending) -> _Row:
            """The request's row, with the longest cached prefix of its prompt (if any) to start from."""
            if p.row is None:
                p.row = _row(self.backend, p.request, p.prompt)
                p.row.cancelled = p.future.cancelled
                hit = prefixes.match(p.row) if prefixes is not None else None
                if hit is not None:
                    p.row.prefix, p.row.prefix_len = hit
            return p.row

        def is_long(p: _Pending) -> bool:
            # What is left to prefill after any cached prefix decides the pieces; a prompt for the wide batch goes
            # there whatever its prefix (only `to_fill` sends rows to it).
            n = len(p.prompt.input_ids)
            return n >= self.wide_tokens or n - row_of(p).prefix_len >= long

        def to_fill(p: _Pending) -> _Fill:
            ids = p.prompt.input_ids
            last_audio = max((i for i, t in enumerate(ids) if t == audio_eos), default=-1)
            into = wide if len(ids) >= self.wide_tokens else narrow
            row = row_of(p)
            row.prefix, row.prefix_len = None, 0  # pieces start from the first token
            return _Fill(row, p, last_audio + 1, into)

        waiting: list[_Pending] = []  # taken from the inbox, not yet admitted (joins are grouped)
        waited = 0  # steps the oldest of them has waited
        while True:
            if not narrow and not wide and not waiting and not filling:
                waiting = self._take(self.max_batch, self.idle_s)
                if not waiting:
                    with self._lock:
                        if self._inbox.empty():
                            self._running = False
                            return
                    continue
                if len(waiting) < self.max_batch and self.window_s > 0:  # from idle: let the others catch up
                    threading.Event().wait(self.window_s)
            joinable = (narrow.joinable or not narrow) and (wide.joinable or not wide)
            room = self.max_batch - len(narrow) - len(wide) - len(filling) if joinable else 0
            waiting += self._take(room - len(waiting), None)
            waited = waited + 1 if waiting and narrow else 0
            # Long prompts go to the chunked prefill at once. Other newcomers join in groups, since joining copies
            # the running cache: when the batch is empty, when they are a good share of it, or when the first of
            # them has waited `join_steps` steps.
            if chunked:
                filling += [to_fill(p) for p in waiting[:room] if is_long(p)]
                taken = {id(f.owner) for f in filling}
                waiting = [p for p in waiting if id(p) not in taken]
                room = self.max_batch - len(narrow) - len(wide) - len(filling) if joinable else 0
            if not narrow or len(waiting) * 8 >= len(narrow) or waited >= self.join_steps:
                new, waiting, waited = waiting[:room], waiting[room:], 0
            else:
                new = []
            try:
                rows = [row_of(p) for p in new]
                narrow.admit(rows)
                owners.update({id(r): p for r, p in zip(rows, new, strict=True)})
                if filling:  # one piece of the oldest long prompt per step
                    f = filling[0]
                    if f.owner.future.cancelled():
                        filling.pop(0)
                    else:
                        self.prefill_pieces += 1
                        if f.into.fill(f, self.prefill_chunk):
                            filling.pop(0)
                            f.row.cancelled = f.owner.future.cancelled
                            owners[id(f.row)] = f.owner
                tick += 1
                stepped = [narrow] if narrow and wide and tick % 2 else [narrow, wide]
                self.batch_sizes.append(sum(len(d) for d in stepped))
                for row in [row for d in stepped for row in d.step()]:
                    p = owners.pop(id(row))
                    answer(p, self.backend.to_generation(row.request, row.prompt, row.new_ids, row.logprobs))
            except Exception as err:  # the callers see the model's error; the next requests start a new batch
                for p in [*owners.values(), *new, *(f.owner for f in filling)]:
                    answer(p, err)
                owners.clear()
                filling.clear()
                narrow, wide = _Decoder(self.backend, prefixes), _Decoder(self.backend, prefixes)
