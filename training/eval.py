"""The evaluation harness (design §7): run an `EchoAgent` over a benchmark file and score it like MMAU does.

Inputs, read as published:

- **MMAU**: a JSON list of ``{id, audio_id, question, choices, answer, task, category, sub-category, ...}``;
  our synthetic suite (``dataset == "echo-synth"``) writes the same format.
- **MMAR**: JSON lines (``.jsonl``) of ``{id, audio_path, question, choices, answer, modality, ...}``. A ``.json``
  list whose records carry ``audio_path`` (MMAR's published ``MMAR-meta.json``) is read as MMAR too.

Audio paths are relative to the data file's folder. Per-category accuracy groups items by MMAU's ``task``
(sound / music / speech), by ``category`` for our synthetic suite, and by ``modality`` for MMAR.

Scoring is MMAU's matcher (`echo_agent.verifier`): an item is correct when its verdict is, i.e. the text inside
``<answer>…</answer>`` selects the gold choice. A missing or unparseable answer is wrong; there is no fallback
to the first choice. An item that could not run (its audio file is missing or undecodable) is recorded with
its error and also counts as wrong, as MMAU's own scorer counts an empty prediction.

Outputs, when ``out`` (the report path, e.g. ``R.json``) is given:

- ``R.json.partial.jsonl``: one line per finished item, flushed and fsynced as it finishes. A restarted run
  skips the ids already there (a truncated last line, left by a crash, is dropped and its item re-run). The
  file is kept after the run, so re-running a finished evaluation only re-writes the report.
- ``R.json``: the `EvalReport` (written atomically at the end).
- ``R.predictions.json`` (MMAU: the original records, each plus ``model_output``) or
  ``R.predictions.jsonl`` (MMAR: each plus ``answer_prediction``), ready for each benchmark's own scorer. Each
  record also gets an ``echo`` object: choice, correct, listens, reasoning, status, error, latency.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..agent import EchoAgent, Result
from ..errors import ConfigError, EchoError

__all__ = [
    "SYNTH_DATASET",
    "BenchItem",
    "CategoryScore",
    "DataError",
    "EvalReport",
    "Prediction",
    "evaluate",
    "load_benchmark",
    "partial_path",
    "predictions_path",
    "read_partial",
]

BenchFormat = Literal["mmau", "mmar"]
SYNTH_DATASET = "echo-synth"
"""The `dataset` value of our synthetic suite's records; its items are grouped by `category`."""

_AUDIO_KEY: dict[str, str] = {"mmau": "audio_id", "mmar": "audio_path"}
_PREDICTION_KEY: dict[str, str] = {"mmau": "model_output", "mmar": "answer_prediction"}


class DataError(EchoError):
    """A benchmark or results file is missing or malformed."""


# ------------------------------------------------------------------------------------------------ loading


class BenchItem(BaseModel):
    """One benchmark question, with the record it came from (so predictions can be written back in kind)."""

    model_config = ConfigDict(frozen=True)

    id: str
    audio: Path = Field(description="the audio file, resolved against the data file's folder")
    question: str
    choices: list[str]
    answer: str
    group: str = Field(description="per-category key: MMAU task, synthetic-suite category, or MMAR modality")
    format: BenchFormat
    source: Path = Field(description="the data file")
    record: dict[str, Any] = Field(description="the original record, unchanged")


def _file_format(path: Path, records: Sequence[object]) -> BenchFormat:
    if path.suffix == ".jsonl":
        return "mmar"
    first = records[0] if records else None
    if isinstance(first, dict) and "audio_path" in first and "audio_id" not in first:
        return "mmar"
    return "mmau"


def _group_key(fmt: BenchFormat, rec: dict[str, Any]) -> str:
    if fmt == "mmar":
        return "modality"
    return "category" if rec.get("dataset") == SYNTH_DATASET else "task"


