"""MMAR's format for our data: suite (or any MMAU-format) records as MMAR JSON lines, and predictions for MMAR's
official scorer (ddlBoJack/MMAR ``code/evaluation.py``).

An MMAR record is ``{id, audio_path, question, choices, answer, modality, category, sub-category, language,
source, url, timestamp}``; the scorer reads ``answer``, ``choices``, ``modality``, ``category``,
``sub-category`` and the model's ``answer_prediction``, and counts accuracy per modality and per category.
It only knows these values (any other is a ``KeyError`` there), so the export writes only them:

- ``modality``: ``sound``, ``music``, ``speech``, ``mix-sound-music``, ``mix-sound-speech``,
  ``mix-music-speech``, ``mix-sound-music-speech``. A suite scene has one foreground domain (its ``task``);
  its noise or ambience bed is a background, not a second modality, so the suite maps to the first three. A
  record that already carries an official ``modality`` keeps it.
- ``category``: MMAR's four layers, ``Signal Layer``, ``Perception Layer``, ``Semantic Layer``,
  ``Cultural Layer``; ``sub-category`` one of MMAR's own where one fits (`CATEGORY_MAP`):

  ============================================  ================  ======================================
  suite categories                              MMAR category     MMAR sub-category
  ============================================  ================  ======================================
  pitch                                         Signal Layer      Audio Difference Analysis
  duration                                      Signal Layer      Acoustic Quality Analysis
  count, word_count, note_count, drum_count,    Perception Layer  Counting and Statistics
  voice_count
  order, locate, word_order, first_instrument,  Perception Layer  Temporal Analysis
  drum_order
  instrument_at, melody_direction               Perception Layer  Music Theory
  identify                                      Perception Layer  Environmental Perception and Reasoning
  digit_at, number_between                      Semantic Layer    Content Analysis
  same_speaker                                  Semantic Layer    Speaker Analysis
  ============================================  ================  ======================================

  No suite category needs cultural knowledge, so ``Cultural Layer`` is unused. Other MMAU records map by
  MMAU's category (``Information Extraction`` -> Perception Layer, ``Reasoning`` -> Semantic Layer) and keep
  their own sub-category; anything else -> Perception Layer.
- ``language``: ``en`` for speech, else null; ``source``: the record's ``dataset``; ``url``, ``timestamp``:
  null. The suite's own fields travel in a ``suite`` object, and a thread's ``thread`` / ``turn`` stay at the
  top level, so `echo-agent eval` runs the exported file's threads in order as it does the suite's.

MMAR is multiple choice only: open questions (``choices: []``) are left out, and so is every later turn of a
thread from its first open turn on (a thread must stay turns 0..n-1). Audio paths are rewritten relative to
the output file's folder, so the file can be written anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .benchmarks import BenchItem
from .jsonl import atomic_write

__all__ = [
    "CATEGORY_MAP",
    "MMAR_CATEGORIES",
    "MMAR_MODALITIES",
    "MmarExport",
    "exportable",
    "mmar_layer",
    "mmar_modality",
    "to_mmar",
    "write_mmar",
]

MMAR_MODALITIES = (
    "sound",
    "music",
    "speech",
    "mix-sound-music",
    "mix-sound-speech",
    "mix-music-speech",
    "mix-sound-music-speech",
)
MMAR_CATEGORIES = ("Signal Layer", "Perception Layer", "Semantic Layer", "Cultural Layer")

_COUNTING = ("Perception Layer", "Counting and Statistics")
_TEMPORAL = ("Perception Layer", "Temporal Analysis")
_MUSIC = ("Perception Layer", "Music Theory")
_CONTENT = ("Semantic Layer", "Content Analysis")
CATEGORY_MAP: dict[str, tuple[str, str]] = {
    # sound (today's synthetic categories, real effects added)
    "count": _COUNTING,
    "order": _TEMPORAL,
    "identify": ("Perception Layer", "Environmental Perception and Reasoning"),
    "pitch": ("Signal Layer", "Audio Difference Analysis"),
    "locate": _TEMPORAL,
    "duration": ("Signal Layer", "Acoustic Quality Analysis"),
    # speech
    "digit_at": _CONTENT,
    "number_between": _CONTENT,
    "word_count": _COUNTING,
    "word_order": _TEMPORAL,
    "same_speaker": ("Semantic Layer", "Speaker Analysis"),
    "voice_count": _COUNTING,
    # music
    "first_instrument": _TEMPORAL,
    "instrument_at": _MUSIC,
    "note_count": _COUNTING,
    "melody_direction": _MUSIC,
    "drum_count": _COUNTING,
    "drum_order": _TEMPORAL,
}
"""Suite category -> (MMAR category, MMAR sub-category)."""
_MMAU_LAYERS = {"Information Extraction": "Perception Layer", "Reasoning": "Semantic Layer"}


class MmarExport(BaseModel):
    """What `write_mmar` wrote."""

    out: str
    written: int
    skipped_open: int = 0  # open questions (MMAR is multiple choice only)
    skipped_after_open: int = 0  # later turns of a thread whose earlier turn was open


def mmar_modality(record: Mapping[str, Any]) -> str:
    """MMAR's modality of a record: its own if official, else its MMAU `task` if that is one, else "sound"."""
    for key in ("modality", "task"):
        value = record.get(key)
        if isinstance(value, str) and value in MMAR_MODALITIES:
            return value
    return "sound"


