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
  schema leaves out;
- threads: the jobs of one conversation (items sharing a `thread`, one sample of them) run strictly in turn
  order in one persistent graph thread, `thread_id = f"{thread}#{sample}"`, while other threads and single
  items run concurrently. The first distinct audio of a thread is clip "main", later new ones "clip2", ...
  (`chat.next_clip_name`), and each turn's `active_clip` is its own clip (the chat `/load` case). Threads need
  a graph with a checkpointer (`EchoAgent(..., checkpointer=InMemorySaver())`); a thread is started afresh
  (its old checkpoints deleted) every time it runs and its checkpoints are deleted when it ends (each
  outcome holds its full state), and a turn that errors ends its thread: the later turns become errors too,
  as they would be asked without their context. On such a graph a single item runs in a throwaway thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_type_hints

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from pydantic import BaseModel, ConfigDict, Field

from ..benchmarks import BenchItem
from ..chat import next_clip_name
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

    @property
    def thread_id(self) -> str | None:
        """'<thread>#<sample>': the graph thread this job's conversation runs in; None for a single item."""
        return None if self.item.thread is None else f"{self.item.thread}#{self.sample}"


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


def has_threads(items: Sequence[BenchItem]) -> bool:
    """Whether any item is a thread turn (then the agent needs a checkpointer: `InMemorySaver` will do)."""
    return any(item.thread is not None for item in items)


def whole_threads(todo: Sequence[RunJob], done: Collection[str]) -> list[RunJob]:
    """What a resumed run must do: the jobs of `todo` whose ids are not in `done`, plus every job of each
    thread that is not done completely (its graph state is gone, so the whole conversation runs again)."""
    unfinished = {job.thread_id for job in todo if job.thread_id is not None and job.id not in done}
    return [job for job in todo if job.id not in done or job.thread_id in unfinished]


def _units(todo: Sequence[RunJob]) -> list[list[RunJob]]:
    """The jobs as units of work: a single job, or a thread's jobs in turn order (turns 0..n-1, no gap)."""
    units: list[list[RunJob]] = []
    threads: dict[str, list[RunJob]] = {}
    for job in todo:
        tid = job.thread_id
        if tid is None:
            units.append([job])
        elif tid in threads:
            threads[tid].append(job)
        else:
            threads[tid] = [job]
            units.append(threads[tid])
    for tid, turns in threads.items():
        turns.sort(key=lambda j: j.item.turn)
        if [j.item.turn for j in turns] != list(range(len(turns))):
            have = ", ".join(str(j.item.turn) for j in turns)
            raise ConfigError(f"thread {tid}: its jobs must be turns 0, 1, ... without gaps or repeats, got {have}")
    return units


async def run_one(
    agent: EchoAgent,
    job: RunJob,
    sampling: SamplingParams | None = None,
    *,
    clip_names: dict[str, str] | None = None,
) -> RunOutcome:
    """Run the graph once for `job`; bad input becomes the outcome's error.

    A thread turn (`job.thread_id` set) runs in that graph thread; `clip_names` (audio sha256 -> clip id) is the
    thread's clips so far, updated here, so a new audio becomes the next clip (`chat.next_clip_name`)."""
    t0 = time.perf_counter()
    base = sampling or agent.config.sampling
    context = EchoContext(sampling=base.model_copy(update={"seed": job.seed}))
    item = job.item
    kind = None if item.answer_kind == "choice" else item.answer_kind
    config: RunnableConfig = {}
    saver = _checkpointer(agent)
    scratch: str | None = None  # a single item on a graph with a checkpointer: a throwaway thread
    try:
        ref = await asyncio.to_thread(agent.load, item.audio)
        if job.thread_id is None:
            clip, active = "main", None
            if saver is not None:
                scratch = f"single:{job.id}"
                config = {"configurable": {"thread_id": scratch}}
                await saver.adelete_thread(scratch)
        else:
            names = clip_names if clip_names is not None else {}
            clip = names.setdefault(ref.sha256, next_clip_name(names.values()))
            active = clip
            config = {"configurable": {"thread_id": job.thread_id}}
        inputs = new_question(
            item.question, {clip: ref.model_dump()}, item.choices, item.answer, active_clip=active, answer_kind=kind
        )
        state = await agent.graph.ainvoke(inputs, config, context=context, output_keys=STATE_KEYS)
    except EchoError as err:
        return RunOutcome(job, None, f"{type(err).__name__}: {err}", round(time.perf_counter() - t0, 4))
    finally:
        if scratch is not None and saver is not None:
            await saver.adelete_thread(scratch)  # the outcome holds the state; the checkpoints would only pile up
    return RunOutcome(job, dict(state), None, round(time.perf_counter() - t0, 4))