def _item(rec: object, where: str, path: Path, fmt: BenchFormat) -> BenchItem:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "id" in rec:
        where = f"{where} (id {rec['id']!r})"
    audio_key, group_key = _AUDIO_KEY[fmt], _group_key(fmt, rec)
    required = ("id", audio_key, "question", "choices", "answer", group_key)
    missing = [k for k in required if k not in rec]
    if missing:
        raise DataError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    rid = rec["id"]
    if not isinstance(rid, str | int) or isinstance(rid, bool) or str(rid) == "":
        raise DataError(f"{where}: 'id' must be a non-empty string or an integer")
    for key in (audio_key, "question", "answer", group_key):
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
    if not rec[audio_key]:
        raise DataError(f"{where}: {audio_key!r} is empty")
    choices = rec["choices"]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a non-empty list of strings")
    return BenchItem(
        id=str(rid),
        audio=path.parent / rec[audio_key],
        question=rec["question"],
        choices=list(choices),
        answer=rec["answer"],
        group=rec[group_key],
        format=fmt,
        source=path,
        record=rec,
    )


def load_benchmark(path: str | os.PathLike[str]) -> list[BenchItem]:
    """Read an MMAU JSON list or an MMAR JSON-lines file. Raises `DataError` for any problem in the file.

    Audio files are not checked here: an item whose audio is missing fails on its own when it is evaluated.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file" if not p.exists() else f"{p}: not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{p}: cannot read: {err}") from None
    located: list[tuple[str, object]] = []
    if p.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"{p}: line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{p}: line {lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{p}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of records (MMAU format), got a {type(data).__name__}")
        located = [(f"{p}: record {i}", rec) for i, rec in enumerate(data)]
    if not located:
        raise DataError(f"{p}: no records")
    fmt = _file_format(p, [rec for _, rec in located])
    items: list[BenchItem] = []
    seen: dict[str, str] = {}
    for where, rec in located:
        item = _item(rec, where, p, fmt)
        if item.id in seen:
            raise DataError(f"{where}: duplicate id {item.id!r} (first in {seen[item.id]})")
        seen[item.id] = where.removeprefix(f"{p}: ")
        items.append(item)
    return items


# ----------------------------------------------------------------------------------------------- results


class Prediction(BaseModel):
    """One finished item: a line of the partial-results file."""

    id: str
    mode: str
    model: str
    model_output: str = Field(description='the text inside <answer>…</answer>; "" when there is none')
    choice: str | None = Field(description="the choice the answer selects (MMAU matcher), or null")
    correct: bool
    status: Literal["answered", "no_answer", "error"]
    listens: list[dict[str, Any]] = Field(default_factory=list, description="every listen call, valid or not")
    valid_listens: int = 0
    generated_tokens: int = 0
    latency_s: float = 0.0
    reasoning: str = ""
    error: str | None = None


class CategoryScore(BaseModel):
    accuracy: float = Field(description="correct / n, in 0–1")
    n: int
    correct: int


class EvalReport(BaseModel):
    """The `--out` report of `echo-agent eval`: a stable schema. Fractions are in 0–1.

    Errored items (audio missing or undecodable) count in `n` and as wrong in the accuracies; the `mean_*`
    fields and `no_answer_share` are over the items that ran; `relisten_share` is over the answered ones.
    """

    data: str = Field(description="the benchmark file")
    format: BenchFormat
    mode: str = Field(description="interleaved | grounded | text (the paper's Table 3 settings)")
    model: str
    n: int = Field(description="items scored, errored ones included")
    correct: int
    errors: int = Field(description="items that could not run; see `failed`")
    micro_accuracy: float = Field(description="correct / n over all items")
    macro_accuracy: float = Field(description="mean of the per-category accuracies")
    per_category: dict[str, CategoryScore] = Field(
        description="MMAU: by task; synthetic suite: by category; MMAR: by modality"
    )
    relisten_share: float = Field(description="share of answered items with at least one valid listen")
    mean_listens: float = Field(description="valid listens per item")
    mean_generated_tokens: float
    mean_latency_s: float = Field(description="seconds per item (audio load + agent), waiting excluded")
    no_answer_share: float = Field(description="share of items with no <answer>…</answer> (scored wrong)")
    failed: list[dict[str, str]] = Field(default_factory=list, description="[{id, error}] of errored items")
    predictions: str | None = Field(default=None, description="the predictions file, when written")


def partial_path(out: Path) -> Path:
    """`R.json` -> `R.json.partial.jsonl`."""
    return out.with_name(out.name + ".partial.jsonl")


def predictions_path(out: Path, fmt: BenchFormat) -> Path:
    """`R.json` -> `R.predictions.json` (MMAU) or `R.predictions.jsonl` (MMAR)."""
    return out.with_name(out.stem + (".predictions.json" if fmt == "mmau" else ".predictions.jsonl"))


def read_partial(path: Path) -> tuple[dict[str, Prediction], int]:
    """The predictions in a partial-results file by id (first wins), and the byte length of its valid part.

    The last line may be truncated (a crash mid-write): it is ignored. Any other bad line raises `DataError`.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    preds: dict[str, Prediction] = {}
    valid_end = pos = 0
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    for i, raw in enumerate(lines):
        end = pos + len(raw) + (1 if i < len(lines) - 1 else 0)
        if raw.strip():
            try:
                pred = Prediction.model_validate_json(raw)
            except ValidationError as err:
                if i == last:
                    break
                raise DataError(f"{path}: line {i + 1}: not a prediction record: {err.errors()[0]['msg']}") from None
            preds.setdefault(pred.id, pred)
        valid_end = end
        pos = end
    return preds, valid_end


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_out(out: Path, items: Sequence[BenchItem]) -> None:
    """Refuse an `out` whose report or predictions file would overwrite the benchmark file."""
    if not items:
        return
    source = items[0].source.resolve()
    for target in (out, predictions_path(out, items[0].format), partial_path(out)):
        if target.resolve() == source:
            raise ConfigError(f"--out {out} would overwrite the data file {items[0].source}")
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'report.json'}")