def mmar_layer(record: Mapping[str, Any]) -> tuple[str, str]:
    """(MMAR category, sub-category) of a record (see the module doc)."""
    category = record.get("category")
    sub = record.get("sub-category")
    if isinstance(category, str) and category in MMAR_CATEGORIES:  # already MMAR's
        return category, sub if isinstance(sub, str) else ""
    if isinstance(category, str) and category in CATEGORY_MAP:
        return CATEGORY_MAP[category]
    layer = _MMAU_LAYERS.get(category, "Perception Layer") if isinstance(category, str) else "Perception Layer"
    return layer, sub if isinstance(sub, str) and sub else str(category or "")


def _relative(audio: Path, folder: Path) -> str:
    rel = Path(os.path.relpath(audio.resolve(), folder.resolve())).as_posix()
    return rel if rel.startswith("../") else f"./{rel}"


_SUITE_FIELDS = ("dataset", "task", "category", "sub-category", "split", "sources", "phrasing", "template",
                 "formats", "choice_format", "difficulty", "duration")  # fmt: skip


def to_mmar(item: BenchItem, folder: Path) -> dict[str, Any]:
    """`item` as an MMAR record whose `audio_path` is relative to `folder` (where the MMAR file will be)."""
    rec = item.record
    if item.format == "mmar":
        out = dict(rec)
    else:
        category, sub = mmar_layer(rec)
        modality = mmar_modality(rec)
        out = {
            "id": item.id,
            "question": item.question,
            "choices": list(item.choices),
            "answer": item.answer,
            "modality": modality,
            "category": category,
            "sub-category": sub,
            "language": "en" if "speech" in modality.split("-") else None,
            "source": rec.get("dataset"),
            "url": None,
            "timestamp": None,
            "suite": {k: rec[k] for k in _SUITE_FIELDS if k in rec},
        }
    out["audio_path"] = _relative(item.audio, folder)
    if item.thread is not None:
        out["thread"], out["turn"] = item.thread, item.turn
    return out


def exportable(items: Sequence[BenchItem]) -> tuple[list[BenchItem], int, int]:
    """(the items MMAR can hold, open questions left out, later thread turns left out after an open one)."""
    open_turn: dict[str, int] = {}
    for item in items:
        if item.thread is not None and not item.choices:
            open_turn[item.thread] = min(open_turn.get(item.thread, item.turn), item.turn)
    keep: list[BenchItem] = []
    n_open = n_after = 0
    for item in items:
        if not item.choices:
            n_open += 1
        elif item.thread is not None and item.thread in open_turn and item.turn > open_turn[item.thread]:
            n_after += 1
        else:
            keep.append(item)
    return keep, n_open, n_after


def write_mmar(
    items: Sequence[BenchItem], out: Path, extra: Mapping[str, Mapping[str, Any]] | None = None
) -> MmarExport:
    """Write the MCQ items as MMAR JSON lines at `out` (atomically); `extra` adds fields per item id (eval's
    `answer_prediction`). Open questions and the thread turns after them are left out and counted."""
    out = Path(out)
    keep, n_open, n_after = exportable(items)
    folder = out.parent if str(out.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in keep:
        rec = {**to_mmar(item, folder), **(extra or {}).get(item.id, {})}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_write(out, "".join(lines))
    return MmarExport(out=str(out), written=len(keep), skipped_open=n_open, skipped_after_open=n_after)
