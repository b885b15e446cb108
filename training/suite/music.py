"""The music domain of the real-audio suite: melodies from GM soundfonts and drum parts from real kits.

A scene is one 12-28 s clip: 2-3 instruments (`instruments.INSTRUMENTS`) play generated phrases one after the
other (each instrument enters with its first phrase, so they enter at different times, and phrases never
overlap: 0.6-1.4 s lie between them), over a drum part from one Hydrogen kit, over white, pink or brown noise
at 10-24 dB SNR. Every note and every drum hit is an event:

- ``{"kind": "note", "onset", "offset", "instrument", "pitch", "dur_class", "phrase", "gain"}``:
  `offset` is the note-off; the rendered note rings `instruments.TAIL` s longer;
- ``{"kind": "drum", "onset", "offset", "drum", "sample", "gain"}``: `drum` is kick, snare, hi-hat or crash;
  `sample` the kit's velocity layer played; `offset` is where the cut sample ends.

`isolate` re-renders any of them from these fields and `scene.meta` (soundfont, kit).

Phrases are scale melodies (major or natural minor, a random tonic, steps of one or two scale degrees, no
repeated notes) with a contour: rising, falling, arch, valley or wave; notes are detached (0.25-0.40 s between
a note-off and the next note-on), so every note has its own onset. The drum part is a build-up on an eighth
grid (0.30-0.40 s a step): the four drums enter one after another, 4 or 8 steps apart, each with its own
pattern, and play on to the end. `scene.meta` names the soundfont, the kit (its licence and the kit
instruments used), the bed, the SNR, the instruments in entry order, every phrase and the drum plan.

Every scene supports every category (threads ask several about one clip); a scene made for a category is
arranged so all of that category's answer values are possible: `note_count` scenes hold an 8-note phrase,
`melody_direction` scenes a rising and a falling phrase, `drum_count` scenes a drum part from the start.

Categories and gold traces (every listened span comes from the question text or a fixed scan rule; at most 6):

- ``first_instrument``: scan from 0 s in 10 s windows (the last ends at the clip's end); in the window where
  instruments are first heard, halve (the first half; after hearing none, the first half of the rest), halves
  rounded to 0.1 s, until exactly one instrument is heard: `` the cello and the violin are heard.`` then
  `` only the violin.``. Every scene keeps instrument entries >= 0.25 s from every boundary of that scan.
- ``instrument_at``: one listen to T +- 0.5 s, where only the answer's instrument sounds: `` it is the flute.``
- ``note_count`` (2-8): the window starts before a phrase's first note (no earlier note of that instrument
  rings into it) and ends in a gap after a later note of the phrase, >= 0.08 s from any counted onset; one
  listen, or for 5+ notes the two halves at the window's midpoint when that falls in a gap (>= 0.12 s after
  a note-off): `` the flute plays 3 notes.`` ... `` 3 and 2 make 5.``
- ``melody_direction``: the window holds exactly one phrase, rising or falling, and no other note.
- ``drum_count`` (2-8 hits of one drum): ends >= 0.08 s from the drum's hits, and >= 0.2 s (hi-hat 0.12 s,
  crash 0.5 s) after the hit before the window, so no tail is heard as a hit; halves as for notes.
- ``drum_order``: which of two named drums is heard first: the scan-and-halve rule of ``first_instrument``
  with `` kick? yes. crash? no.`` checks; the two first hits keep >= 0.15 s from every scan boundary.

Balance: `note_count`, `drum_count` (value x position), `melody_direction` (value x position) and `drum_order`
(first-named-or-second x position) draw answers from `core.balanced` blocks. `first_instrument` and
`instrument_at` balance the answer's position; their answer value (an instrument) is uniform because scenes
draw instruments uniformly, but is not block-balanced, since the scene fixes who plays before `ask` runs.
Choices: instruments (4: the scene's other instruments first, then others), counts (4: the answer and near
counts), directions and drum pairs (2).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import instruments as src
from . import phrasing as phr
from .core import (
    SAMPLE_RATE,
    AnswerKind,
    PhrasingSplit,
    Question,
    Scene,
    SourceSplit,
    Waveform,
    balanced,
    mix_at_snr,
    peak_normalise,
    place,
)
from .phrasing import Bank

__all__ = [
    "BANKS",
    "CATEGORIES",
    "HELDOUT_SOURCES",
    "SUB_CATEGORIES",
    "ask",
    "isolate",
    "make_scene",
]

CATEGORIES: tuple[str, ...] = (
    "first_instrument",
    "instrument_at",
    "note_count",
    "melody_direction",
    "drum_count",
    "drum_order",
)
SUB_CATEGORIES: dict[str, str] = {
    "first_instrument": "instrument entry order",
    "instrument_at": "instrument identification",
    "note_count": "note counting",
    "melody_direction": "melodic contour",
    "drum_count": "drum hit counting",
    "drum_order": "drum sound order",
}
HELDOUT_SOURCES: dict[str, tuple[str, ...]] = {
    "soundfont": (src.HELDOUT_SOUNDFONT_PREFIX,),  # every installed MuseScore_General*.sf3
    "kit": src.HELDOUT_KITS,
}
"""What `sources="heldout"` uses (and `"train"` never touches): soundfont file-name prefixes and kit names."""

BANKS: dict[str, Bank] = {
    "first_instrument": Bank(
        "first_instrument",
        train=(
            "Which instrument plays first?",
            "Which instrument is heard first in this clip?",
            "What instrument starts the music?",
            "Which instrument comes in first?",
            "Of the instruments you hear, which one plays first?",
            "Which instrument opens the piece?",
        ),
        heldout=(
            "Name the instrument that enters first.",
            "The first instrument to play is which one?",
            "Who plays first here, which instrument?",
        ),
    ),
    "instrument_at": Bank(
        "instrument_at",
        train=(
            "Which instrument is playing at {time}?",
            "What instrument do you hear at {time}?",
            "At {time}, which instrument is playing?",
            "Which instrument can be heard at {time}?",
            "What instrument plays at {time}?",
            "Identify the instrument playing at {time}.",
        ),
        heldout=(
            "Name the instrument sounding at {time}.",
            "Right at {time}, what instrument is that?",
            "Tell me which instrument plays at the {time} mark.",
        ),
        follow_up=("And at {time}?", "What about at {time}?", "And which instrument plays at {time}?"),
    ),
    "note_count": Bank(
        "note_count",
        train=(
            "How many notes does the {instrument} play {span}?",
            "Count the {instrument} notes {span}.",
            "How many notes are played by the {instrument} {span}?",
            "{Span}, how many notes does the {instrument} play?",
            "How many {instrument} notes do you hear {span}?",
            "What is the number of notes the {instrument} plays {span}?",
        ),
        heldout=(
            "Tell me how many notes the {instrument} plays {span}.",
            "Number of {instrument} notes {span}?",
            "Over the stretch {span}, count the notes played by the {instrument}.",
        ),
        follow_up=(
            "And how many notes does the {instrument} play {span}?",
            "What about {span}: how many {instrument} notes?",
        ),
    ),
    "melody_direction": Bank(
        "melody_direction",
        train=(
            "Is the melody {span} rising or falling?",
            "Does the melody go up or down {span}?",
            "{Span}, does the tune rise or fall?",
            "Is the melody rising or falling {span}?",
            "Which way does the melody move {span}: rising or falling?",
            "Does the pitch of the melody rise or fall {span}?",
        ),
        heldout=(
            "Tell me whether the tune {span} climbs or descends.",
            "Melody {span}: ascending or descending?",
            "Would you say the line played {span} is going up or coming down?",
        ),
        follow_up=("And {span}?", "What about the melody {span}?"),
    ),
    "drum_count": Bank(
        "drum_count",
        train=(
            "How many {drum} hits are there {span}?",
            "Count the {drum} hits {span}.",
            "How many times is the {drum} hit {span}?",
            "How many {drum} strokes do you hear {span}?",
            "{Span}, how many times does the {drum} sound?",
            "What is the number of {drum} hits {span}?",
        ),
        heldout=(
            "Tell me the number of {drum} beats {span}.",
            "{Drum} hits {span}: how many?",
            "How often is the {drum} struck {span}?",
        ),
        follow_up=("And the {drum} hits {span}?", "What about {span}: how many {drum} hits?"),
    ),
    "drum_order": Bank(
        "drum_order",
        train=(
            "Which is heard first, the {x} or the {y}?",
            "Which comes first: the {x} or the {y}?",
            "Does the {x} or the {y} play first?",
            "Which drum sound starts first, the {x} or the {y}?",
            "Of the {x} and the {y}, which enters first?",
            "Is the {x} or the {y} heard earlier?",
        ),
        heldout=(
            "Tell me which drum comes in earlier: {x} or {y}.",
            "First to sound, {x} or {y}?",
            "Between the {x} and the {y}, which one do we hear before the other?",
        ),
        follow_up=("And the {x} or the {y}?", "What about the {x} and the {y}: which is first?"),
    ),
}

_DURATION = (12.0, 28.0)  # clip length, seconds
_LEAD_IN = (0.3, 2.0)  # before the first phrase
_NOTE_GAP = (0.25, 0.40)  # note-off to next note-on within a phrase
_PHRASE_GAP = (0.6, 1.4)  # last note-off to the next phrase's first note-on
_RING = 0.3  # how long after its note-off a note still counts as sounding (release)
_STEP = (0.30, 0.40)  # drum eighth-note grid
_SNR = (10.0, 24.0)
_TARGET_RMS = 0.1  # a phrase's notes, on average
_DRUM_LEVEL = {"kick": 0.45, "snare": 0.4, "hi-hat": 0.25, "crash": 0.3}  # peak of a full-velocity hit
_PATTERNS: dict[str, tuple[tuple[int, ...], ...]] = {  # steps of an 8-step bar
    "kick": ((0, 4), (0, 3, 4), (0, 4, 5), (0, 2, 4, 6)),
    "snare": ((2, 6), (2, 6, 7)),
    "hi-hat": ((0, 1, 2, 3, 4, 5, 6, 7), (0, 2, 4, 6), (1, 3, 5, 7)),
    "crash": ((0,), (0, 4)),  # crash (0,) plays every bar or every second bar
}
_SCALES = ((0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10))  # major, natural minor
_CONTOURS = ("rising", "falling", "arch", "valley", "wave")
_WINDOW = 10.0  # the scan rule's windows
_MAX_LISTENS = 6
_ENTRY_MARGIN = {"note": 0.25, "drum": 0.15}  # first entries this far from every scan boundary
_COUNT_MIN, _COUNT_MAX = 2, 8
_HIT_BEFORE = {"kick": 0.2, "snare": 0.2, "hi-hat": 0.12, "crash": 0.5}  # hit before a count window: this early
_EDGE = 0.08  # counted onsets this far inside a count window's ends
_SPLIT_AFTER_NOTE = 0.12  # a count window's midpoint split lies this far after a note-off (its release fades)
_BEDS = ("white noise", "pink noise", "brown noise")

_Step = tuple[float, float, str]  # a listen (a, b) and the observation after it


# ----------------------------------------------------------------------------------------------- helpers


def _ms(t: float) -> float:
    return round(float(t), 3)


def _grid(lo: float, hi: float) -> list[float]:
    """The 0.1 s grid points in [lo, hi]."""
    a, b = math.ceil(lo * 10 - 1e-6), math.floor(hi * 10 + 1e-6)
    return [k / 10 for k in range(a, b + 1)]


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _say(rng: np.random.Generator, variants: Sequence[str], **slots: Any) -> str:
    return str(_pick(rng, variants)).format(**slots)


def _span_text(a: float, b: float, fmt: str) -> str:
    """A span written as a phrase that follows a verb ("between 2 and 4 seconds", "in 2.0-4.0 s")."""
    s = phr.say_span(a, b, fmt)
    return s if s.startswith(("between", "from")) else f"in {s}"


def _names(names: Sequence[str]) -> str:
    """ "the cello", "the cello and the violin", "the cello, the flute and the violin"."""
    items = [f"the {n}" for n in names]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _trace(lead: str, steps: Sequence[_Step], answer: str, rng: np.random.Generator, close: str = "") -> str:
    body = " ".join(f"{phr.listen(a, b, rng)}{obs}" for a, b, obs in steps)
    return f"<think>{lead} {body}{close}</think><answer>{answer}</answer>"


def _choices(rng: np.random.Generator, answer: Any, others: Sequence[Any], position: int, k: int) -> list[Any]:
    """`k` values: `answer` at `position` among `k - 1` of `others` in random order."""
    rest = [others[int(i)] for i in rng.permutation(len(others))][: k - 1]
    return [*rest[:position], answer, *rest[position:]]


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class _Note:
    onset: float
    inst: src.Instrument
    pitch: int
    dur_class: int
    phrase: int

    @property
    def offset(self) -> float:
        return _ms(self.onset + src.DURATIONS[self.dur_class])


@dataclass
class _Phrase:
    inst: src.Instrument
    contour: str
    notes: list[_Note]


@dataclass
class _Hit:
    onset: float
    drum: str
    velocity: float


def _melody(rng: np.random.Generator, inst: src.Instrument, n: int, contour: str) -> list[int] | None:
    """`n` pitches of a scale melody with `contour` inside the instrument's range; None if it does not fit."""
    scale = _pick(rng, _SCALES)
    tonic = int(rng.integers(12))
    pool = [p for p in range(inst.low, inst.high + 1) if (p - tonic) % 12 in scale]
    size = [1 if rng.random() < 0.7 else 2 for _ in range(n - 1)]
    if contour == "rising":
        steps = size
    elif contour == "falling":
        steps = [-s for s in size]
    elif contour in ("arch", "valley"):
        peak = int(rng.integers(1, n - 1)) if n >= 3 else 1
        sign = 1 if contour == "arch" else -1
        steps = [sign * s if i < peak else -sign * s for i, s in enumerate(size)]
    else:  # wave: up and down by turns (never monotone for n >= 3)
        first = 1 if rng.random() < 0.5 else -1
        steps = [s * first * (1 if i % 2 == 0 else -1) for i, s in enumerate(size)]
    idx = np.cumsum([0, *steps])
    lo, hi = int(idx.min()), int(idx.max())
    if hi - lo >= len(pool):
        return None
    start = int(rng.integers(-lo, len(pool) - hi))
    return [pool[start + int(i)] for i in idx]


