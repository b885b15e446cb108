"""Trajectory collection (design §6): run the Echo graph K times per data-set item and record every run for RL.

    echo-agent collect data/train.json --samples 8 --out runs/traj.jsonl --temperature 1.0 --concurrency 16

The rollout is the agent graph itself (`EchoAgent.graph`), never a second loop. Each (item, sample) becomes one
`Trajectory` line in the JSON-lines file, holding the messages (text plus audio references), the listen calls,
the verdict and its reward terms, and the token-level data a trainer needs (verl's `AgentLoopOutput` shape):

- `prompt_ids`: the exact input of the first model call (the question turn up to `<|im_start|>assistant\\n`);
- `response_ids`: everything after it, as the final model call saw it plus what it sampled: sampled tokens
  (exactly the sampled ids, never re-tokenised), inserted audio placeholders, notes and runtime text;
- `response_mask`: 1 on sampled tokens, 0 on inserted audio, notes and runtime text;
- `response_logprobs`: the sampling policy's log-prob of each sampled token (0.0 where the mask is 0);
- `audio_spans`: every audio input in placeholder order (clip hash, path, start/end; None/None = whole clip).

`model_inputs` rebuilds the model's exact inputs (ids, mask, audio features) from a record with the same
`PromptEncoder` the backend used, so a trainer recomputes log-probs on exactly the sampled ids.

With a verifier retry the response holds the first attempt as context with mask 0: the retry call saw that
attempt re-rendered by the chat template, not as its sampled ids, so those tokens carry no sampling log-prob
in this sequence. The tokens of the final attempt, the one the reward judges, are all exact and masked 1.

Runs are resumable and crash-safe: each record is appended, flushed and fsynced as its run finishes; a restart
drops a torn last line and skips the (item, sample) keys already present, so a `kill -9` at any moment followed
by a rerun leaves every key exactly once. Sampling is deterministic per (item, sample): the seed of a run derives
from (seed, item id, sample index), and model call i of the run samples with that seed + i.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..agent import EchoAgent
from ..audio import AudioRef, AudioStore
from ..backends.base import AudioResolver, GenerationRequest
from ..backends.transformers import EncodedAudio, PromptEncoder
from ..errors import ConfigError, EchoError
from ..graphs import EchoInput, new_question
from ..messages import Message, audio_part
from ..tools.listen import ListenCall
from ..verifier import RewardTerms, Verdict
from .eval import BenchItem, DataError, _progress_bar

__all__ = [
    "AudioSpan",
    "CollectSummary",
    "Trajectory",
    "collect",
    "export_parquet",
    "model_inputs",
    "read_parquet",
    "read_trajectories",
    "sample_seed",
    "sequence_logprobs",
    "trajectory_id",
]


class AudioSpan(BaseModel):
    """One audio input of a trajectory, by reference: enough to cut and encode the same samples again."""

    model_config = ConfigDict(frozen=True)

    clip: str
    sha256: str = Field(description="content hash of the clip's file; a changed file is refused")
    path: str = Field(description="the clip's file (absolute, as loaded)")
    start: float | None = Field(description="seconds; None with end None = the whole clip")
    end: float | None


class Trajectory(BaseModel):
    """One finished run of the graph: the record between rollout and trainer (design §6)."""

    id: str = Field(description="'<item id>#<sample>'")
    item_id: str
    sample: int
    seed: int = Field(description="the run's sampling seed; model call i samples with seed + i")
    model: str
    backend: str
    mode: str
    temperature: float
    config_hash: str = Field(description="hash of everything that shapes a run: agent config, model, seed")
    data: str = Field(description="the data file")
    question: str
    choices: list[str]
    gold: str | None
    status: Literal["answered", "no_answer", "error"]
    error: str | None = None
    answer: str | None = None
    choice: str | None = None
    correct: bool | None = None
    reward: float = 0.0
    reward_terms: RewardTerms | None = None
    verdict: Verdict | None = None
    listens: list[ListenCall] = Field(default_factory=list)
    clips: dict[str, AudioRef] = Field(default_factory=dict)
    messages: list[Message] = Field(
        default_factory=list, description="the conversation; text parts without their token ids (see response_ids)"
    )
    prompt_ids: list[int] = Field(default_factory=list)
    response_ids: list[int] = Field(default_factory=list)
    response_mask: list[int] = Field(default_factory=list, description="1 on sampled tokens, else 0")
    response_logprobs: list[float] = Field(default_factory=list, description="0.0 where response_mask is 0")
    audio_spans: list[AudioSpan] = Field(default_factory=list, description="audio inputs in placeholder order")
    model_calls: int = 0
    retries: int = 0
    generated_tokens: int = 0
    latency_s: float = 0.0


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


def trajectory_id(item_id: str, sample: int) -> str:
    return f"{item_id}#{sample}"


def sample_seed(seed: int, item_id: str, sample: int) -> int:
    """A seed that depends only on (seed, item id, sample index): reruns and resumes sample alike."""
    digest = hashlib.sha256(f"{seed}\x00{item_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # 31 bits: valid for every RNG that takes a seed


def config_hash(agent: EchoAgent, seed: int) -> str:
    cfg = agent.config.model_dump(mode="json")
    cfg["sampling"].pop("seed", None)  # replaced per run by sample_seed
    blob = json.dumps({"config": cfg, "model": agent.backend.name, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- token data


def _spans(messages: Sequence[Message], clips: dict[str, AudioRef]) -> list[AudioSpan]:
    return [
        AudioSpan(
            clip=p["clip"], sha256=clips[p["clip"]].sha256, path=clips[p["clip"]].path, start=p["start"], end=p["end"]
        )
        for m in messages
        for p in m["content"]
        if p["type"] == "audio"
    ]


def token_data(
    encoder: PromptEncoder, conversation: list[Message], question_start: int, audio: AudioResolver
) -> dict[str, Any]:
    """prompt/response ids, mask and log-probs of a finished seg-protocol conversation (see the module doc)."""
    if not conversation or conversation[-1]["role"] != "assistant":
        raise EchoError("the conversation does not end with an assistant turn")
    first = encoder.encode(GenerationRequest(messages=conversation[:question_start]), audio).input_ids
    full = encoder.encode(GenerationRequest(messages=conversation, continue_final=True), audio)
    n = 0  # the prompt is the first call's input; a retry re-renders text after it, never before it
    while n < min(len(first), len(full.input_ids)) and first[n] == full.input_ids[n]:
        n += 1
    sampled = [
        lp
        for p in conversation[-1]["content"]
        if p["type"] == "text" and p["origin"] == "model"
        for lp in p.get("logprobs", [])
    ]
    mask = full.loss_mask[n:]
    if sum(full.loss_mask[:n]) or sum(mask) != len(sampled):
        raise EchoError(f"{sum(mask)} trainable tokens but {len(sampled)} sampled log-probs")
    it = iter(sampled)
    logprobs = [next(it) if m else 0.0 for m in mask]
    return {
        "prompt_ids": full.input_ids[:n],
        "response_ids": full.input_ids[n:],
        "response_mask": mask,
        "response_logprobs": logprobs,
    }


def _strip_tokens(messages: Sequence[Message]) -> list[Message]:
    """The messages without per-part token ids and log-probs (they live in the token fields once)."""
    out: list[Message] = []
    for m in messages:
        parts = [
            {k: v for k, v in p.items() if k not in ("token_ids", "logprobs")} if p["type"] == "text" else p
            for p in m["content"]
        ]
        out.append({**m, "content": parts})  # type: ignore[typeddict-item]
    return out


def model_inputs(
    traj: Trajectory, encoder: PromptEncoder, store: AudioStore | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The exact model inputs of a trajectory, batch of one: `input_ids`, `attention_mask`, the audio features
    (`input_features`, `feature_attention_mask`), plus `loss_mask` and `old_logprobs` over the whole sequence.

    Audio is cut again from `audio_spans` (the files must still hash the same) and encoded by the processor; each
    clip's placeholder ids are checked against the record, so features and placeholders provably line up.
    """
    if traj.status == "error":
        raise EchoError(f"trajectory {traj.id} has no token data ({traj.error})")
    store = store or AudioStore()
    refs = {s.clip: traj.clips[s.clip] for s in traj.audio_spans}
    resolver = AudioResolver(store, refs)
    ids = traj.prompt_ids + traj.response_ids
    audios: list[EncodedAudio] = []
    pos = 0
    for span in traj.audio_spans:
        enc = encoder.encode_audio_part(audio_part(span.clip, span.start, span.end), resolver)
        bos = enc.input_ids[0]
        try:
            pos = ids.index(bos, pos)
        except ValueError:
            raise EchoError(f"trajectory {traj.id}: fewer audio placeholders than audio spans") from None
        if ids[pos : pos + len(enc.input_ids)] != enc.input_ids:
            raise EchoError(f"trajectory {traj.id}: the audio at {span.start}-{span.end} s encodes differently")
        pos += len(enc.input_ids)
        audios.append(enc)
    bos_id = int(encoder.tokenizer.convert_tokens_to_ids("<|audio_bos|>"))
    if ids.count(bos_id) != len(audios):
        raise EchoError(f"trajectory {traj.id}: {ids.count(bos_id)} audio placeholders, {len(audios)} spans")
    n_prompt = len(traj.prompt_ids)
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
        "loss_mask": torch.tensor([[0] * n_prompt + traj.response_mask], dtype=torch.long),
        "old_logprobs": torch.tensor([[0.0] * n_prompt + traj.response_logprobs], dtype=torch.float32),
    }
    if audios:
        out.update(encoder.collate(audios))
    return {k: v.to(device) for k, v in out.items()}


