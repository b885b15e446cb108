"""Benchmark files as published (design §7), loaded into `BenchItem`s for `eval`, `collect` and the trainers.

- **MMAU**: a JSON list of ``{id, audio_id, question, choices, answer, task, category, sub-category, ...}``;
  our synthetic suite (``dataset == "echo-synth"``) writes the same format, plus ``trace``, ``events`` and
  ``evidence`` for training.
- **MMAR**: JSON lines (``.jsonl``) of ``{id, audio_path, question, choices, answer, modality, ...}``. A ``.json``
  list whose records carry ``audio_path`` (MMAR's published ``MMAR-meta.json``) is read as MMAR too.

Our real-audio suite (``dataset == "echo-suite"``, `training/suite`) is MMAU JSON too, with more fields read
here: ``answer_kind`` (``"choice"``, or number | word | time | duration | span for an open question, whose
``choices`` is ``[]``), ``thread`` (the id its conversation's turns share, or null) and ``turn`` (0-based). The
turns of one thread must be numbered 0, 1, 2, ... without gaps or repeats. Any MMAU or MMAR record may carry
these fields; without them an item is a single multiple-choice question.

Audio paths are relative to the data file's folder. Per-category accuracy groups items by MMAU's ``task``
(sound / music / speech), by ``category`` for our synthetic suite, by ``task/category`` for the real-audio
suite, and by ``modality`` for MMAR.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import DataError
from .matching import OPEN_KINDS

__all__ = [
    "ANSWER_KINDS",
    "PREDICTION_KEY",
    "SUITE_DATASET",
    "SYNTH_DATASET",
    "BenchFormat",
    "BenchItem",
    "DataError",
    "load_benchmark",
]

BenchFormat = Literal["mmau", "mmar"]
SYNTH_DATASET = "echo-synth"
"""The `dataset` value of our synthetic suite's records; its items are grouped by `category`."""
SUITE_DATASET = "echo-suite"
"""The `dataset` value of the real-audio suite's records; its items are grouped by `task/category`."""
ANSWER_KINDS = ("choice", *OPEN_KINDS)

_AUDIO_KEY: dict[str, str] = {"mmau": "audio_id", "mmar": "audio_path"}
PREDICTION_KEY: dict[str, str] = {"mmau": "model_output", "mmar": "answer_prediction"}


class BenchItem(BaseModel):
    """One benchmark question, with the record it came from (so predictions can be written back in kind)."""

    model_config = ConfigDict(frozen=True)

    id: str
    audio: Path = Field(description="the audio file, resolved against the data file's folder")
    question: str
    choices: list[str]
    answer: str
    group: str = Field(
        description="per-category key: MMAU task, synthetic-suite category, suite task/category, or MMAR modality"
    )
    answer_kind: str = Field("choice", description='"choice", or how an open answer is matched (`matching`)')
    thread: str | None = Field(None, description="the conversation this item is a turn of; None: a single item")
    turn: int = Field(0, ge=0, description="0-based turn index within `thread`")
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


def _group_keys(fmt: BenchFormat, rec: dict[str, Any]) -> tuple[str, ...]:
    """The record keys whose values, joined by "/", name the item's group."""
    if fmt == "mmar":
        return ("modality",)
    if rec.get("dataset") == SUITE_DATASET:
        return ("task", "category")
    return ("category",) if rec.get("dataset") == SYNTH_DATASET else ("task",)


def _thread_fields(rec: dict[str, Any], where: str) -> tuple[str, str | None, int]:
    """(answer_kind, thread, turn) of a record, with the defaults of a single multiple-choice item."""
    kind = rec.get("answer_kind", "choice")
    if kind not in ANSWER_KINDS:
        raise DataError(f"{where}: 'answer_kind' must be one of {', '.join(ANSWER_KINDS)}, got {kind!r}")
    thread = rec.get("thread")
    if thread is not None and (not isinstance(thread, str) or not thread):
        raise DataError(f"{where}: 'thread' must be a non-empty string or null, got {thread!r}")
    turn = rec.get("turn", 0)
    if not isinstance(turn, int) or isinstance(turn, bool) or turn < 0:
        raise DataError(f"{where}: 'turn' must be an integer >= 0, got {turn!r}")
    if thread is None and turn != 0:
        raise DataError(f"{where}: 'turn' is {turn} but 'thread' is null (a single item is turn 0)")
    return kind, thread, turn


def _item(rec: object, where: str, path: Path, fmt: BenchFormat) -> BenchItem:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "id" in rec:
        where = f"{where} (id {rec['id']!r})"
    audio_key, group_keys = _AUDIO_KEY[fmt], _group_keys(fmt, rec)
    required = ("id", audio_key, "question", "choices", "answer", *group_keys)
    missing = [k for k in required if k not in rec]
    if missing:
        raise DataError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    rid = rec["id"]
    if not isinstance(rid, str | int) or isinstance(rid, bool) or str(rid) == "":
        raise DataError(f"{where}: 'id' must be a non-empty string or an integer")
    for key in (audio_key, "question", "answer", *group_keys):
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
    if not rec[audio_key]:
        raise DataError(f"{where}: {audio_key!r} is empty")
    kind, thread, turn = _thread_fields(rec, where)
    choices = rec["choices"]
    if kind == "choice":
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be a non-empty list of strings")
    elif choices != []:
        raise DataError(f"{where}: an open question (answer_kind {kind!r}) must have 'choices': []")
    return BenchItem(
        id=str(rid),
        audio=path.parent / rec[audio_key],
        question=rec["question"],
        choices=list(choices),
        answer=rec["answer"],
        group="/".join(rec[k] for k in group_keys),
        answer_kind=kind,
        thread=thread,
        turn=turn,
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
    _check_threads(p, items)
    return items


def _check_threads(path: Path, items: Sequence[BenchItem]) -> None:
    """Every thread's turns are 0, 1, ..., n-1: one item each, no gap."""
    turns: dict[str, dict[int, str]] = {}
    for item in items:
        if item.thread is None:
            continue
        taken = turns.setdefault(item.thread, {})
        if item.turn in taken:
            raise DataError(
                f"{path}: thread {item.thread!r} has two turns {item.turn} (ids {taken[item.turn]!r} and {item.id!r})"
            )
        taken[item.turn] = item.id
    for thread, taken in turns.items():
        missing = sorted(set(range(max(taken) + 1)) - set(taken))
        if missing:
            have = ", ".join(map(str, sorted(taken)))
            raise DataError(f"{path}: thread {thread!r} has no turn {missing[0]} (it has turns {have})")
