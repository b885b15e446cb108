"""Trajectory collection (design §6): run the Echo graph K times per data-set item and record every run for RL.

    echo-agent collect data/train.json --samples 8 --out runs/traj.jsonl --temperature 1.0 --concurrency 16

The rollout is the agent graph itself, driven by the one runner (`echo_agent.graphs.runner`), never a second
loop. Each (item, sample) becomes one `Trajectory` line (`echo_agent.training.trajectory`, the record GRPO
trains on) in a JSON-lines file: the messages (text plus audio references), the listen calls, the verdict and
its reward terms as the graph's verifier computed them, and the token-level data a trainer needs.

Runs are resumable and crash-safe (`echo_agent.jsonl`): each record is appended, flushed and fsynced as its run
finishes; a restart drops a torn last line and skips the (item, sample) keys already present, so a `kill -9` at
any moment followed by a rerun leaves every key exactly once. A full disk stops the run with `OutputError` and the
file cut back to its last whole record, so the same command resumes once there is room. Sampling is deterministic
per (item, sample): the seed of a run derives from (seed, item id, sample index), and model call i of the run
samples with that seed + i.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, Field

from ..agent import EchoAgent
from ..backends.transformers import PromptEncoder
from ..benchmarks import BenchItem
from ..errors import ConfigError, OutputError
from ..graphs.runner import RunOutcome, jobs, run_jobs, whole_threads
from ..jsonl import RecordLog, os_reason, read_records
from .trajectory import Trajectory, to_trajectory

__all__ = ["CollectSummary", "collect", "config_hash", "export_parquet", "read_parquet", "read_trajectories"]


class CollectSummary(BaseModel):
    out: str
    total: int = Field(description="(item, sample) keys asked for")
    done_before: int = Field(description="keys already in the file when this run started")
    written: int
    errors: int = Field(description="records of runs that could not run (missing or bad audio)")
    mean_reward: float = Field(description="over the records written by this run that ran")
    relisten_share: float = Field(description="share of those with at least one valid listen")
    elapsed_s: float
    trajectories_per_s: float


def config_hash(agent: EchoAgent, seed: int) -> str:
    cfg = agent.config.model_dump(mode="json")
    cfg["sampling"].pop("seed", None)  # replaced per run by sample_seed
    blob = json.dumps({"config": cfg, "model": agent.backend.name, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- the file


def read_trajectories(path: Path) -> tuple[dict[str, Trajectory], int]:
    """The records of a trajectories file by id (first wins), and the byte length of its valid part.

    A torn last line (a crash mid-write) is ignored; any other bad line raises `DataError`.
    """
    return read_records(path, Trajectory, lambda t: t.id, "trajectory")


# -------------------------------------------------------------------------------------------- collection


async def collect(
    agent: EchoAgent,
    items: Sequence[BenchItem],
    *,
    samples: int,
    out: Path,
    seed: int = 0,
    limit: int | None = None,
    concurrency: int = 8,
    progress: bool = True,
) -> CollectSummary:
    """Run `samples` rollouts of every item (the first `limit`) and append them to `out` (see the module doc).

    At most `concurrency` runs are in flight; give `agent` a batched backend (`runner.batched`) so their model
    calls share batches. The backend must expose the model's `PromptEncoder` (a local transformers model).
    """
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    if agent.config.protocol != "seg":
        raise ConfigError("collect records the seg-tag protocol (the paper's); use --protocol seg")
    encoder = getattr(agent.backend, "encoder", None)
    if not isinstance(encoder, PromptEncoder):
        raise ConfigError("collect needs a local transformers model: token-level data comes from its tokenizer")
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'traj.jsonl'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {out.parent}: {os_reason(err)}") from None
    chash = config_hash(agent, seed)

    def same_config(traj: Trajectory) -> None:
        if traj.config_hash != chash:
            raise ConfigError(
                f"{out} holds trajectories of another configuration (model, mode, sampling, reward or seed); "
                "use another --out or delete it"
            )

    selected = list(items[:limit] if limit is not None else items)
    keys = jobs(selected, samples, seed)
    head = {"model": agent.backend.name, "backend": type(agent.backend).__name__, "mode": agent.config.mode,
            "temperature": agent.config.sampling.temperature, "config_hash": chash}  # fmt: skip
    written: list[Trajectory] = []
    t0 = time.perf_counter()
    with RecordLog(out, Trajectory, lambda t: t.id, "trajectory", same_config) as log:
        # A thread unfinished by a killed run runs again whole (its graph state is gone); its turns are written
        # together when the last finishes, so a kill leaves whole threads (turns already on file keep theirs).
        todo = whole_threads(keys, log.done)
        before = sum(job.id in log.done for job in keys)
        turns_left = collections.Counter(job.thread_id for job in todo if job.thread_id is not None)
        pending: dict[str, list[Trajectory]] = {}
        label = f"collect x{samples}" if progress else None
        # aclosing: when a write fails (a full disk), the runs still in flight are cancelled at once, not when
        # the generator is collected (run_jobs is an async generator; its AsyncIterator annotation hides aclose).
        runs = cast(AsyncGenerator[RunOutcome, None], run_jobs(agent, todo, concurrency=concurrency, progress=label))
        async with contextlib.aclosing(runs):
            async for outcome in runs:
                traj = to_trajectory(outcome, encoder, agent.store, {**head, "data": str(outcome.job.item.source)})
                tid = outcome.job.thread_id
                ready = [traj]
                if tid is not None:
                    pending.setdefault(tid, []).append(traj)
                    turns_left[tid] -= 1
                    ready = pending.pop(tid) if turns_left[tid] == 0 else []
                for t in ready:
                    if t.id not in log.done:
                        log.append(t)  # OutputError (disk full): the file ends with a whole record
                        written.append(t)
    elapsed = time.perf_counter() - t0
    ran = [t for t in written if t.status != "error"]
    return CollectSummary(
        out=str(out),
        total=len(keys),
        done_before=before,
        written=len(written),
        errors=len(written) - len(ran),
        mean_reward=sum(t.reward for t in ran) / len(ran) if ran else 0.0,
        relisten_share=sum(any(c.valid for c in t.listens) for t in ran) / len(ran) if ran else 0.0,
        elapsed_s=round(elapsed, 3),
        trajectories_per_s=len(written) / elapsed if elapsed > 0 else 0.0,
    )


# ------------------------------------------------------------------------------------------------ export

# Nested, irregular fields travel as JSON text; the trainer's fields are native Parquet columns.
_JSON_COLUMNS = ("reward_terms", "verdict", "listens", "clips", "messages")


def _schema() -> Any:
    import pyarrow as pa

    span = pa.struct([("clip", pa.string()), ("sha256", pa.string()), ("path", pa.string()),
                      ("start", pa.float64()), ("end", pa.float64())])  # fmt: skip
    return pa.schema(
        [("id", pa.string()), ("item_id", pa.string()), ("sample", pa.int64()), ("seed", pa.int64()),
         ("model", pa.string()), ("backend", pa.string()), ("mode", pa.string()), ("temperature", pa.float64()),
         ("config_hash", pa.string()), ("data", pa.string()), ("question", pa.string()),
         ("choices", pa.list_(pa.string())), ("gold", pa.string()), ("status", pa.string()), ("error", pa.string()),
         ("answer", pa.string()), ("choice", pa.string()), ("correct", pa.bool_()), ("reward", pa.float64()),
         *((name, pa.string()) for name in _JSON_COLUMNS),
         ("prompt_ids", pa.list_(pa.int64())), ("response_ids", pa.list_(pa.int64())),
         ("response_mask", pa.list_(pa.int8())), ("response_logprobs", pa.list_(pa.float64())),
         ("audio_spans", pa.list_(span)), ("model_calls", pa.int64()), ("retries", pa.int64()),
         ("generated_tokens", pa.int64()), ("latency_s", pa.float64())]
    )  # fmt: skip


def export_parquet(jsonl: Path, parquet: Path) -> int:
    """Write a trajectories file as Parquet (readable by `datasets.Dataset.from_parquet`, pandas, polars...).

    One row per trajectory, in file order; returns the row count. Needs `pyarrow` (`pip install echo-agent[export]`).
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("Parquet export needs pyarrow: pip install 'echo-agent[export]'") from None
    done, _ = read_trajectories(Path(jsonl))
    rows: list[dict[str, Any]] = []
    for traj in done.values():
        row = traj.model_dump(mode="json")
        for name in _JSON_COLUMNS:
            row[name] = json.dumps(row[name])
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=_schema())
    tmp = parquet.with_name(f".{parquet.name}.tmp{os.getpid()}")
    try:
        parquet.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        os.replace(tmp, parquet)
    except OSError as err:  # a full disk: no half-written file is left, under either name
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write to {parquet}: {os_reason(err)}") from None
    return len(rows)


def read_parquet(parquet: Path) -> list[Trajectory]:
    """The trajectories of an `export_parquet` file."""
    import pyarrow.parquet as pq

    out: list[Trajectory] = []
    for row in pq.read_table(parquet).to_pylist():
        for name in _JSON_COLUMNS:
            row[name] = json.loads(row[name])
        out.append(Trajectory.model_validate(row))
    return out