def _checkpointer(agent: EchoAgent) -> BaseCheckpointSaver[Any] | None:
    saver = getattr(agent.graph, "checkpointer", None)
    return saver if isinstance(saver, BaseCheckpointSaver) else None


async def run_thread(
    agent: EchoAgent,
    turns: Sequence[RunJob],
    sampling: SamplingParams | None = None,
    sem: asyncio.Semaphore | None = None,
) -> AsyncIterator[RunOutcome]:
    """Run one thread's jobs (turns 0..n-1 of one sample) in order in one graph thread; yield each outcome.

    The thread starts afresh: its old checkpoints (a previous run of the same thread) are deleted first. After
    a turn that errors, the later turns are not asked: each becomes an error naming the failed turn. `sem`
    bounds the runs in flight, one slot per turn."""
    saver = _checkpointer(agent)
    if saver is None:
        raise ConfigError("thread items need an agent whose graph has a checkpointer (e.g. InMemorySaver)")
    tid = turns[0].thread_id
    if tid is None or any(j.thread_id != tid for j in turns):
        raise ConfigError("run_thread takes the jobs of one thread and one sample")
    await saver.adelete_thread(tid)
    names: dict[str, str] = {}
    failed: str | None = None
    try:
        for job in turns:
            if failed is not None:
                yield RunOutcome(job, None, f"ThreadError: not asked: {failed}", 0.0)
                continue
            if sem is None:
                outcome = await run_one(agent, job, sampling, clip_names=names)
            else:
                async with sem:
                    outcome = await run_one(agent, job, sampling, clip_names=names)
            if outcome.error is not None:
                failed = f"turn {job.item.turn} ({job.item.id}) of thread {tid} failed: {outcome.error}"
            yield outcome
    finally:
        await saver.adelete_thread(tid)  # every turn's outcome holds its state; free the checkpoints


async def run_jobs(
    agent: EchoAgent,
    todo: Sequence[RunJob],
    *,
    concurrency: int = 1,
    sampling: SamplingParams | None = None,
    progress: str | None = None,
) -> AsyncIterator[RunOutcome]:
    """Run every job, at most `concurrency` at once; yield outcomes as they finish. `sampling` (default: the
    agent config's) is used with each job's seed. `progress` labels a progress bar on stderr.

    The jobs of a thread run in turn order in one graph thread (`run_thread`); they must be turns 0..n-1 of it
    and the agent's graph needs a checkpointer (else `ConfigError`, before anything runs)."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    units = _units(todo)
    if any(unit[0].thread_id is not None for unit in units) and _checkpointer(agent) is None:
        raise ConfigError(
            "thread items need an agent whose graph has a checkpointer: "
            "EchoAgent(..., checkpointer=langgraph.checkpoint.memory.InMemorySaver())"
        )
    sem = asyncio.Semaphore(concurrency)
    finished: asyncio.Queue[RunOutcome | Exception] = asyncio.Queue()

    async def run(unit: list[RunJob]) -> None:
        try:
            if unit[0].thread_id is None:
                async with sem:
                    await finished.put(await run_one(agent, unit[0], sampling))
            else:
                async for outcome in run_thread(agent, unit, sampling, sem):
                    await finished.put(outcome)
        except Exception as err:  # a bug or a backend failure: re-raised to the caller, as before
            await finished.put(err)

    tasks = [asyncio.create_task(run(unit)) for unit in units]
    try:
        with progress_bar(progress, len(todo)) as advance:
            for _ in range(len(todo)):
                got = await finished.get()
                if isinstance(got, Exception):
                    raise got
                yield got
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
    "has_threads",
    "jobs",
    "progress_bar",
    "run_all",
    "run_id",
    "run_jobs",
    "run_one",
    "run_thread",
    "sample_seed",
    "whole_threads",
]