def _phrase(rng: np.random.Generator, inst: src.Instrument, n: int, contour: str, t: float, k: int) -> _Phrase | None:
    pitches = _melody(rng, inst, n, contour)
    if pitches is None:
        return None
    base = int(rng.integers(3))  # the phrase's usual note length: 0.2, 0.35 or 0.55 s
    notes: list[_Note] = []
    for i, p in enumerate(pitches):
        longer = rng.random() < (0.5 if i == n - 1 else 0.2)
        notes.append(_Note(_ms(t), inst, p, min(base + longer, len(src.DURATIONS) - 1), k))
        t = notes[-1].offset + float(rng.uniform(*_NOTE_GAP))
    return _Phrase(inst, contour, notes)


def _plan_phrases(
    rng: np.random.Generator, category: str, duration: float, insts: list[src.Instrument]
) -> list[_Phrase] | None:
    """Phrases one after another until the clip is full: each instrument's first phrase in entry order, then
    a random other instrument each time. None when the draw does not fit the category's needs."""
    k = len(insts)
    forced: dict[int, tuple[int, str]] = {}
    if category == "note_count":
        forced[int(rng.integers(k))] = (_COUNT_MAX, _pick(rng, _CONTOURS))
    elif category == "melody_direction":
        a, b = (int(i) for i in rng.choice(k, 2, replace=False))
        forced[a] = (int(rng.integers(3, 7)), "rising")
        forced[b] = (int(rng.integers(3, 7)), "falling")
    phrases: list[_Phrase] = []
    t = float(rng.uniform(*_LEAD_IN))
    while True:
        i = len(phrases)
        inst = insts[i] if i < k else _pick(rng, [x for x in insts if x is not phrases[-1].inst])
        if i in forced:
            n, contour = forced[i]
        else:
            n = int(rng.integers(2, 9))
            contour = _pick(rng, _CONTOURS) if n >= 3 else _pick(rng, _CONTOURS[:2])
        ph = _phrase(rng, inst, n, contour, t, i)
        if ph is None:
            return None
        end = ph.notes[-1].offset
        if end > duration - 0.6:
            break
        phrases.append(ph)
        t = end + float(rng.uniform(*_PHRASE_GAP))
    if len(phrases) < max(k, max(forced, default=0) + 1):
        return None
    return phrases