# -------------------------------------------------------------------------------------------- evaluation


def _prediction(item: BenchItem, result: Result, mode: str, model: str, latency: float) -> Prediction:
    calls = [c.model_dump() for c in result.listens]
    return Prediction(
        id=item.id,
        mode=mode,
        model=model,
        model_output=result.answer or "",
        choice=result.choice,
        correct=bool(result.verdict is not None and result.verdict.correct),
        status="answered" if result.answer is not None else "no_answer",
        listens=calls,
        valid_listens=sum(1 for c in result.listens if c.valid),
        generated_tokens=result.generated_tokens,
        latency_s=round(latency, 4),
        reasoning=result.text,
    )


async def _run_one(agent: EchoAgent, item: BenchItem, mode: str, model: str) -> Prediction:
    t0 = time.perf_counter()
    try:
        ref = await asyncio.to_thread(agent.load, item.audio)
        result = await agent.ask(ref, item.question, item.choices, gold=item.answer)
    except EchoError as err:
        return Prediction(
            id=item.id, mode=mode, model=model, model_output="", choice=None, correct=False, status="error",
            latency_s=round(time.perf_counter() - t0, 4), error=f"{type(err).__name__}: {err}",
        )  # fmt: skip
    return _prediction(item, result, mode, model, time.perf_counter() - t0)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _report(
    items: Sequence[BenchItem], preds: dict[str, Prediction], mode: str, model: str, source: str, fmt: BenchFormat
) -> EvalReport:
    scored = [(item, preds[item.id]) for item in items]
    groups: dict[str, list[bool]] = {}
    for item, pred in scored:
        groups.setdefault(item.group, []).append(pred.correct)
    per_category = {
        g: CategoryScore(accuracy=sum(v) / len(v), n=len(v), correct=sum(v)) for g, v in groups.items()
    }  # fmt: skip
    ran = [p for _, p in scored if p.status != "error"]
    answered = [p for p in ran if p.status == "answered"]
    correct = sum(p.correct for _, p in scored)
    return EvalReport(
        data=source,
        format=fmt,
        mode=mode,
        model=model,
        n=len(scored),
        correct=correct,
        errors=len(scored) - len(ran),
        micro_accuracy=correct / len(scored) if scored else 0.0,
        macro_accuracy=_mean([c.accuracy for c in per_category.values()]),
        per_category=per_category,
        relisten_share=_mean([float(p.valid_listens >= 1) for p in answered]),
        mean_listens=_mean([p.valid_listens for p in ran]),
        mean_generated_tokens=_mean([p.generated_tokens for p in ran]),
        mean_latency_s=_mean([p.latency_s for p in ran]),
        no_answer_share=_mean([float(p.status == "no_answer") for p in ran]),
        failed=[{"id": p.id, "error": p.error or ""} for _, p in scored if p.status == "error"],
    )