def sequence_logprobs(model: Any, inputs: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log p(token t | tokens < t) for every position t >= 1, shape `(1, L - 1)`, under `model` (the trainer's
    recomputation). Pass the trajectory's sampling temperature (0 means greedy: logits taken as they are)."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("loss_mask", "old_logprobs")}
    if "input_features" in kwargs:
        kwargs["input_features"] = kwargs["input_features"].to(model.dtype)
    logits = model(**kwargs).logits[:, :-1].float()
    if temperature > 0:
        logits = logits / temperature
    targets = inputs["input_ids"][:, 1:].unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)


# --------------------------------------------------------------------------------------------- the file


def read_trajectories(path: Path) -> tuple[dict[str, Trajectory], int]:
    """The records of a trajectories file by id (first wins), and the byte length of its valid part.

    A torn last line (a crash mid-write) is ignored; any other bad line raises `DataError`.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    done: dict[str, Trajectory] = {}
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    valid_end = pos = 0
    for i, raw in enumerate(lines):
        pos += len(raw) + (1 if i < len(lines) - 1 else 0)
        if raw.strip():
            try:
                traj = Trajectory.model_validate_json(raw)
            except ValidationError as err:
                if i == last:
                    break
                raise DataError(f"{path}: line {i + 1}: not a trajectory: {err.errors()[0]['msg']}") from None
            done.setdefault(traj.id, traj)
        valid_end = pos
    return done, valid_end


def _open_out(path: Path, chash: str) -> tuple[dict[str, Trajectory], IO[bytes]]:
    done: dict[str, Trajectory] = {}
    if path.exists():
        done, valid_end = read_trajectories(path)
        for traj in done.values():
            if traj.config_hash != chash:
                raise ConfigError(
                    f"{path} holds trajectories of another configuration (model, mode, sampling or seed); "
                    "use another --out or delete it"
                )
        if valid_end < path.stat().st_size:
            os.truncate(path, valid_end)  # drop the torn last line
    f = open(path, "ab")  # noqa: SIM115 - closed by the caller
    if f.tell() > 0:
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":  # a complete last record whose newline was not written
                f.write(b"\n")
    return done, f


# -------------------------------------------------------------------------------------------- collection


async def _run_graph(agent: EchoAgent, inputs: EchoInput) -> dict[str, Any]:
    """Run the graph; return its full final state (its output schema leaves out the conversation)."""
    state: dict[str, Any] = dict(inputs)
    async for chunk in agent.graph.astream(inputs, stream_mode="updates"):
        for update in chunk.values():
            if update:
                state.update(update)
    return state


async def _run_one(
    agent: EchoAgent, encoder: PromptEncoder, item: BenchItem, sample: int, seed: int, chash: str
) -> Trajectory:
    s = sample_seed(seed, item.id, sample)
    head: dict[str, Any] = {
        "id": trajectory_id(item.id, sample), "item_id": item.id, "sample": sample, "seed": s,
        "model": agent.backend.name, "backend": type(agent.backend).__name__, "mode": agent.config.mode,
        "temperature": agent.config.sampling.temperature, "config_hash": chash, "data": str(item.source),
        "question": item.question, "choices": item.choices, "gold": item.answer,
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        ref = await asyncio.to_thread(agent.load, item.audio)
        inputs = new_question(item.question, {"main": ref.model_dump()}, item.choices, item.answer, seed=s)
        state = await _run_graph(agent, inputs)
        clips = {cid: AudioRef.model_validate(r) for cid, r in state["clips"].items()}
        conversation: list[Message] = state["conversation"]
        tokens = token_data(encoder, conversation, state["question_start"], AudioResolver(agent.store, clips))
    except EchoError as err:
        return Trajectory(**head, status="error", error=f"{type(err).__name__}: {err}",
                          latency_s=round(time.perf_counter() - t0, 4))  # fmt: skip
    verdict = Verdict.model_validate(state["verdict"])
    return Trajectory(
        **head,
        **tokens,
        status=state["status"],
        answer=verdict.answer,
        choice=verdict.choice,
        correct=verdict.correct,
        reward=verdict.reward,
        reward_terms=verdict.terms,
        verdict=verdict,
        listens=[ListenCall.model_validate(c) for c in state["listens"]],
        clips=clips,
        messages=_strip_tokens(conversation),
        audio_spans=_spans(conversation, clips),
        model_calls=state["model_calls"],
        retries=state["retries"],
        generated_tokens=state["generated_tokens"],
        latency_s=round(time.perf_counter() - t0, 4),
    )


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

    At most `concurrency` runs are in flight; give `agent` a `BatchingBackend` so their model calls share
    batches. The backend must expose the model's `PromptEncoder` (a local transformers model).
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
    out.parent.mkdir(parents=True, exist_ok=True)
    chash = config_hash(agent, seed)
    selected = list(items[:limit] if limit is not None else items)
    keys = [(item, k) for item in selected for k in range(samples)]
    done, f = _open_out(out, chash)
    todo = [(item, k) for item, k in keys if trajectory_id(item.id, k) not in done]
    sem = asyncio.Semaphore(concurrency)

    async def run(item: BenchItem, k: int) -> Trajectory:
        async with sem:
            return await _run_one(agent, encoder, item, k, seed, chash)

    written: list[Trajectory] = []
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(run(item, k)) for item, k in todo]
    try:
        with _progress_bar(progress, len(todo), f"collect x{samples}") as advance:
            for next_done in asyncio.as_completed(tasks):
                traj = await next_done
                f.write(traj.model_dump_json().encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
                written.append(traj)
                advance()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        f.close()
    elapsed = time.perf_counter() - t0
    ran = [t for t in written if t.status != "error"]
    return CollectSummary(
        out=str(out),
        total=len(keys),
        done_before=len(keys) - len(todo),
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
    parquet.parent.mkdir(parents=True, exist_ok=True)
    tmp = parquet.with_name(f".{parquet.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, parquet)
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
