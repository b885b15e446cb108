"""Benchmark files as published (design §7), loaded into `BenchItem`s for `eval`, `collect` and the trainers.

- **MMAU**: a JSON list of ``{id, audio_id, question, choices, answer, task, category, sub-category, ...}``;
  our synthetic suite (``dataset == "echo-synth"``) writes the same format, plus ``trace``, ``events`` and
  ``evidence`` for training.
- **MMAR**: JSON lines (``.jsonl``) of ``{id, audio_path, question, choices, answer, modality, ...}``. A ``.json``
  list whose records carry ``audio_path`` (MMAR's published ``MMAR-meta.json``) is read as MMAR too.

Audio paths are relative to the data file's folder. Per-category accuracy groups items by MMAU's ``task``
(sound / music / speech), by ``category`` for our synthetic suite, and by ``modality`` for MMAR.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import DataError

__all__ = ["PREDICTION_KEY", "SYNTH_DATASET", "BenchFormat", "BenchItem", "DataError", "load_benchmark"]

BenchFormat = Literal["mmau", "mmar"]
SYNTH_DATASET = "echo-synth"
"""The `dataset` value of our synthetic suite's records; its items are grouped by `category`."""

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