def prediction_records(items: Sequence[BenchItem], preds: dict[str, Prediction]) -> list[dict[str, Any]]:
    """Each item's original record plus its benchmark's prediction key and our `echo` object."""
    out: list[dict[str, Any]] = []
    for item in items:
        p = preds[item.id]
        echo = {
            "choice": p.choice,
            "correct": p.correct,
            "listens": p.listens,
            "reasoning": p.reasoning,
            "status": p.status,
            "error": p.error,
            "generated_tokens": p.generated_tokens,
            "latency_s": p.latency_s,
        }
        out.append({**item.record, _PREDICTION_KEY[item.format]: p.model_output, "echo": echo})
    return out


@contextmanager
def _progress_bar(enabled: bool, total: int, label: str) -> Iterator[Any]:
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _open_partial(path: Path, mode: str, model: str) -> tuple[dict[str, Prediction], IO[bytes]]:
    """Read what a previous run finished, drop a truncated last line, and open the file for appending."""
    done: dict[str, Prediction] = {}
    if path.exists():
        done, valid_end = read_partial(path)
        for pred in done.values():
            if (pred.mode, pred.model) != (mode, model):
                raise ConfigError(
                    f"{path} holds results of mode={pred.mode} model={pred.model}, not mode={mode} model={model}; "
                    "use another --out or delete it"
                )
        if valid_end < path.stat().st_size:
            os.truncate(path, valid_end)
    f = open(path, "ab")  # noqa: SIM115 - closed by the caller
    if f.tell() > 0:
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":  # a complete last record without its newline
                f.write(b"\n")
    return done, f


async def evaluate(
    agent: EchoAgent,
    items: Sequence[BenchItem],
    *,
    out: Path | None = None,
    limit: int | None = None,
    concurrency: int = 1,
    progress: bool = True,
) -> EvalReport:
    """Ask `agent` every item (the first `limit`), score the answers, and write the outputs when `out` is set.

    At most `concurrency` questions run at once. With `out`, finished items are appended to
    `partial_path(out)` as they finish and a restarted run skips them (see the module docstring).
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    selected = list(items[:limit] if limit is not None else items)
    if len({i.format for i in items}) > 1:
        raise DataError("items mix MMAU and MMAR records")
    mode, model = agent.config.mode, agent.backend.name
    preds: dict[str, Prediction] = {}
    partial: IO[bytes] | None = None
    if out is not None:
        out = Path(out)
        check_out(out, items)
        out.parent.mkdir(parents=True, exist_ok=True)
        done, partial = _open_partial(partial_path(out), mode, model)
        wanted = {i.id for i in selected}
        preds = {k: v for k, v in done.items() if k in wanted}
    todo = [i for i in selected if i.id not in preds]
    sem = asyncio.Semaphore(concurrency)

    async def run(item: BenchItem) -> Prediction:
        async with sem:
            return await _run_one(agent, item, mode, model)

    tasks = [asyncio.create_task(run(item)) for item in todo]
    try:
        with _progress_bar(progress, len(todo), f"eval {mode}") as advance:
            for next_done in asyncio.as_completed(tasks):
                pred = await next_done
                preds[pred.id] = pred
                if partial is not None:
                    partial.write(pred.model_dump_json().encode() + b"\n")
                    partial.flush()
                    os.fsync(partial.fileno())
                advance()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if partial is not None:
            partial.close()

    fmt: BenchFormat = items[0].format if items else "mmau"
    report = _report(selected, preds, mode, model, str(items[0].source) if items else "", fmt)
    if out is not None:
        records = prediction_records(selected, preds)
        pred_path = predictions_path(out, fmt)
        if fmt == "mmau":
            _atomic_write(pred_path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        else:
            _atomic_write(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        report.predictions = str(pred_path)
        _atomic_write(out, report.model_dump_json(indent=2) + "\n")
    return report
