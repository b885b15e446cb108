"""The one driver for many runs of the Echo graph: `eval`, `collect`, GRPO's rollout groups and the trainers'
validation all go through `run_jobs`.

It owns what every batch caller needs alike:
- concurrency: at most `concurrency` runs in flight, sharing the model through continuous batching when the
  agent's backend is a `BatchingBackend` (`batched` wraps a local model in one);
- seeds: each run samples with a seed that depends only on (seed, item id, sample index) (`sample_seed`), so
  reruns and resumes sample alike whatever the order runs finish in;
- errors as records: a run whose input is bad (missing or undecodable audio, a bad clip) ends as an outcome
  with its error, never as an exception that stops the others;
- the full final state of each run (the conversation, token ids, log-probs), which the graph's narrow output
  schema leaves out.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field

from ..benchmarks import BenchItem
from ..config import SamplingParams
from ..errors import ConfigError, EchoError
from .state import EchoContext, EchoState, new_question

if TYPE_CHECKING:
    from ..agent import EchoAgent
    from ..backends.base import ModelBackend

STATE_KEYS = list(get_type_hints(EchoState))


def sample_seed(seed: int, item_id: str, sample: int) -> int:
    """A seed that depends only on (seed, item id, sample index): reruns and resumes sample alike."""
    digest = hashlib.sha256(f"{seed}\x00{item_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # 31 bits: valid for every RNG that takes a seed


def run_id(item_id: str, sample: int) -> str:
    """'<item id>#<sample>': the key of one run in eval's and collect's files."""
    return f"{item_id}#{sample}"


class RunJob(BaseModel):
    """One graph run to do: a question about a clip, and which sample of it this is."""

    model_config = ConfigDict(frozen=True)

    item: BenchItem
    sample: int = Field(0, ge=0)
    seed: int = Field(description="this run's sampling seed; model call i samples with seed + i")

    @property
    def id(self) -> str:
        return run_id(self.item.id, self.sample)


def jobs(items: Sequence[BenchItem], samples: int = 1, seed: int = 0) -> list[RunJob]:
    """`samples` runs of every item, each with its own seed."""
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    return [RunJob(item=it, sample=k, seed=sample_seed(seed, it.id, k)) for it in items for k in range(samples)]


@dataclass
class RunOutcome:
    """A finished run: its full final state, or the error that stopped it."""

    job: RunJob
    state: dict[str, Any] | None
    error: str | None
    latency_s: float


def batched(backend: ModelBackend, max_batch: int = 32) -> ModelBackend:
    """A local transformers model behind continuous batching (so concurrent runs share decode steps); any other
    backend (a remote server batches itself) as it is."""
    from ..backends.transformers import TransformersBackend

    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    if max_batch == 1 or not isinstance(backend, TransformersBackend):
        return backend
    from ..backends.batching import BatchingBackend

    return BatchingBackend(backend, max_batch=max_batch)


async def run_one(agent: EchoAgent, job: RunJob, sampling: SamplingParams | None = None) -> RunOutcome:
    """Run the graph once for `job`; bad input becomes the outcome's error."""
    t0 = time.perf_counter()
    base = sampling or agent.config.sampling
    context = EchoContext(sampling=base.model_copy(update={"seed": job.seed}))
    try:
        ref = await asyncio.to_thread(agent.load, job.item.audio)
        inputs = new_question(job.item.question, {"main": ref.model_dump()}, job.item.choices, job.item.answer)
        state = await agent.graph.ainvoke(inputs, context=context, output_keys=STATE_KEYS)
    except EchoError as err:
        return RunOutcome(job, None, f"{type(err).__name__}: {err}", round(time.perf_counter() - t0, 4))
    return RunOutcome(job, dict(state), None, round(time.perf_counter() - t0, 4))


async def run_jobs(
    agent: EchoAgent,
    todo: Sequence[RunJob],
    *,
    concurrency: int = 1,
    sampling: SamplingParams | None = None,
    progress: str | None = None,
) -> AsyncIterator[RunOutcome]:
    """Run every job, at most `concurrency` at once; yield outcomes as they finish. `sampling` (default: the
    agent config's) is used with each job's seed. `progress` labels a progress bar on stderr."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    sem = asyncio.Semaphore(concurrency)

    async def run(job: RunJob) -> RunOutcome:
        async with sem:
            return await run_one(agent, job, sampling)

    tasks = [asyncio.create_task(run(job)) for job in todo]
    try:
        with progress_bar(progress, len(tasks)) as advance:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
                advance()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_all(
    agent: EchoAgent, todo: Sequence[RunJob], *, concurrency: int = 1, sampling: SamplingParams | None = None
) -> list[RunOutcome]:
    """`run_jobs`, collected in the jobs' order."""
    done = {o.job.id: o async for o in run_jobs(agent, todo, concurrency=concurrency, sampling=sampling)}
    return [done[job.id] for job in todo]


@contextmanager
def progress_bar(label: str | None, total: int) -> Iterator[Any]:
    if label is None:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def accuracy(outcomes: Sequence[RunOutcome]) -> float:
    """Share of runs whose verdict is correct (errored runs count as wrong): the trainers' validation score."""
    correct = [bool(o.state and o.state["verdict"] and o.state["verdict"]["correct"]) for o in outcomes]
    return sum(correct) / max(1, len(correct))


__all__ = [
    "STATE_KEYS",
    "RunJob",
    "RunOutcome",
    "accuracy",
    "batched",
    "jobs",
    "progress_bar",
    "run_all",
    "run_id",
    "run_jobs",
    "run_one",
    "sample_seed",
]
