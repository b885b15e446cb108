"""Batched generation (`echo_agent.backends.batching`) against the single-request path, on real tiny models.

Each batch mixes what the graph really sends: fresh questions, a continued assistant turn with an inserted
re-listened slice, different prompt lengths (so left padding is exercised), different budgets, stop strings,
suppressed strings and seeds. Every row must come back exactly as `TransformersBackend.generate` makes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import write_beeps

from echo_agent.audio import AudioStore
from echo_agent.backends.base import AudioResolver, Generation, GenerationRequest
from echo_agent.backends.batching import BatchingBackend, generate_batch
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.config import SamplingParams
from echo_agent.echo_tiny import EchoTinySizes, new_echo_tiny
from echo_agent.messages import Message, audio_part, text_part
from echo_agent.tiny_models import build_tiny_qwen2_audio

Request = tuple[GenerationRequest, AudioResolver]


def _echo_tiny() -> tuple[Any, Any]:
    corpus = ["How many beeps are there? <think> I hear a beep <seg>1.0, 2.0</seg> </think><answer>2</answer>"] * 4
    sizes = EchoTinySizes(hidden_size=64, layers=2, intermediate_size=128, vocab_size=300)
    model, processor = new_echo_tiny(sizes, corpus)
    # At its 0.02 init a fresh echo-tiny repeats one token whatever the input; wider weights make its output
    # depend on the context (audio included), so equal outputs mean something.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(param.numel()))
    return model, processor


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen2-audio": lambda: build_tiny_qwen2_audio(seed=0),
    "echo-tiny": _echo_tiny,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def backend(request: pytest.FixtureRequest) -> TransformersBackend:
    return TransformersBackend(*BUILDERS[request.param]())


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[AudioStore, list[AudioResolver]]:
    store = AudioStore()
    out: list[AudioResolver] = []
    for i in range(3):
        path = tmp_path_factory.mktemp("clips") / f"c{i}.wav"
        write_beeps(path, 3.0 + 1.5 * i, [(1.0, 0.2), (2.0 + 0.3 * i, 0.3)], seed=i)
        out.append(AudioResolver(store, {"main": store.load(path)}))
    return store, out


def _requests(audio: list[AudioResolver], sampling: list[SamplingParams], stops: list[list[str]]) -> list[Request]:
    """Three requests as the graph makes them: two fresh questions (different lengths), one continued turn."""
    out: list[Request] = []
    for i, (s, stop) in enumerate(zip(sampling, stops, strict=True)):
        msgs: list[Message] = [
            {"role": "user", "content": [audio_part("main"), text_part("How many beeps are there?" + " Listen." * i)]}
        ]
        if i == 2:  # a partial assistant turn with a re-listened slice, continued in place
            msgs.append(
                {
                    "role": "assistant",
                    "content": [text_part("<think>a beep <seg>1.0, 2.0</seg>", "model"), audio_part("main", 1.0, 2.0)],
                }
            )
        out.append((GenerationRequest(messages=msgs, continue_final=i == 2, stop=stop, sampling=s), audio[i]))
    return out


def _stop_in(backend: TransformersBackend, gen: Generation) -> tuple[str, int] | None:
    """A printable token of `gen` whose text first appears there, and how many tokens end with it."""
    for j in range(3, len(gen.token_ids)):
        piece = backend.tokenizer.decode(gen.token_ids[j : j + 1])
        before = backend.tokenizer.decode(gen.token_ids[:j])
        if piece.isascii() and piece.isprintable() and piece.strip() and piece not in before + piece[:-1]:
            return piece, j + 1
    return None


def _single(backend: TransformersBackend, requests: list[Request]) -> list[Generation]:
    return [asyncio.run(backend.generate(req, audio)) for req, audio in requests]


def _batched(backend: TransformersBackend, requests: list[Request]) -> list[Generation]:
    return generate_batch(backend, [(req, backend.encode(req, audio)) for req, audio in requests])


def _assert_same(single: list[Generation], batched: list[Generation]) -> None:
    for a, b in zip(single, batched, strict=True):
        assert b.token_ids == a.token_ids
        assert b.text == a.text
        assert (b.finish_reason, b.stop_string) == (a.finish_reason, a.stop_string)
        assert b.prompt_ids == a.prompt_ids
        assert len(b.logprobs) == len(b.token_ids)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)


def test_greedy_batch_equals_single_requests(
    backend: TransformersBackend, clips: tuple[AudioStore, list[AudioResolver]]
) -> None:
    sampling = [SamplingParams(max_new_tokens=n) for n in (12, 20, 16)]
    requests = _requests(clips[1], sampling, [[], [], []])
    single = _single(backend, requests)
    assert [len(g.token_ids) for g in single] == [12, 20, 16] or any(g.finish_reason == "eos" for g in single)
    _assert_same(single, _batched(backend, requests))


def test_stop_strings_budgets_and_seeds_stay_per_request(
    backend: TransformersBackend, clips: tuple[AudioStore, list[AudioResolver]]
) -> None:
    # Stop strings the model will really produce: a token of each row's own unconstrained greedy output.
    free = _single(backend, _requests(clips[1], [SamplingParams(max_new_tokens=24)] * 3, [[], [], []]))
    found = [_stop_in(backend, g) for g in free[:2]]
    stops: list[list[str]] = [[f[0]] if f else [] for f in found] + [[]]
    sampling = [
        SamplingParams(max_new_tokens=24),
        SamplingParams(max_new_tokens=24, temperature=0.9, top_k=20, seed=11),
        SamplingParams(max_new_tokens=7, temperature=1.3, top_p=0.8, seed=5),
    ]
    requests = _requests(clips[1], sampling, stops)
    single = _single(backend, requests)
    batched = _batched(backend, requests)
    _assert_same(single, batched)
    # Greedy row 0 stops right on its stop string, well before its budget.
    assert found[0] is not None
    assert batched[0].finish_reason == "stop" and batched[0].stop_string == found[0][0]
    assert len(batched[0].token_ids) == found[0][1]
    assert len(batched[2].token_ids) <= 7


def test_suppressed_strings_are_never_generated(
    backend: TransformersBackend, clips: tuple[AudioStore, list[AudioResolver]]
) -> None:
    free = _single(backend, _requests(clips[1], [SamplingParams(max_new_tokens=16)] * 3, [[], [], []]))
    # A token the model chose, whose text encodes back to just that token: suppressing the text bans the token.
    pieces = [(t, backend.tokenizer.decode([t])) for t in free[0].token_ids]
    token, banned = next((t, p) for t, p in pieces if p.isprintable() and backend.encoder.encode_text(p) == [t])
    base = _requests(clips[1], [SamplingParams(max_new_tokens=16)] * 3, [[], [], []])
    requests = [(r.model_copy(update={"suppress": [banned]}) if i == 0 else r, a) for i, (r, a) in enumerate(base)]
    batched = _batched(backend, requests)
    _assert_same(_single(backend, requests), batched)
    assert token in free[0].token_ids and token not in batched[0].token_ids


async def test_concurrent_requests_share_a_continuous_batch(
    backend: TransformersBackend, clips: tuple[AudioStore, list[AudioResolver]]
) -> None:
    # Different budgets: rows leave the batch at different steps and waiting requests take their places.
    sampling = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=s) for s, n in ((1, 6), (2, 14), (3, 10))]
    requests = _requests(clips[1], sampling, [[], [], []]) * 2
    batcher = BatchingBackend(backend, max_batch=4, window_s=0.05)
    deltas: list[str] = []
    got = await asyncio.gather(*(batcher.generate(r, a, on_delta=deltas.append) for r, a in requests))
    assert max(batcher.batch_sizes) == 4  # requests decoded together, never more than max_batch
    assert len(batcher.batch_sizes) < sum(len(g.token_ids) for g in got)  # fewer steps than one at a time
    want = [await backend.generate(r, a) for r, a in requests[:3]]
    _assert_same(want * 2, list(got))
    assert sorted(deltas) == sorted(g.text for g in got if g.text)


@pytest.mark.parametrize("wide", ["none", "some"])
async def test_long_prompts_prefill_in_pieces_between_steps(
    backend: TransformersBackend, clips: tuple[AudioStore, list[AudioResolver]], wide: str
) -> None:
    """With a prefill piece smaller than every prompt, each request is prefilled a piece per step (its first piece
    past its last clip, the continued turn's inserted slice included) while the rows already in decode on; with
    some prompts past `wide_tokens`, those decode in the second batch. Every row still comes back as the
    single-request path makes it."""
    sampling = [SamplingParams(max_new_tokens=n) for n in (12, 20, 16)]
    requests = _requests(clips[1], sampling, [[], [], []])
    lengths = sorted(len(backend.encode(r, a).input_ids) for r, a in requests)
    piece = max(1, lengths[0] // 4)
    batcher = BatchingBackend(backend, max_batch=4, window_s=0.0, prefill_chunk=piece, long_prompt=piece,
                              wide_tokens=lengths[1] if wide == "some" else 10**9)  # fmt: skip
    first = asyncio.create_task(batcher.generate(*requests[0]))
    while not batcher.batch_sizes or batcher.batch_sizes[-1] == 0:  # the first row is decoding
        await asyncio.sleep(0.001)
    got = [await first, *await asyncio.gather(*(batcher.generate(r, a) for r, a in requests[1:]))]
    assert batcher.prefill_pieces > len(requests)  # prompts were split into pieces
    assert max(batcher.batch_sizes) >= 2  # and rows joined a running batch
    _assert_same([await backend.generate(r, a) for r, a in requests], got)


async def test_prompts_under_the_long_prompt_size_are_prefilled_whole_together(
    backend: TransformersBackend, clips: tuple[AudioStore, list[AudioResolver]]
) -> None:
    """Prompts longer than a prefill piece but shorter than `long_prompt` are not queued for the one-at-a-time
    chunked prefill: they are prefilled whole with the other newcomers and decode side by side at once."""
    sampling = [SamplingParams(max_new_tokens=n) for n in (12, 20, 16)]
    requests = _requests(clips[1], sampling, [[], [], []])
    lengths = sorted(len(backend.encode(r, a).input_ids) for r, a in requests)
    batcher = BatchingBackend(backend, max_batch=4, window_s=0.05, prefill_chunk=max(1, lengths[0] // 4),
                              long_prompt=lengths[-1] + 1)  # fmt: skip
    got = await asyncio.gather(*(batcher.generate(r, a) for r, a in requests))
    assert batcher.prefill_pieces == 0
    assert batcher.batch_sizes[0] == len(requests)  # admitted together, not one piece per step
    _assert_same([await backend.generate(r, a) for r, a in requests], list(got))


async def test_a_continued_turn_reuses_the_finished_rows_cache_and_matches_the_single_path(
    backend: TransformersBackend, clips: tuple[AudioStore, list[AudioResolver]], tmp_path: Any
) -> None:
    """A row that ends on a stop string leaves its keys and values behind; the same run's next call (its prompt
    plus the text just written and an inserted slice) prefills only what is new, and comes back exactly as the
    single-request path makes it. Another clip of the same length gives the same token ids but other audio: its
    prompt may share the cache only up to its first audio block."""
    store, audio = clips
    ask = text_part("How many beeps are there?")
    question: list[Message] = [{"role": "user", "content": [audio_part("main"), ask]}]
    free = await backend.generate(GenerationRequest(messages=question, sampling=SamplingParams(max_new_tokens=24)),
                                  audio[0])  # fmt: skip
    found = _stop_in(backend, free)
    assert found is not None
    first = GenerationRequest(messages=question, stop=[found[0]], sampling=SamplingParams(max_new_tokens=24))
    batcher = BatchingBackend(backend, max_batch=4, window_s=0.0)
    gen = await batcher.generate(first, audio[0])
    assert gen.finish_reason == "stop"
    assert batcher.prefixes is not None and batcher.prefixes.hits == 0
    turn: Message = {"role": "assistant", "content": [text_part(gen.text, "model"), audio_part("main", 1.0, 2.0)]}
    then = GenerationRequest(
        messages=[*question, turn], continue_final=True, sampling=SamplingParams(max_new_tokens=16)
    )
    got = await batcher.generate(then, audio[0])
    assert batcher.prefixes.hits == 1
    assert batcher.prefixes.reused_tokens >= len(gen.prompt_ids)  # the whole first prompt, clip included
    _assert_same([await backend.generate(then, audio[0])], [got])

    other = write_beeps(tmp_path / "other.wav", 3.0, [(0.5, 0.4), (1.5, 0.1), (2.5, 0.2)], freq=440.0, seed=9)
    elsewhere = AudioResolver(store, {"main": store.load(other)})
    reused = batcher.prefixes.reused_tokens
    got = await batcher.generate(then, elsewhere)
    bos = backend.encode(then, elsewhere).audios[0].input_ids[0]
    assert batcher.prefixes.reused_tokens - reused <= list(backend.encode(then, elsewhere).input_ids).index(bos)
    _assert_same([await backend.generate(then, elsewhere)], [got])


async def test_a_cancelled_request_leaves_the_batch_at_once(
    backend: TransformersBackend, clips: tuple[AudioStore, list[AudioResolver]]
) -> None:
    """A caller that gives up (its task cancelled: a failed collect, a closed connection) stops costing decode
    steps: its row leaves the batch at the next step instead of decoding to its budget, and the decoder thread ends."""
    _, audio = clips
    batcher = BatchingBackend(backend, max_batch=4, idle_s=0.05)
    budget = 400
    ((request, resolver),) = _requests(audio[:1], [SamplingParams(max_new_tokens=budget)], [[]])
    never_ends = request.model_copy(update={"suppress": []})
    task = asyncio.create_task(batcher.generate(never_ends, resolver))
    while not batcher.batch_sizes:  # decoding has started
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(400):  # the thread winds down: one more step at most, then idle_s
        if not batcher._running:
            break
        await asyncio.sleep(0.01)
    assert not batcher._running
    assert len(batcher.batch_sizes) < budget // 4, "the cancelled row did not decode to its budget"


def test_feature_cache_is_bounded_by_bytes(clips: tuple[AudioStore, list[AudioResolver]]) -> None:
    """A Qwen2-Audio feature entry is 128 x 3000 floats whatever the slice: the cache holds bytes, not just a
    count, so a server that heard many long clips does not keep hundreds of MB of features."""
    from echo_agent.backends.transformers import PromptEncoder
    from echo_agent.tiny_models import build_qwen2_audio_processor

    _, resolvers = clips
    one_entry = 128 * 3000 * 4
    encoder = PromptEncoder(build_qwen2_audio_processor(), feature_cache_size=256, feature_cache_bytes=3 * one_entry)
    for k in range(8):
        encoder.encode_audio_part(audio_part("main", 0.1 * k, 0.1 * k + 1.0), resolvers[0])
        assert encoder._cached_bytes <= 3 * one_entry + 3 * 3000 * 8
    assert 1 <= len(encoder._features) <= 3
    # An entry still in the cache is a hit (the same object), an evicted one is encoded again.
    last = audio_part("main", 0.7, 1.7)
    assert encoder.encode_audio_part(last, resolvers[0]) is encoder.encode_audio_part(last, resolvers[0])


def test_stop_criteria_are_built_per_tokenizer() -> None:
    """Criteria for the same stop string on two vocabularies are two criteria: one built for another tokenizer's
    ids missed `</seg>` (an echo-tiny 2 test left one behind, and a later model never stopped to listen)."""
    from echo_agent.backends.batching import _STOPS

    tokenizers = [BUILDERS[name]()[1].tokenizer for name in ("qwen2-audio", "echo-tiny")]
    first, second = (_STOPS.get(t, ["</seg>"]) for t in tokenizers)
    assert first is not None and second is not None and first is not second
    assert _STOPS.get(tokenizers[0], ["</seg>"]) is first  # still built once per tokenizer
    for tok, crit in zip(tokenizers, (first, second), strict=True):
        ids = torch.tensor([tok.encode("<think>I listen <seg>1.0, 2.0</seg>", add_special_tokens=False)])
        assert bool(crit(ids, torch.empty(0))[0])
