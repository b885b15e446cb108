"""The evaluation harness (design §7): run an `EchoAgent` over a benchmark file and score it like MMAU does.

Inputs are benchmark files as published (`echo_agent.benchmarks`); the questions run through the one runner
(`echo_agent.graphs.runner`), so concurrency, seeds and errors behave as in `collect` and the trainers.

Scoring is MMAU's matcher (`echo_agent.verifier`): an item is correct when its verdict is, i.e. the text inside
``<answer>…</answer>`` selects the gold choice. A missing or unparseable answer is wrong; there is no fallback
to the first choice. An item that could not run (its audio file is missing or undecodable) is recorded with
its error and also counts as wrong, as MMAU's own scorer counts an empty prediction. Open questions
(``choices: []``, an ``answer_kind``) are scored by the normalising matcher (`echo_agent.matching`).

Threads (items sharing a ``thread`` id, numbered by ``turn``) run their turns in order in one persistent graph
thread, so the agent needs a checkpointer (`echo-agent eval` gives it an ``InMemorySaver`` when the file has
threads). Each turn is scored on its own; the report's ``by_turn`` gives the accuracy per turn index over the
thread items only (single items are not in it: they are in every other figure). A resumed run re-runs every
thread that is not finished completely, as its graph state is gone with the process that ran it; the latest
record of an id in the partial file wins, so the re-run turns replace the earlier ones.

Outputs, when ``out`` (the report path, e.g. ``R.json``) is given:

- ``R.json.partial.jsonl``: one line per finished item, flushed and fsynced as it finishes. A restarted run
  skips the ids already there (a truncated last line, left by a crash, is dropped and its item re-run). The
  file is kept after the run, so re-running a finished evaluation only re-writes the report.
- ``R.json``: the `EvalReport` (written atomically at the end).
- ``R.predictions.json`` (MMAU: the original records, each plus ``model_output``) or
  ``R.predictions.jsonl`` (MMAR: each plus ``answer_prediction``), ready for each benchmark's own scorer. Each
  record also gets an ``echo`` object: choice, correct, listens, reasoning, status, error, latency.
- with ``mmar_out`` (``eval --mmar-predictions P.jsonl``): the items as MMAR records (`echo_agent.mmar`), each
  plus ``answer_prediction``, for MMAR's own scorer whatever the input format; open questions are left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from .agent import EchoAgent, Result
from .benchmarks import PREDICTION_KEY, SUITE_DATASET, BenchFormat, BenchItem
from .errors import ConfigError, DataError
from .graphs.runner import RunOutcome, jobs, run_id, run_jobs, whole_threads
from .jsonl import RecordLog, atomic_write, read_records
from .mmar import write_mmar

__all__ = [
    "CategoryScore",
    "EvalReport",
    "Prediction",
    "evaluate",
    "partial_path",
    "predictions_path",
    "read_partial",
]

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
        description="MMAU: by task; synthetic suite: by category; real-audio suite: by task/category; MMAR: by modality"
    )
    by_turn: dict[str, CategoryScore] = Field(
        default_factory=dict, description='thread items by turn index ("0", "1", ...); single items are not in it'
    )
    by_domain: dict[str, CategoryScore] = Field(
        default_factory=dict, description="real-audio suite: by domain (the records' task); else empty"
    )
    relisten_share: float = Field(description="share of answered items with at least one valid listen")
    mean_listens: float = Field(description="valid listens per item")
    mean_generated_tokens: float
    mean_latency_s: float = Field(description="seconds per item (audio load + agent), waiting excluded")
    no_answer_share: float = Field(description="share of items with no <answer>…</answer> (scored wrong)")
    failed: list[dict[str, str]] = Field(default_factory=list, description="[{id, error}] of errored items")
    predictions: str | None = Field(default=None, description="the predictions file, when written")
    mmar_predictions: str | None = Field(default=None, description="the MMAR-format predictions, when written")


def partial_path(out: Path) -> Path:
    """`R.json` -> `R.json.partial.jsonl`."""
    return out.with_name(out.name + ".partial.jsonl")


def predictions_path(out: Path, fmt: BenchFormat) -> Path:
    """`R.json` -> `R.predictions.json` (MMAU) or `R.predictions.jsonl` (MMAR)."""
    return out.with_name(out.stem + (".predictions.json" if fmt == "mmau" else ".predictions.jsonl"))


def read_partial(path: Path) -> tuple[dict[str, Prediction], int]:
    """The predictions in a partial-results file by id (first wins), and the byte length of its valid part."""
    return read_records(path, Prediction, lambda p: p.id, "prediction record")


def _latest(path: Path) -> dict[str, Prediction]:
    """The last prediction of each id in a partial file `RecordLog` has already checked (a re-run thread's turns
    come after their first run's)."""
    latest: dict[str, Prediction] = {}
    for raw in path.read_bytes().split(b"\n"):
        if raw.strip():
            pred = Prediction.model_validate_json(raw)
            latest[pred.id] = pred
    return latest


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


def _prediction(outcome: RunOutcome, mode: str, model: str) -> Prediction:
    item = outcome.job.item
    if outcome.state is None:
        return Prediction(
            id=item.id, mode=mode, model=model, model_output="", choice=None, correct=False, status="error",
            latency_s=outcome.latency_s, error=outcome.error,
        )  # fmt: skip
    result = Result.from_state(outcome.state)
    return Prediction(
        id=item.id,
        mode=mode,
        model=model,
        model_output=result.answer or "",
        choice=result.choice,
        correct=bool(result.verdict is not None and result.verdict.correct),
        status="answered" if result.answer is not None else "no_answer",
        listens=[c.model_dump() for c in result.listens],
        valid_listens=sum(1 for c in result.listens if c.valid),
        generated_tokens=result.generated_tokens,
        latency_s=outcome.latency_s,
        reasoning=result.text,
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _scores(pairs: Sequence[tuple[str, bool]]) -> dict[str, CategoryScore]:
    groups: dict[str, list[bool]] = {}
    for key, ok in pairs:
        groups.setdefault(key, []).append(ok)
    return {g: CategoryScore(accuracy=sum(v) / len(v), n=len(v), correct=sum(v)) for g, v in groups.items()}


def _report(
    items: Sequence[BenchItem], preds: dict[str, Prediction], mode: str, model: str, source: str, fmt: BenchFormat
) -> EvalReport:
    scored = [(item, preds[item.id]) for item in items]
    per_category = _scores([(item.group, pred.correct) for item, pred in scored])
    turns = sorted((item.turn, pred.correct) for item, pred in scored if item.thread is not None)
    suite = [(item, pred) for item, pred in scored if item.record.get("dataset") == SUITE_DATASET]
    by_domain = _scores([(str(item.record.get("task", "")), pred.correct) for item, pred in suite])
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
        by_turn=_scores([(str(turn), ok) for turn, ok in turns]),
        by_domain=dict(sorted(by_domain.items())),
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
        out.append({**item.record, PREDICTION_KEY[item.format]: p.model_output, "echo": echo})
    return out


async def evaluate(
    agent: EchoAgent,
    items: Sequence[BenchItem],
    *,
    out: Path | None = None,
    limit: int | None = None,
    concurrency: int = 1,
    progress: bool = True,
    mmar_out: Path | None = None,
) -> EvalReport:
    """Ask `agent` every item (the first `limit`), score the answers, and write the outputs when `out` is set.

    At most `concurrency` questions run at once. With `out`, finished items are appended to
    `partial_path(out)` as they finish and a restarted run skips them (see the module docstring). With
    `mmar_out`, the multiple-choice items are also written there as MMAR records with `answer_prediction`.
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
    log: RecordLog[Prediction] | None = None
    if mmar_out is not None and items and Path(mmar_out).resolve() == items[0].source.resolve():
        raise ConfigError(f"--mmar-predictions {mmar_out} would overwrite the data file {items[0].source}")
    if out is not None:
        out = Path(out)
        check_out(out, items)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(out)

        def same_run(pred: Prediction) -> None:
            if (pred.mode, pred.model) != (mode, model):
                raise ConfigError(
                    f"{partial} holds results of mode={pred.mode} model={pred.model}, not mode={mode} "
                    f"model={model}; use another --out or delete it"
                )

        log = RecordLog(partial, Prediction, lambda p: p.id, "prediction record", same_run)
        wanted = {i.id for i in selected}
        preds = {k: v for k, v in _latest(partial).items() if k in wanted}
    # Every thread not finished completely runs again from its first turn (its graph state is gone).
    todo = whole_threads(jobs(selected, seed=agent.config.sampling.seed or 0), {run_id(k, 0) for k in preds})
    for job in todo:
        preds.pop(job.item.id, None)
    label = f"eval {mode}" if progress else None
    try:
        async for outcome in run_jobs(agent, todo, concurrency=concurrency, progress=label):
            pred = _prediction(outcome, mode, model)
            preds[pred.id] = pred
            if log is not None:
                log.append(pred)
    finally:
        if log is not None:
            log.close()

    fmt: BenchFormat = items[0].format if items else "mmau"
    report = _report(selected, preds, mode, model, str(items[0].source) if items else "", fmt)
    if out is not None:
        records = prediction_records(selected, preds)
        pred_path = predictions_path(out, fmt)
        if fmt == "mmau":
            atomic_write(pred_path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        else:
            atomic_write(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        report.predictions = str(pred_path)
    if mmar_out is not None:
        extra = {r["id"]: {"answer_prediction": r[PREDICTION_KEY[fmt]], "echo": r["echo"]}
                 for r in prediction_records(selected, preds)}  # fmt: skip
        report.mmar_predictions = write_mmar(selected, Path(mmar_out), extra).out
    if out is not None:
        atomic_write(out, report.model_dump_json(indent=2) + "\n")
    return report