def _plan_drums(rng: np.random.Generator, category: str, duration: float) -> tuple[list[_Hit], dict[str, Any]]:
    """A build-up on an eighth grid: drums enter one after another (4 or 8 steps apart) and play to the end."""
    step = _ms(rng.uniform(*_STEP))
    if category == "drum_count":
        start = float(rng.uniform(0.3, 3.0))
    elif category == "drum_order":
        start = float(rng.uniform(0.3, max(0.3, duration - 14.0)))
    else:
        start = float(rng.uniform(0.3, max(0.3, duration / 2)))
    order = [src.DRUMS[int(i)] for i in rng.permutation(len(src.DRUMS))]
    entry, entries = 0, {}
    for d in order:
        entries[d] = entry
        entry += 4 if category == "drum_count" else 4 * int(rng.integers(1, 3))
    patterns = {d: _PATTERNS[d][int(rng.integers(len(_PATTERNS[d])))] for d in src.DRUMS}
    crash_every = int(rng.integers(1, 3)) if patterns["crash"] == (0,) else 1
    hits: list[_Hit] = []
    last = duration - 0.5
    s = 0
    while start + s * step <= last:
        bar, pos = divmod(s, 8)
        for d in src.DRUMS:
            if s >= entries[d] and pos in patterns[d]:
                if d == "crash" and (bar - entries[d] // 8) % crash_every:
                    continue
                vel = min(1.0, float(rng.uniform(0.6, 0.95)) + (0.1 if pos == 0 else 0.0))
                hits.append(_Hit(_ms(start + s * step), d, round(vel, 3)))
        s += 1
    info = {
        "step": step,
        "start": _ms(start),
        "order": order,
        "patterns": {d: list(p) for d, p in patterns.items()},
        "crash_every": crash_every,
    }
    return hits, info


# ------------------------------------------------------------------------------------ scene-level checks
# These work on event dicts, so `ask` (which only sees the Scene) and `make_scene` share them.


def _notes(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "note"]


def _hits(events: Sequence[dict[str, Any]], drum: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "drum" and (drum is None or e["drum"] == drum)]


def _firsts(events: Sequence[dict[str, Any]], kind: str, key: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in events:
        if e["kind"] == kind and e[key] not in out:
            out[e[key]] = e["onset"]
    return out


def _entry_scan(
    firsts: dict[str, float], duration: float, margin: float
) -> list[tuple[float, float, list[str]]] | None:
    """The scan-and-halve listens that find which of `firsts` (name -> first onset) comes first, each with the
    names heard, or None when an entry lies within `margin` of a boundary or 6 listens do not settle it.

    Scan windows 0-10, 10-20, ... (the last one ends at the clip's end) until one holds an entry; then, while
    more than one is heard, the span's first half (after hearing none: the first half of the rest of the span
    before), halves rounded to 0.1 s. Every span starts at or before the earliest entry, so what it hears is
    the entries before its end, and exactly one heard is the first."""
    times = sorted(firsts.values())
    steps: list[tuple[float, float, list[str]]] = []

    def heard(a: float, b: float) -> list[str] | None:
        if any(abs(t - x) < margin for t in times for x in (a, b)):
            return None
        return sorted(n for n, t in firsts.items() if a <= t < b)

    a, b = 0.0, min(_WINDOW, duration)
    while True:
        h = heard(a, b)
        if h is None or a >= duration or len(steps) >= _MAX_LISTENS:
            return None
        steps.append((a, b, h))
        if h:
            break
        a, b = b, min(b + _WINDOW, duration)
    while len(steps[-1][2]) != 1:
        a, b, h = steps[-1]
        half = round((b - a) / 2, 1)
        a, b = (a, round(a + half, 1)) if h else (b, round(b + half, 1))
        got = heard(a, b)
        if got is None or len(steps) >= _MAX_LISTENS or b - a < 0.5:
            return None
        steps.append((a, b, got))
    return steps


def _ring_spans(notes: Sequence[dict[str, Any]], skip: str | None = None) -> list[tuple[float, float]]:
    return [(e["onset"], e["offset"] + _RING) for e in notes if e["instrument"] != skip]


def _free(spans: Sequence[tuple[float, float]], a: float, b: float) -> bool:
    return all(e <= a or s >= b for s, e in spans)


def _at_times(events: Sequence[dict[str, Any]], duration: float) -> dict[str, list[float]]:
    """instrument -> times T (0.1 s grid) inside one of its notes, with nothing else melodic in T +- 0.5 s."""
    notes = _notes(events)
    out: dict[str, list[float]] = {}
    for e in notes:
        others = _ring_spans(notes, skip=e["instrument"])
        for t in _grid(max(1.0, e["onset"] + 0.1), min(duration - 1.0, e["offset"] - 0.05)):
            if _free(others, t - 0.5, t + 0.5):
                out.setdefault(e["instrument"], []).append(t)
    return out


def _phrases(events: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    by: dict[int, list[dict[str, Any]]] = {}
    for e in _notes(events):
        by.setdefault(e["phrase"], []).append(e)
    return [by[k] for k in sorted(by)]


def _direction(notes: Sequence[dict[str, Any]]) -> str | None:
    p = [e["pitch"] for e in notes]
    if len(p) < 3 or abs(p[-1] - p[0]) < 3:
        return None
    if all(b > a for a, b in itertools.pairwise(p)):
        return "rising"
    if all(b < a for a, b in itertools.pairwise(p)):
        return "falling"
    return None


@dataclass(frozen=True)
class _Window:
    """Where a question's span may start and end (0.1 s grid points), and what it then holds."""

    starts: tuple[float, ...]
    ends: tuple[float, ...]
    n: int = 0  # counted sounds inside
    onsets: tuple[float, ...] = ()

    def draw(self, rng: np.random.Generator) -> tuple[float, float]:
        return _pick(rng, self.starts), _pick(rng, self.ends)


def _direction_windows(events: Sequence[dict[str, Any]], duration: float) -> dict[str, list[_Window]]:
    """ "rising"/"falling" -> windows holding exactly one monotone phrase and no other note."""
    notes = _notes(events)
    out: dict[str, list[_Window]] = {}
    for ph in _phrases(events):
        d = _direction(ph)
        if d is None:
            continue
        first, last = ph[0]["onset"], ph[-1]["offset"]
        before = max((e["offset"] + _RING for e in notes if e["onset"] < first), default=0.0)
        after = min((e["onset"] for e in notes if e["onset"] > last), default=duration + 0.15)
        starts = _grid(max(before + 0.15, first - 0.6, 0.0), first - 0.1)
        ends = _grid(last + 0.05, min(after - 0.15, last + 0.6, duration))
        if starts and ends:
            out.setdefault(d, []).append(_Window(tuple(starts), tuple(ends)))
    return out


def _count_windows(
    sounds: Sequence[tuple[float, float]],
    groups: Sequence[int],
    before: float,
    tail: float,
    duration: float,
    group_starts: bool = False,
) -> list[_Window]:
    """Windows holding the onsets of sounds i..j (one group; `sounds` are (onset, end) in time order), 2 to 8 of
    them, whose ends leave nothing ambiguous: the start at least `before` after the end of sound i - 1 and
    `_EDGE` before onset i; the end at least `tail` after the end of sound j and `_EDGE` before onset j + 1.
    With `group_starts`, windows start only at a group's first sound (notes: a phrase's first note, so no
    counted instrument's earlier note rings into the window)."""
    out: list[_Window] = []
    m = len(sounds)
    for i in range(m):
        if group_starts and i and groups[i - 1] == groups[i]:
            continue
        lo = sounds[i - 1][1] + before if i else 0.0
        starts = _grid(max(lo, sounds[i][0] - 0.8, 0.0), sounds[i][0] - _EDGE)
        if not starts:
            continue
        for j in range(i + _COUNT_MIN - 1, min(m, i + _COUNT_MAX)):
            if groups[j] != groups[i]:
                break
            nxt = sounds[j + 1][0] - _EDGE if j + 1 < m else duration
            ends = _grid(sounds[j][1] + tail, min(nxt, sounds[j][1] + tail + 0.6, duration))
            if ends:
                onsets = tuple(on for on, _ in sounds[i : j + 1])
                out.append(_Window(tuple(starts), tuple(ends), j - i + 1, onsets))
    return out


def _note_sounds(events: Sequence[dict[str, Any]], name: str) -> list[tuple[float, float]]:
    return [(e["onset"], e["offset"]) for e in _notes(events) if e["instrument"] == name]


def _note_windows(events: Sequence[dict[str, Any]], duration: float) -> dict[str, list[_Window]]:
    out: dict[str, list[_Window]] = {}
    for name in _firsts(events, "note", "instrument"):
        groups = [e["phrase"] for e in _notes(events) if e["instrument"] == name]
        wins = _count_windows(_note_sounds(events, name), groups, 0.02, 0.0, duration, group_starts=True)
        if wins:
            out[name] = wins
    return out


def _drum_windows(events: Sequence[dict[str, Any]], duration: float) -> dict[str, list[_Window]]:
    out: dict[str, list[_Window]] = {}
    for d in src.DRUMS:
        sounds = [(e["onset"], e["onset"]) for e in _hits(events, d)]
        wins = _count_windows(sounds, [0] * len(sounds), _HIT_BEFORE[d], 0.1, duration)
        if wins:
            out[d] = wins
    return out


def _split(a: float, b: float, sounds: Sequence[tuple[float, float]], before: float) -> float | None:
    """The window's midpoint (0.1 s grid) if it falls where a count window's end could (see `_count_windows`),
    so the two halves can be counted apart; else None."""
    mid = round((a + b) / 2, 1)
    if a < mid < b and all(mid >= end + before or mid <= on - _EDGE for on, end in sounds):
        return mid
    return None


def _drum_pairs(events: Sequence[dict[str, Any]], duration: float) -> list[tuple[str, str]]:
    """(earlier, later) drum pairs whose first hits the scan rule can order."""
    firsts = _firsts(events, "drum", "drum")
    out = []
    for x in src.DRUMS:
        for y in src.DRUMS:
            if x in firsts and y in firsts and firsts[x] < firsts[y] - 0.2:
                pair = {x: firsts[x], y: firsts[y]}
                if _entry_scan(pair, duration, _ENTRY_MARGIN["drum"]) is not None:
                    out.append((x, y))
    return out


def _supports(events: Sequence[dict[str, Any]], duration: float, category: str) -> bool:
    """Whether a scene can be asked every category, and for `category` every answer value."""
    notes = _notes(events)
    instruments = _firsts(events, "note", "instrument")
    if _entry_scan(instruments, duration, _ENTRY_MARGIN["note"]) is None or len(instruments) < 2:
        return False
    if not _at_times(events, duration) or not _direction_windows(events, duration):
        return False
    if not _drum_pairs(events, duration) or not _drum_windows(events, duration) or not notes:
        return False
    if category == "note_count":
        ns = {w.n for ws in _note_windows(events, duration).values() for w in ws}
        return ns >= set(range(_COUNT_MIN, _COUNT_MAX + 1))
    if category == "drum_count":
        ns = {w.n for ws in _drum_windows(events, duration).values() for w in ws}
        return ns >= set(range(_COUNT_MIN, _COUNT_MAX + 1))
    if category == "melody_direction":
        return set(_direction_windows(events, duration)) == {"rising", "falling"}
    return True


# --------------------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8192)
def _rms(font: Path, program: int, pitch: int, dur_class: int) -> float:
    x = src.note(font, program, pitch, dur_class)
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1e-6


def _wave(ev: dict[str, Any], font: Path | None, kit: str | None) -> Waveform:
    if ev["kind"] == "note":
        assert font is not None
        return src.note(font, src.instrument(ev["instrument"]).program, ev["pitch"], ev["dur_class"])
    assert kit is not None
    return src.hit(kit, ev["drum"], ev["sample"])


def _render(events: Sequence[dict[str, Any]], n: int, font: Path, kit: str) -> tuple[npt.NDArray[np.float64], Any]:
    track = np.zeros(n)
    active = np.zeros(n, dtype=bool)
    for ev in events:
        wav = _wave(ev, font, kit)
        a, b = place(track, wav, ev["onset"], ev["gain"])
        active[round(a * SAMPLE_RATE) : round(b * SAMPLE_RATE)] = True
    return track, active


def _bed(rng: np.random.Generator, n: int, colour: str) -> npt.NDArray[np.float64]:
    """Unit-RMS coloured noise: white, pink (1/f power) or brown (1/f^2), shaped in one FFT above 20 Hz."""
    if colour == "white noise":
        x = rng.standard_normal(n)
    else:
        m = 1 << (n - 1).bit_length()
        spec = rng.standard_normal(m // 2 + 1) + 1j * rng.standard_normal(m // 2 + 1)
        f = np.maximum(np.fft.rfftfreq(m, 1.0 / SAMPLE_RATE), 20.0)
        spec /= np.sqrt(f) if colour == "pink noise" else f
        spec[0] = 0.0
        x = np.fft.irfft(spec, m)[:n]
    return x / float(np.sqrt(np.mean(x**2)))


def isolate(scene: Scene, events: list[dict[str, Any]]) -> Waveform:
    """Only `events` re-rendered from the scene's sources at their gains (no other event, no bed), on the
    clip's timeline and length, before the mix's peak normalisation: for checks against the ground truth."""
    font = src.soundfont_named(scene.meta["soundfont"]) if any(e["kind"] == "note" for e in events) else None
    track = np.zeros(len(scene.audio))
    for ev in events:
        place(track, _wave(ev, font, scene.meta["kit"]), ev["onset"], ev["gain"])
    return track.astype(np.float32)


# ------------------------------------------------------------------------------------------------ scenes


def _events(
    phrases: Sequence[_Phrase],
    hits: Sequence[_Hit],
    font: Path,
    kit: src.Kit,
    duration: float,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for ph in phrases:
        level = float(np.mean([_rms(font, x.inst.program, x.pitch, x.dur_class) for x in ph.notes]))
        gain = round(_TARGET_RMS * float(rng.uniform(0.8, 1.0)) / level, 4)
        for x in ph.notes:
            events.append(
                {
                    "kind": "note",
                    "onset": x.onset,
                    "offset": x.offset,
                    "instrument": x.inst.name,
                    "pitch": x.pitch,
                    "dur_class": x.dur_class,
                    "phrase": x.phrase,
                    "gain": gain,
                }
            )
    for h in hits:
        layer = kit.layer(h.drum, h.velocity)
        length = len(src.hit(kit.name, h.drum, layer.file)) / SAMPLE_RATE
        events.append(
            {
                "kind": "drum",
                "onset": h.onset,
                "offset": _ms(min(h.onset + length, duration)),
                "drum": h.drum,
                "sample": layer.file,
                "gain": round(_DRUM_LEVEL[h.drum] * h.velocity, 4),
            }
        )
    events.sort(key=lambda e: (e["onset"], e["kind"], e.get("drum", ""), e.get("instrument", "")))
    return events


def make_scene(rng: np.random.Generator, sources: SourceSplit, category: str) -> Scene:
    """One music clip from `sources`' soundfont and kit, arranged so `category` is well posed (see module doc)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown music category {category!r}; expected one of {CATEGORIES}")
    font = src.soundfont(sources, rng)
    kit = _pick(rng, src.kits(sources))
    for _ in range(200):
        duration = _grid(*_DURATION)[int(rng.integers(len(_grid(*_DURATION))))]
        k = 2 if rng.random() < 0.5 else 3
        insts = [src.INSTRUMENTS[int(i)] for i in rng.choice(len(src.INSTRUMENTS), k, replace=False)]
        phrases = _plan_phrases(rng, category, duration, insts)
        if phrases is None:
            continue
        hits, drums = _plan_drums(rng, category, duration)
        events = _events(phrases, hits, font, kit, duration, rng)
        if _supports(events, duration, category):
            break
    else:  # pragma: no cover - the draws above fit within a few tries
        raise RuntimeError(f"could not arrange a music scene for {category}")
    n = round(duration * SAMPLE_RATE)
    track, active = _render(events, n, font, kit.name)
    colour = _pick(rng, _BEDS)
    snr = round(float(rng.uniform(*_SNR)), 2)
    audio = peak_normalise(mix_at_snr(track, _bed(rng, n, colour), snr, active))
    meta = {
        "sources": sources,
        "soundfont": font.name,
        "kit": kit.name,
        "kit_licence": kit.licence,
        "kit_instruments": {d: kit.drums[d][0] for d in src.DRUMS},
        "bed": colour,
        "snr_db": snr,
        "instruments": [x.name for x in insts],
        "phrases": [
            {
                "instrument": ph.inst.name,
                "contour": ph.contour,
                "onset": ph.notes[0].onset,
                "offset": ph.notes[-1].offset,
                "pitches": [x.pitch for x in ph.notes],
            }
            for ph in phrases
        ],
        "drums": drums,
    }
    return Scene("music", audio, events, meta)


# -------------------------------------------------------------------------------------------------- ask


def _value(rng: np.random.Generator, seed: int, category: str, slot: int | None, combos: Sequence[Any]) -> Any:
    if slot is None:
        return combos[int(rng.integers(len(combos)))]
    return balanced((seed, "music", category), slot, combos)


@dataclass
class _Asked:
    """What a category's builder decides: the template slots, the answer value, choices and the trace."""

    slots: dict[str, str]
    formats: list[str]
    answer: str  # canonical (open) answer
    kind: str  # phrasing.CHOICE_FORMATS kind, and the open answer kind
    values: list[Any]  # the choices' values (answer included), or [] for open questions
    evidence: list[list[float]]
    lead: str
    steps: list[_Step]
    close: str = ""


def _count_distractors(rng: np.random.Generator, n: int) -> list[int]:
    near = [v for v in (n - 1, n + 1, n - 2, n + 2, n - 3, n + 3) if 1 <= v <= 10]
    return [near[int(i)] for i in np.sort(rng.choice(len(near), 3, replace=False))]


def _instrument_distractors(rng: np.random.Generator, answer: str, scene: Scene) -> list[str]:
    """Other instruments of the scene first (they are heard), then others, so 3 distractors."""
    inside = [x for x in scene.meta["instruments"] if x != answer]
    outside = [x.name for x in src.INSTRUMENTS if x.name not in scene.meta["instruments"]]
    rest = [outside[int(i)] for i in rng.choice(len(outside), 3 - len(inside), replace=False)]
    return inside + rest


def _ask_first_instrument(rng: np.random.Generator, scene: Scene, pos: int) -> _Asked:
    firsts = _firsts(scene.events, "note", "instrument")
    scan = _entry_scan(firsts, scene.duration, _ENTRY_MARGIN["note"])
    assert scan is not None  # make_scene guarantees it
    answer = scan[-1][2][0]
    steps: list[_Step] = []
    for a, b, heard in scan:
        if not heard:
            obs = _say(rng, (" no instrument yet.", " nothing melodic yet."))
        elif len(heard) == 1:
            obs = _say(rng, (" only the {x}.", " just the {x}.", " the {x} alone."), x=heard[0])
        else:
            variants = (" {x} play here.", " {x} are heard.", *((" both {x} play.",) if len(heard) == 2 else ()))
            obs = _say(rng, variants, x=_names(heard))
        steps.append((a, b, obs))
    a, b, _ = scan[-1]
    lead = _say(
        rng,
        (
            "I look for the first instrument, scanning from the start.",
            "I scan from the start for the instrument that comes in first.",
        ),
    )
    close = _say(rng, (" So the {x} plays first.", " The {x} comes in first."), x=answer)
    others = _instrument_distractors(rng, answer, scene)
    return _Asked({}, [], answer, "word", _choices(rng, answer, others, pos, 4), [[a, b]], lead, steps, close)


def _ask_instrument_at(rng: np.random.Generator, scene: Scene, pos: int, split: PhrasingSplit) -> _Asked:
    times = _at_times(scene.events, scene.duration)
    name = _pick(rng, sorted(times))
    t = _pick(rng, times[name])
    fmt = phr.pick_format(phr.TIME_FORMATS, rng, split)
    a, b = round(t - 0.5, 1), round(t + 0.5, 1)
    obs = _say(rng, (" it is the {x}.", " that is the {x}.", " the {x} is playing."), x=name)
    lead = _say(rng, ("I check what plays at {t:.1f} s.", "I listen around {t:.1f} s."), t=t)
    values = _choices(rng, name, _instrument_distractors(rng, name, scene), pos, 4)
    return _Asked({"time": phr.say_time(t, fmt)}, [fmt], name, "word", values, [[a, b]], lead, [(a, b, obs)])


def _counted(
    rng: np.random.Generator, win: _Window, sounds: Sequence[tuple[float, float]], before: float, says: Sequence[str]
) -> tuple[float, float, list[_Step], str, list[list[float]]]:
    """The window's span, its listens and the close: one listen, or for 5+ sounds the two halves (when the
    midpoint falls in a gap). `says` words a count: (many, one, none) with {n}."""
    a, b = win.draw(rng)

    def obs(k: int) -> str:
        return says[0].format(n=k) if k > 1 else says[1] if k == 1 else says[2]

    mid = _split(a, b, sounds, before) if win.n >= 5 else None
    if mid is None:
        return a, b, [(a, b, obs(win.n))], "", [[a, b]]
    k1 = sum(t < mid for t in win.onsets)
    return (
        a,
        b,
        [(a, mid, obs(k1)), (mid, b, obs(win.n - k1))],
        f" {k1} and {win.n - k1} make {win.n}.",
        [[a, mid], [mid, b]],
    )


def _nearest(value: int, windows: dict[str, list[_Window]]) -> int:
    """`value` if some window counts it, else the nearest count there is (scenes made for other categories)."""
    have = {w.n for ws in windows.values() for w in ws}
    return value if value in have else min(have, key=lambda v: (abs(v - value), v))


def _span_slots(rng: np.random.Generator, a: float, b: float, split: PhrasingSplit) -> tuple[dict[str, str], str]:
    fmt = phr.pick_format(phr.SPAN_FORMATS, rng, split)
    span = _span_text(a, b, fmt)
    return {"span": span, "Span": span[0].upper() + span[1:]}, fmt


def _ask_note_count(rng: np.random.Generator, scene: Scene, value: int, pos: int, split: PhrasingSplit) -> _Asked:
    windows = _note_windows(scene.events, scene.duration)
    value = _nearest(value, windows)
    name = _pick(rng, sorted(x for x, ws in windows.items() if any(w.n == value for w in ws)))
    win = _pick(rng, [w for w in windows[name] if w.n == value])
    many = _say(rng, (" the {x} plays {{n}} notes.", " there are {{n}} {x} notes."), x=name)
    says = (many, f" the {name} plays 1 note.", f" no {name} notes.")
    a, b, steps, close, evidence = _counted(rng, win, _note_sounds(scene.events, name), _SPLIT_AFTER_NOTE, says)
    slots, fmt = _span_slots(rng, a, b, split)
    lead = _say(
        rng, ("I count the {x} notes in the window.", "I listen to the window and count the {x}'s notes."), x=name
    )
    values = _choices(rng, value, _count_distractors(rng, value), pos, 4)
    return _Asked({"instrument": name, **slots}, [fmt], str(value), "count", values, evidence, lead, steps, close)


def _ask_melody_direction(rng: np.random.Generator, scene: Scene, value: str, pos: int, split: PhrasingSplit) -> _Asked:
    windows = _direction_windows(scene.events, scene.duration)
    if value not in windows:
        value = sorted(windows)[0]
    a, b = _pick(rng, windows[value]).draw(rng)
    slots, fmt = _span_slots(rng, a, b, split)
    if value == "rising":
        variants = (
            " each note is higher than the one before.",
            " the notes climb from low to high.",
            " the line steps upward.",
        )
    else:
        variants = (
            " each note is lower than the one before.",
            " the notes step down from high to low.",
            " the line steps downward.",
        )
    obs = _say(rng, variants)
    lead = _say(rng, ("I follow the melody in the window.", "I listen to how the melody moves in the window."))
    close = _say(rng, (" So it is {v}.", " The melody is {v}."), v=value)
    values = _choices(rng, value, ["falling" if value == "rising" else "rising"], pos, 2)
    return _Asked(slots, [fmt], value, "label", values, [[a, b]], lead, [(a, b, obs)], close)


def _ask_drum_count(rng: np.random.Generator, scene: Scene, value: int, pos: int, split: PhrasingSplit) -> _Asked:
    windows = _drum_windows(scene.events, scene.duration)
    value = _nearest(value, windows)
    drum = _pick(rng, [d for d in src.DRUMS if any(w.n == value for w in windows.get(d, []))])
    win = _pick(rng, [w for w in windows[drum] if w.n == value])
    many = _say(rng, (" the {x} sounds {{n}} times.", " there are {{n}} {x} hits."), x=drum)
    says = (many, f" the {drum} sounds once.", f" no {drum} hits.")
    sounds = [(e["onset"], e["onset"]) for e in _hits(scene.events, drum)]
    a, b, steps, close, evidence = _counted(rng, win, sounds, _HIT_BEFORE[drum], says)
    slots, fmt = _span_slots(rng, a, b, split)
    lead = _say(rng, ("I count the {x} hits in the window.", "I listen to the window and count the {x}."), x=drum)
    values = _choices(rng, value, _count_distractors(rng, value), pos, 4)
    slots = {"drum": drum, "Drum": drum.capitalize(), **slots}
    return _Asked(slots, [fmt], str(value), "count", values, evidence, lead, steps, close)


def _ask_drum_order(rng: np.random.Generator, scene: Scene, first_named: bool, pos: int) -> _Asked:
    earlier, later = _pick(rng, _drum_pairs(scene.events, scene.duration))
    x, y = (earlier, later) if first_named else (later, earlier)
    firsts = _firsts(scene.events, "drum", "drum")
    scan = _entry_scan({x: firsts[x], y: firsts[y]}, scene.duration, _ENTRY_MARGIN["drum"])
    assert scan is not None  # _drum_pairs keeps only pairs the scan orders
    steps: list[_Step] = []
    for a, b, heard in scan:
        steps.append((a, b, f" {x}? {'yes' if x in heard else 'no'}. {y}? {'yes' if y in heard else 'no'}."))
    a, b, _ = scan[-1]
    leads = ("I look for the {x} and the {y} in 10-second windows.", "I scan for the {x} and the {y} from the start.")
    lead = _say(rng, leads, x=x, y=y)
    close = _say(rng, (" The {v} comes first.", " So the {v} is heard first."), v=earlier)
    values = _choices(rng, earlier, [later], pos, 2)
    return _Asked({"x": x, "y": y}, [], earlier, "word", values, [[a, b]], lead, steps, close)


def ask(
    rng: np.random.Generator,
    scene: Scene,
    category: str,
    *,
    phrasing: PhrasingSplit,
    open_question: bool,
    slot: int | None,
    seed: int,
    follow_up: bool = False,
) -> Question:
    """One question about `scene` (see the module doc for what each category asks and how it is balanced)."""
    if category not in BANKS:
        raise ValueError(f"unknown music category {category!r}; expected one of {CATEGORIES}")
    split = phrasing
    bank = BANKS[category]
    counts = list(range(_COUNT_MIN, _COUNT_MAX + 1))
    if category == "first_instrument":
        (pos,) = _value(rng, seed, category, slot, [(p,) for p in range(4)])
        asked = _ask_first_instrument(rng, scene, pos)
    elif category == "instrument_at":
        (pos,) = _value(rng, seed, category, slot, [(p,) for p in range(4)])
        asked = _ask_instrument_at(rng, scene, pos, split)
    elif category == "note_count":
        n, pos = _value(rng, seed, category, slot, [(v, p) for v in counts for p in range(4)])
        asked = _ask_note_count(rng, scene, n, pos, split)
    elif category == "melody_direction":
        d, pos = _value(rng, seed, category, slot, [(v, p) for v in ("rising", "falling") for p in range(2)])
        asked = _ask_melody_direction(rng, scene, d, pos, split)
    elif category == "drum_count":
        n, pos = _value(rng, seed, category, slot, [(v, p) for v in counts for p in range(4)])
        asked = _ask_drum_count(rng, scene, n, pos, split)
    else:  # drum_order
        first, pos = _value(rng, seed, category, slot, [(f, p) for f in (True, False) for p in range(2)])
        asked = _ask_drum_order(rng, scene, first, pos)
    template, text = bank.pick(rng, split, follow_up=follow_up and split == "train")
    question = text.format(**asked.slots)
    kind: AnswerKind = "choice"
    if open_question:
        choices: list[str] = []
        choice_format = None
        answer = asked.answer
        kind = "number" if asked.kind == "count" else "word"
    else:
        choices, choice_format = phr.choice_strings(asked.values, asked.kind, rng, split)
        answer = choices[asked.values.index(int(asked.answer) if asked.kind == "count" else asked.answer)]
    trace = _trace(asked.lead, asked.steps, answer, rng, asked.close)
    return Question(
        category=category,
        question=question,
        template=template,
        choices=choices,
        choice_format=choice_format,
        answer=answer,
        answer_kind=kind,
        evidence=asked.evidence,
        trace=trace,
        formats=asked.formats,
    )
