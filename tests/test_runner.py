"""The one runner (`echo_agent.graphs.runner`) that eval, collect, GRPO and the trainers' validation share, and
sampling passed at invocation: one compiled graph serves runs with different temperatures and seeds.

On the built-in tiny random Qwen2-Audio and real WAV files; a missing file is a real missing file."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import write_beeps

from echo_agent.agent import EchoAgent, load_backend
from echo_agent.backends.batching import BatchingBackend
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.benchmarks import BenchItem, load_benchmark
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.errors import ConfigError
from echo_agent.graphs.runner import STATE_KEYS, RunJob, batched, jobs, run_all, run_jobs, sample_seed

SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def backend() -> TransformersBackend:
    b = load_backend("tiny-random-qwen2-audio")
    assert isinstance(b, TransformersBackend)
    return b


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[BenchItem]:
    root = tmp_path_factory.mktemp("data")
    records = []
    for i in range(3):
        write_beeps(root / f"c{i}.wav", 3.0 + i, [(1.0, 0.2), (2.0, 0.3)], seed=i)
        records.append({"id": f"q{i}", "audio_id": f"c{i}.wav", "question": "How many beeps?",
                        "choices": ["1", "2", "3"], "answer": "2", "task": "sound"})  # fmt: skip
    records.append({**records[0], "id": "gone", "audio_id": "missing.wav"})  # a file that is not there
    (root / "data.json").write_text(json.dumps(records))
    return load_benchmark(root / "data.json")


def test_jobs_seed_each_item_and_sample_by_identity(items: list[BenchItem]) -> None:
    todo = jobs(items, samples=2, seed=7)
    assert [j.id for j in todo] == [f"{it.id}#{k}" for it in items for k in range(2)]
    assert [j.seed for j in todo] == [sample_seed(7, it.id, k) for it in items for k in range(2)]
    assert len({j.seed for j in todo}) == len(todo)
    # The seed of a run does not depend on which other runs are asked for, or in what order.
    assert {j.id: j.seed for j in jobs(items[::-1], samples=2, seed=7)} == {j.id: j.seed for j in todo}
    with pytest.raises(ConfigError, match="samples"):
        jobs(items, samples=0)


def test_runs_return_full_states_errors_as_records_and_are_order_free(
    backend: TransformersBackend, items: list[BenchItem]
) -> None:
    agent = EchoAgent(batched(backend, 8), config=AgentConfig(sampling=SAMPLED))
    todo = jobs(items, samples=2, seed=1)
    one_by_one = asyncio.run(run_all(agent, todo, concurrency=1))
    together = asyncio.run(run_all(agent, todo, concurrency=8))
    assert [o.job.id for o in together] == [j.id for j in todo]  # run_all keeps the jobs' order
    for a, b in zip(one_by_one, together, strict=True):
        if a.job.item.id == "gone":  # the missing clip is an outcome with its error, not an exception
            assert a.state is None and b.state is None and "AudioNotFoundError" in (a.error or "")
            continue
        assert a.error is None and a.state is not None and b.state is not None
        assert set(STATE_KEYS) <= set(a.state), "the full state, conversation and token ids included"
        # Same seed, same run, however many others run beside it (batched decoding reproduces the draws).
        tokens = [p.get("token_ids") for m in a.state["conversation"] for p in m["content"] if p["type"] == "text"]
        again = [p.get("token_ids") for m in b.state["conversation"] for p in m["content"] if p["type"] == "text"]
        assert tokens == again
    samples = {o.job.id: o.state["reasoning"] for o in together if o.state is not None}
    assert samples["q0#0"] != samples["q0#1"], "two samples of one item are two draws"


def test_concurrency_is_bounded(backend: TransformersBackend, items: list[BenchItem]) -> None:
    agent = EchoAgent(backend, config=AgentConfig(sampling=SamplingParams(max_new_tokens=4)))
    in_flight = peak = 0
    load = agent.load

    def counting_load(audio: object) -> object:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return load(audio)  # type: ignore[arg-type]
        finally:
            in_flight -= 1

    async def run() -> int:
        n = 0
        async for _ in run_jobs(agent, jobs(items * 3), concurrency=2):
            n += 1
        return n

    agent.load = counting_load  # type: ignore[method-assign]
    assert asyncio.run(run()) == len(items) * 3 and peak <= 2
    with pytest.raises(ConfigError, match="concurrency"):
        asyncio.run(run_all(agent, [], concurrency=0))


def test_batched_wraps_only_local_models(backend: TransformersBackend) -> None:
    assert isinstance(batched(backend, 4), BatchingBackend)
    assert batched(backend, 1) is backend
    other = BatchingBackend(backend)
    assert batched(other, 4) is other  # not a TransformersBackend: left as it is


def test_sampling_travels_with_each_run_through_one_graph(backend: TransformersBackend, items: list[BenchItem]) -> None:
    """One compiled graph (greedy by config) serves sampled runs: a run's sampling and seed come with it, and
    give what a graph compiled with those settings gives."""
    greedy = EchoAgent(backend, config=AgentConfig(sampling=SamplingParams(max_new_tokens=12)))
    hot = SAMPLED.model_copy(update={"seed": 11})
    compiled_hot = EchoAgent(backend, config=AgentConfig(sampling=hot))
    clip = items[0].audio

    async def ask(agent: EchoAgent, sampling: SamplingParams | None) -> str:
        return (await agent.ask(clip, "How many beeps?", ["1", "2", "3"], sampling=sampling)).text

    base = asyncio.run(ask(greedy, None))
    assert asyncio.run(ask(greedy, None)) == base  # greedy twice: the same
    sampled = asyncio.run(ask(greedy, hot))
    assert sampled == asyncio.run(ask(compiled_hot, None)) == asyncio.run(ask(greedy, hot))
    assert sampled != base and asyncio.run(ask(greedy, hot.model_copy(update={"seed": 12}))) != sampled
    # The runner's jobs carry their seeds the same way.
    job = RunJob(item=items[0], sample=0, seed=11)
    (outcome,) = asyncio.run(run_all(greedy, [job], sampling=SAMPLED))
    assert outcome.state is not None and outcome.state["reasoning"] == sampled
