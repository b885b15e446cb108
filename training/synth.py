"""The synthetic audio-puzzle suite (design §8): clips of named sound events over noise, with MCQs.

Each item is an MMAU record (`id, audio_id, question, choices, answer, task, category, sub-category, ...`)
plus what training needs: the clip's full event list, gold evidence spans and a gold reasoning trace in the
seg-tag format, e.g.
``<think>I count the beeps in the window. I listen to 3.0-7.5 s: <seg>3.0, 7.5</seg> there are 3 beeps.</think>``
``<answer>3</answer>``.

The traces are made to be learnable by a small model: every span inside ``<seg>`` is computable from the
question text or from a fixed scanning rule, never from event times the model could only regress from audio,
and the text after each ``</seg>`` is a short templated observation (a space, then a lowercase word, no event
times) decided by what the inserted slice holds. Each listen is preceded by ``I listen to A-B s: ``.

- ``count``: one listen to the question's window; `` there are N beeps.`` / `` there is 1 beep.``
- ``identify``: one listen to T±0.5 s around the question's time T; `` it is a chirp.``
- ``pitch``: listens to T1±0.5 and T2±0.5 s; `` this beep is high|mid|low.`` each, then
  ``High is higher than low, so the answer is higher.``
- ``locate``: listens to the choices' ranges in their listed order, `` chord? no.`` after each until
  `` chord? yes.`` (1–4 listens; the answer's position is balanced).
- ``order`` and ``duration``: scan the clip in 10 s windows from 0 s (``0.0, 10.0``, ``10.0, 20.0``, ...;
  the last window may end past the clip, which the runtime clamps) until the first window holding a
  target: `` click? no. chord? no.`` then `` click? yes. chord? no. The click comes first.``;
  `` chord? no.`` then `` chord? yes; it lasts about 1.0 s.`` When one `order` window holds both targets
  (`` click? yes. chord? yes.``) the trace zooms in: the window's first 5 s, then the first half of
  whichever part holds the first target, until one listen hears exactly one target (at most 2 zoom
  listens, fewer when the scan has used the budget; the last step names the answer even when it
  still heard both or neither). The events these scans look for
  lie inside one window (≥ 0.2 s from its ends), never across a multiple of 10 s, and within the first 70 s,
  so a scan takes at most 7 listens (6 on the default ≤ 60 s clips).

`evidence` holds the listened spans that decide the answer: the count window, the identify/pitch windows,
the locate range holding the event, the order/duration window that holds the deciding event(s) (clamped to
the clip).

Events (names used verbatim in questions and choices):

- ``beep``: pure tone, 0.1–0.5 s; pitch words ``low`` (250–350 Hz), ``mid`` (600–900 Hz), ``high``
  (1600–2400 Hz), well inside the design's bands (<400, 400–1200, >1200 Hz);
- ``chirp``: linear sweep between 300 and 3000 Hz (at least an octave), 0.3–1.0 s;
- ``noise burst``: white noise, 0.2–1.0 s;
- ``click``: a train of 3–6 clicks 80–150 ms apart (sometimes a single click), each 5–15 ms; one event;
- ``chord``: a 4:5:6 (major) triad on a 150–400 Hz root, 0.5–2.0 s.

Clips run 10–60 s at 16 kHz; events never overlap and are at least 0.3 s apart and 0.2 s from the clip's
edges. White or pink background noise is scaled to an SNR (event power over noise power, the event power
measured over the samples where events sound) drawn uniformly from `snr_range`; the mix is peak-normalised
to 0.9 and written as 16-bit PCM.

Balance: `write_suite` cycles categories, and within each category draws the answer's value and its
position among the choices from shuffled blocks of all (value, position) combinations, so every value and
every position is exactly equally likely per block, and "always answer X" or "always pick the first choice"
scores chance. Each item's content comes from `SeedSequence([seed, index])` alone, so output is
byte-identical for any number of workers.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CATEGORIES",
    "DURATION_CHOICES",
    "KINDS",
    "PITCH_BANDS",
    "PITCH_WORDS",
    "SAMPLE_RATE",
    "SUB_CATEGORIES",
    "PuzzleItem",
    "generate_item",
    "item_id",
    "item_rng",
    "pitch_word",
    "plan_suite",
    "synth_command",
    "write_splits",
    "write_suite",
]

SAMPLE_RATE = 16000
KINDS: tuple[str, ...] = ("beep", "chirp", "noise burst", "click", "chord")
CATEGORIES: tuple[str, ...] = ("count", "order", "identify", "pitch", "locate", "duration")
PITCH_WORDS: tuple[str, ...] = ("low", "mid", "high")
PITCH_BANDS: dict[str, tuple[float, float]] = {"low": (250.0, 350.0), "mid": (600.0, 900.0), "high": (1600.0, 2400.0)}
"""Frequencies beeps are drawn from, per pitch word; well inside the design's <400 / 400–1200 / >1200 Hz."""
DURATION_CHOICES: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
"""`duration` questions ask about the chord (the only event long enough for 4 choices ≥ 0.4 s apart)."""

SUB_CATEGORIES = {
    "count": "event counting",
    "order": "temporal order",
    "identify": "event identification",
    "pitch": "pitch comparison",
    "locate": "event localization",
    "duration": "event duration",
}

_SR = SAMPLE_RATE
_GAP = int(0.3 * _SR)  # minimum silence between events
_EDGE = int(0.2 * _SR)  # minimum distance of an event from the clip's edges
_FADE = int(0.005 * _SR)
_PEAK = 0.9
_WINDOW = 10.0  # `order` and `duration` traces scan the clip in windows of this many seconds from 0 s
_WINDOW_MARGIN = 0.2  # the events those scans look for lie this far inside one window, never across two
_MAX_SCAN = 7  # ... and in the first 7 windows, so a scan fits the runtime's 7 re-listens on any clip length
_ZOOM_DEPTH = 2  # `order`: listens into a window that holds both targets (5 s, then 2.5 s), within those 7

Waveform = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]


def pitch_word(freq: float) -> str:
    """The design's pitch word for a frequency: low < 400 Hz ≤ mid ≤ 1200 Hz < high."""
    if freq < 400.0:
        return "low"
    if freq <= 1200.0:
        return "mid"
    return "high"


class PuzzleItem(BaseModel):
    """One puzzle: an MMAU record (first fields, `sub-category` serialised with its hyphen) plus our fields."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    id: str
    audio_id: str = Field(description='"./audio/<id>.wav", relative to the JSON file')
    question: str
    choices: list[str]
    answer: str = Field(description="exactly one of `choices`")
    dataset: str = "echo-synth"
    task: str = "sound"
    split: str
    category: str = Field(description="count | order | identify | pitch | locate | duration")
    sub_category: str = Field(alias="sub-category")
    difficulty: str = Field(description="easy | medium | hard, from SNR and clip length")
    duration: float = Field(description="clip length in seconds")
    snr_db: float = Field(description="event power over background-noise power, in dB")
    seed: int = Field(description="the suite seed; the item's randomness is SeedSequence([seed, index])")
    noise: str = Field(description='background noise colour: "white" or "pink"')
    evidence: list[list[float]] = Field(description="gold evidence spans [[start, end], ...] in seconds")
    trace: str = Field(description="gold reasoning trace in the seg-tag format")
    events: list[dict[str, Any]] = Field(description='every event of the clip: {"kind", "onset", "offset", ...}')


# --------------------------------------------------------------------------------------------- planning


@dataclass
class _Event:
    kind: str
    length: int  # samples
    params: dict[str, Any]
    gain: float
    start: int = -1  # sample; -1 until placed
    clicks: list[tuple[int, int]] = field(default_factory=list)  # click trains: (offset, length) in samples

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def onset(self) -> float:
        return self.start / _SR

    @property
    def offset(self) -> float:
        return self.end / _SR

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"kind": self.kind, "onset": round(self.onset, 6), "offset": round(self.offset, 6)}
        rec.update(self.params)
        if self.clicks:
            rec["clicks"] = [round((self.start + off) / _SR, 6) for off, _ in self.clicks]
        return rec


def _new_event(rng: np.random.Generator, kind: str, seconds: float | None = None, pitch: str | None = None) -> _Event:
    """Draw an event's parameters (not its samples)."""
    params: dict[str, Any] = {}
    clicks: list[tuple[int, int]] = []
    if kind == "beep":
        word = pitch if pitch is not None else PITCH_WORDS[int(rng.integers(3))]
        lo, hi = PITCH_BANDS[word]
        params = {"freq": round(float(rng.uniform(lo, hi)), 1), "pitch": word}
        seconds = seconds if seconds is not None else float(rng.uniform(0.1, 0.5))
        gain = float(rng.uniform(0.5, 1.0))
    elif kind == "chirp":
        f0 = float(np.exp(rng.uniform(np.log(300.0), np.log(1500.0))))
        f1 = float(np.exp(rng.uniform(np.log(2.0 * f0), np.log(3000.0)))) if f0 < 1500.0 else 3000.0
        if rng.random() < 0.5:
            f0, f1 = f1, f0
        params = {"f0": round(f0, 1), "f1": round(f1, 1)}
        seconds = seconds if seconds is not None else float(rng.uniform(0.3, 1.0))
        gain = float(rng.uniform(0.5, 1.0))
    elif kind == "noise burst":
        seconds = seconds if seconds is not None else float(rng.uniform(0.2, 1.0))
        gain = float(rng.uniform(0.5, 1.0))
    elif kind == "chord":
        params = {"freq": round(float(rng.uniform(150.0, 400.0)), 1)}
        seconds = seconds if seconds is not None else float(rng.uniform(0.5, 2.0))
        gain = float(rng.uniform(0.5, 1.0))
    elif kind == "click":
        n = int(rng.integers(3, 7)) if rng.random() < 0.8 else 1
        pos = 0
        for i in range(n):
            if i:
                pos += int(rng.uniform(0.08, 0.15) * _SR)
            clicks.append((pos, int(rng.uniform(0.005, 0.015) * _SR)))
        length = clicks[-1][0] + clicks[-1][1]
        return _Event(kind, length, {"n_clicks": n}, float(rng.uniform(0.4, 0.8)), clicks=clicks)
    else:
        raise ValueError(f"unknown event kind {kind!r}")
    return _Event(kind, round(seconds * _SR), params, gain)


class _Timeline:
    """Events on a clip of `n` samples, kept ≥ `_GAP` apart and ≥ `_EDGE` from the edges."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.busy: list[tuple[int, int]] = []  # occupied sample ranges: events and reserved zones
        self.events: list[_Event] = []

    def reserve(self, start: int, end: int) -> None:
        """Keep other events ≥ `_GAP` away from [start, end] (e.g. an evidence window)."""
        self.busy.append((start, end))

    def fits(self, start: int, length: int) -> bool:
        end = start + length
        if start < _EDGE or end > self.n - _EDGE:
            return False
        return all(end + _GAP <= s or start >= e + _GAP for s, e in self.busy)

    def put(self, ev: _Event, start: int) -> None:
        ev.start = start
        self.busy.append((start, start + ev.length))
        self.events.append(ev)

    def place(self, rng: np.random.Generator, ev: _Event, regions: Sequence[tuple[int, int]] | None = None) -> bool:
        """Put `ev` at a uniformly random free onset with the event inside one of `regions` (default: clip)."""
        regions = regions if regions is not None else [(0, self.n)]
        cands: list[tuple[int, int]] = []  # inclusive onset ranges
        busy = sorted(self.busy)
        for lo, hi in regions:
            cur, hi = max(lo, _EDGE), min(hi, self.n - _EDGE)
            free: list[tuple[int, int]] = []
            for s, e in busy:
                s2, e2 = s - _GAP, e + _GAP
                if e2 <= cur:
                    continue
                if s2 >= hi:
                    break
                if s2 > cur:
                    free.append((cur, s2))
                cur = max(cur, e2)
            if cur < hi:
                free.append((cur, hi))
            cands += [(a, b - ev.length) for a, b in free if b - a >= ev.length]
        if not cands:
            return False
        sizes = np.array([b - a + 1 for a, b in cands], dtype=np.float64)
        a, b = cands[int(rng.choice(len(cands), p=sizes / sizes.sum()))]
        self.put(ev, int(rng.integers(a, b + 1)))
        return True

    def fill(self, rng: np.random.Generator, kinds: Sequence[str], rate: float) -> None:
        """Add events of `kinds` at random free places up to about `rate` events per second in all."""
        target = round(self.n / _SR * rate)
        for _ in range(max(0, target - len(self.events))):
            self.place(rng, _new_event(rng, kinds[int(rng.integers(len(kinds)))]))


@dataclass
class _Plan:
    item: PuzzleItem
    n: int
    events: list[_Event]


def _balanced(seed: int, category: str, slot: int, combos: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Combination number `slot` of a shuffled run of blocks of all `combos`: exact balance per block."""
    block, pos = divmod(slot, len(combos))
    ss = np.random.SeedSequence([seed, CATEGORIES.index(category), block, 0xBA1A])
    return combos[int(np.random.default_rng(ss).permutation(len(combos))[pos])]


def _pick(rng: np.random.Generator, seed: int, category: str, slot: int | None, combos: list[tuple[Any, ...]]) -> Any:
    if slot is None:
        return combos[int(rng.integers(len(combos)))]
    return _balanced(seed, category, slot, combos)


def _place_choices(rng: np.random.Generator, answer: str, others: Sequence[str], position: int) -> list[str]:
    rest = [others[i] for i in rng.permutation(len(others))]
    return [*rest[:position], answer, *rest[position:]]


def _t(x: float) -> str:
    return f"{x:.1f}"


def _seg(a: float, b: float) -> str:
    return f"<seg>{a:.1f}, {b:.1f}</seg>"


def _range_text(a: float, b: float) -> str:
    return f"{a:.1f}-{b:.1f} s"


def _listen(a: float, b: float) -> str:
    """The one rationale before every listen, then the listen: ``I listen to 3.0-7.5 s: <seg>3.0, 7.5</seg>``."""
    return f"I listen to {_range_text(a, b)}: {_seg(a, b)}"


def _trace(lead: str, steps: Sequence[tuple[float, float, str]], answer: str, close: str = "") -> str:
    """``<think>LEAD I listen to A-B s: <seg>A, B</seg> OBS. ...CLOSE</think><answer>ANSWER</answer>``."""
    body = " ".join(f"{_listen(a, b)}{obs}" for a, b, obs in steps)
    return f"<think>{lead} {body}{close}</think><answer>{answer}</answer>"


def _window_regions(n: int) -> list[tuple[int, int]]:
    """Sample ranges in which an event lies inside one scan window, ≥ `_WINDOW_MARGIN` from its ends."""
    regions: list[tuple[int, int]] = []
    k = 0
    while k * _WINDOW < n / _SR and k < _MAX_SCAN:
        regions.append((round((k * _WINDOW + _WINDOW_MARGIN) * _SR), round(((k + 1) * _WINDOW - _WINDOW_MARGIN) * _SR)))
        k += 1
    return regions


def _in_one_window(start: int, length: int) -> bool:
    """Whether samples [start, start + length) lie inside one scan window, ≥ `_WINDOW_MARGIN` from its ends."""
    w, m = round(_WINDOW * _SR), round(_WINDOW_MARGIN * _SR)
    k = start // w
    return k < _MAX_SCAN and k * w + m <= start and start + length <= (k + 1) * w - m


def _window_of(ev: _Event) -> int:
    return ev.start // round(_WINDOW * _SR)


def _scan(n: int, last: int, found: str, missing: str) -> tuple[list[tuple[float, float, str]], list[list[float]]]:
    """Listens to the scan windows 0..`last` (`missing` after each but the last, `found` after it) and the
    evidence: the last window, clamped to the clip (the trace keeps the unclamped end; the runtime clamps)."""
    steps = [(k * _WINDOW, (k + 1) * _WINDOW, missing if k < last else found) for k in range(last + 1)]
    return steps, [[last * _WINDOW, min((last + 1) * _WINDOW, n / _SR)]]


def _zoom(ex: _Event, ey: _Event, start: float, budget: int, answer: str) -> list[tuple[float, float, str]]:
    """The listens after a scan window heard both targets: its first half, then the first half of
    whichever part holds the first target (both heard: the span's own first half; neither: the next
    quarter), until exactly one target is heard or `budget` listens are spent. The last step names
    the answer. With no budget left (a scan that took all 7 listens) the window's step names it.

    Exactly one heard settles it: the first event ends before the second starts, so a span starting
    at or before the first event's onset that hears the second also hears the first."""
    x, y = ex.kind, ey.kind
    if budget <= 0:
        return []
    steps: list[tuple[float, float, str]] = []
    a, b = start, start + _WINDOW / 2
    for depth in range(budget):
        heard = kinds_heard([(e.kind, e.onset, e.offset) for e in (ex, ey)], a, b)
        checks = f"{_check(x, x in heard)}{_check(y, y in heard)}"
        if len(heard) == 1 or depth == budget - 1:
            steps.append((a, b, f"{checks} The {answer} comes first."))
            break
        steps.append((a, b, checks))
        a, b = (a, a + (b - a) / 2) if heard else (b, b + (b - a) / 2)
    return steps


def kinds_heard(events: Iterable[tuple[str, float, float]], start: float, end: float) -> list[str]:
    """The kinds of the (kind, onset, offset) events heard in [start, end], in `KINDS` order. An event
    counts when half of it, or 0.25 s of it, lies inside: the rule echo-tiny's encoder is pretrained on."""
    heard = set()
    for kind, onset, offset in events:
        inside = max(0.0, min(end, offset) - max(start, onset))
        if inside >= min(0.5 * (offset - onset), 0.25):
            heard.add(kind)
    return [k for k in KINDS if k in heard]


def _check(kind: str, present: bool) -> str:
    """`` chord? yes.``: a scan step's targeted check. The kind is written *before* the verdict, so the
    verdict token sits right after the kind's own tokens: a one-hop read of the slice for that kind,
    not a comparison against a target stated sentences earlier (which echo-tiny's decoder failed at)."""
    return f" {kind}? {'yes' if present else 'no'}."


def _tenths(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A uniform time on the 0.1 s grid in [lo, hi]."""
    return int(rng.integers(math.ceil(lo * 10 - 1e-9), math.floor(hi * 10 + 1e-9) + 1)) / 10


def _put_around(rng: np.random.Generator, tl: _Timeline, ev: _Event, t: float) -> None:
    """Place `ev` so that time `t` falls inside it (inside one click, for a click train)."""
    ts = round(t * _SR)
    if ev.clicks:
        off, length = ev.clicks[int(rng.integers(len(ev.clicks)))]
        start = ts - off - int(rng.integers(0, max(1, length - 1)))
    else:
        lo = max(0.2, 1.0 - (tl.n - _EDGE - ts) / ev.length)
        hi = min(0.8, (ts - _EDGE) / ev.length)
        start = ts - round(float(rng.uniform(lo, max(lo, hi))) * ev.length)
    tl.put(ev, min(max(start, _EDGE), tl.n - _EDGE - ev.length))


def _only(tl: _Timeline, kind: str) -> _Event:
    (ev,) = [e for e in tl.events if e.kind == kind]
    return ev


# ----------------------------------------------------------------------------------------- categories
# Each builder places the events the question is about, fills the rest of the clip, and returns
# (question, choices, answer, evidence, trace).

_Built = tuple[str, list[str], str, list[list[float]], str]


def _build_count(rng: np.random.Generator, tl: _Timeline, seed: int, slot: int | None, rate: float) -> _Built:
    n_in, pos = _pick(rng, seed, "count", slot, [(k, p) for k in range(1, 6) for p in range(4)])
    dur = tl.n / _SR
    length = int(rng.integers(8, 17)) / 2  # 4.0 .. 8.0 s
    a = int(rng.integers(0, math.floor((dur - length) * 2) + 1)) / 2
    b = a + length
    # The beeps inside [a + 0.1, b - 0.1], spread uniformly at random with the minimum gaps.
    lo, hi = max(round((a + 0.1) * _SR), _EDGE), min(round((b - 0.1) * _SR), tl.n - _EDGE)
    beeps = [_new_event(rng, "beep") for _ in range(n_in)]
    slack = hi - lo - sum(e.length for e in beeps) - (n_in - 1) * _GAP
    if slack < 0:  # cannot happen with the design's ranges, but stay safe
        beeps = [_new_event(rng, "beep", seconds=0.1) for _ in range(n_in)]
        slack = hi - lo - sum(e.length for e in beeps) - (n_in - 1) * _GAP
    cum = 0
    for k, (ev, off) in enumerate(zip(beeps, np.sort(rng.integers(0, slack + 1, n_in)), strict=True)):
        tl.put(ev, lo + int(off) + cum + k * _GAP)
        cum += ev.length
    # Distractor beeps outside the window (so counting the whole clip is wrong), then non-beep fillers.
    outside = [(0, round(a * _SR) - _GAP), (round(b * _SR) + _GAP, tl.n)]
    placed = 0
    for _ in range(int(rng.integers(1, 5))):
        placed += tl.place(rng, _new_event(rng, "beep"), outside)
    if not placed:  # ≥ 2 s of a ≥ 10 s clip lie outside the window, so a 0.1 s beep always fits
        placed += tl.place(rng, _new_event(rng, "beep", seconds=0.1), outside)
    assert placed
    tl.fill(rng, [k for k in KINDS if k != "beep"], rate)

    answer = str(n_in)
    others = [str(k) for k in range(1, 6) if k != n_in]
    others = [others[i] for i in sorted(rng.choice(4, 3, replace=False))]
    choices = _place_choices(rng, answer, others, pos)
    question = f"How many beeps are there between {_t(a)} and {_t(b)} seconds?"
    observe = " there is 1 beep." if n_in == 1 else f" there are {n_in} beeps."
    trace = _trace("I count the beeps in the window.", [(a, b, observe)], answer)
    return question, choices, answer, [[a, b]], trace


def _build_order(rng: np.random.Generator, tl: _Timeline, seed: int, slot: int | None, rate: float) -> _Built:
    x_first, pos = _pick(rng, seed, "order", slot, [(f, p) for f in (True, False) for p in range(2)])
    i, j = rng.choice(len(KINDS), 2, replace=False)
    x, y = KINDS[int(i)], KINDS[int(j)]
    ex, ey = _new_event(rng, x), _new_event(rng, y)
    first, second = (ex, ey) if x_first else (ey, ex)
    for _ in range(1000):  # two uniform onsets in the right order, each event inside one scan window
        s1, s2 = (int(s) for s in np.sort(rng.integers(_EDGE, tl.n - _EDGE, 2)))
        if (
            s1 + first.length + _GAP <= s2
            and tl.fits(s2, second.length)
            and tl.fits(s1, first.length)
            and _in_one_window(s1, first.length)
            and (_in_one_window(s2, second.length) or s2 >= _MAX_SCAN * _WINDOW * _SR)
        ):
            tl.put(first, s1)
            tl.put(second, s2)
            break
    else:  # pragma: no cover - 1000 misses on an empty clip of ≥ 10 s do not happen
        tl.put(first, _EDGE)
        tl.place(rng, second, [(max(lo, first.end + _GAP), hi) for lo, hi in _window_regions(tl.n)])
    tl.fill(rng, [k for k in KINDS if k not in (x, y)], rate)

    answer = first.kind
    choices = _place_choices(rng, answer, [second.kind], pos)
    question = f"Which is heard first, the {x} or the {y}?"
    last = _window_of(first)
    missing = f"{_check(x, False)}{_check(y, False)}"
    if _window_of(second) != last:
        found = f"{_check(x, x_first)}{_check(y, not x_first)} The {answer} comes first."
        steps, evidence = _scan(tl.n, last, found, missing)
    else:  # both in one window: its tokens cannot tell which came first, so zoom in
        zoom = _zoom(ex, ey, last * _WINDOW, min(_ZOOM_DEPTH, _MAX_SCAN - 1 - last), answer)
        found = f"{_check(x, True)}{_check(y, True)}" + ("" if zoom else f" The {answer} comes first.")
        steps = _scan(tl.n, last, found, missing)[0] + zoom
        evidence = [[steps[-1][0], min(steps[-1][1], tl.n / _SR)]]
    # The lead restates what to look for, so later steps copy it from nearby text, not from the question.
    trace = _trace(f"I look for the {x} and the {y} in 10-second windows.", steps, answer)
    return question, choices, answer, evidence, trace


def _build_identify(rng: np.random.Generator, tl: _Timeline, seed: int, slot: int | None, rate: float) -> _Built:
    kind, pos = _pick(rng, seed, "identify", slot, [(k, p) for k in KINDS for p in range(4)])
    t = _tenths(rng, 1.0, tl.n / _SR - 1.0)
    ev = _new_event(rng, kind)
    _put_around(rng, tl, ev, t)
    a, b = max(0.0, round(t - 0.5, 1)), min(tl.n / _SR, round(t + 0.5, 1))
    tl.reserve(round(a * _SR), round(b * _SR))
    tl.fill(rng, KINDS, rate)

    others = [k for k in KINDS if k != kind]
    others = [others[i] for i in sorted(rng.choice(4, 3, replace=False))]
    choices = _place_choices(rng, kind, others, pos)
    question = f"Which sound is heard at {_t(t)} seconds?"
    trace = _trace(f"I check the sound at {_t(t)} s.", [(a, b, f" it is a {kind}.")], kind)
    return question, choices, kind, [[a, b]], trace


def _build_pitch(rng: np.random.Generator, tl: _Timeline, seed: int, slot: int | None, rate: float) -> _Built:
    pairs = [(p, q) for p in PITCH_WORDS for q in PITCH_WORDS if p != q]
    (w1, w2), pos = _pick(rng, seed, "pitch", slot, [(pq, p) for pq in pairs for p in range(2)])
    dur = tl.n / _SR
    t1 = _tenths(rng, 1.0, dur - 1.0)
    t2 = t1
    while abs(t2 - t1) < 1.6:
        t2 = _tenths(rng, 1.0, dur - 1.0)
    windows: list[list[float]] = []
    for t, w in ((t1, w1), (t2, w2)):
        _put_around(rng, tl, _new_event(rng, "beep", pitch=w), t)
        a, b = max(0.0, round(t - 0.5, 1)), min(dur, round(t + 0.5, 1))
        tl.reserve(round(a * _SR), round(b * _SR))
        windows.append([a, b])
    tl.fill(rng, KINDS, rate)

    answer = "higher" if PITCH_WORDS.index(w1) > PITCH_WORDS.index(w2) else "lower"
    choices = _place_choices(rng, answer, ["lower" if answer == "higher" else "higher"], pos)
    question = f"Is the beep at {_t(t1)} seconds higher or lower in pitch than the beep at {_t(t2)} seconds?"
    steps = [(a, b, f" this beep is {w}.") for (a, b), w in zip(windows, (w1, w2), strict=True)]
    close = f" {w1.capitalize()} is {answer} than {w2}, so the answer is {answer}."
    trace = _trace(f"I compare the beeps at {_t(t1)} s and {_t(t2)} s.", steps, answer, close)
    return question, choices, answer, windows, trace


def _tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\b\w+\b", text.lower()))


def _build_locate(rng: np.random.Generator, tl: _Timeline, seed: int, slot: int | None, rate: float) -> _Built:
    rank, pos = _pick(rng, seed, "locate", slot, [(r, p) for r in range(4) for p in range(4)])
    kind = KINDS[int(rng.integers(len(KINDS)))]
    dur = tl.n / _SR
    # Whole-second ranges never share a token set; in clips under 12 s the ranges are 2.0 or 2.5 s wide,
    # and "0.0-2.5 s" / "2.5-5.0 s" do, so a chord there is kept short enough for 2.0 s ranges.
    ev = _new_event(rng, kind, seconds=float(rng.uniform(0.5, 1.5)) if kind == "chord" and dur < 12.0 else None)
    widths = [w for w in (2.0, 2.5, 3.0, 4.0, 5.0) if 4 * w <= dur and ev.length / _SR <= w - 0.4]
    for _ in range(1000):
        width = widths[int(rng.integers(len(widths)))]
        slots = np.sort(rng.choice(int(dur // width), 4, replace=False))
        ranges = [(float(s * width), float(s * width + width)) for s in slots]
        if len({_tokens(_range_text(*r)) for r in ranges}) == 4:
            break
    else:  # pragma: no cover - some width always has distinct token sets
        raise RuntimeError("no distinct time ranges")
    a, b = ranges[rank]
    tl.place(rng, ev, [(round((a + 0.2) * _SR), round((b - 0.2) * _SR))])
    others = [k for k in KINDS if k != kind]
    for k, (c, d) in enumerate(ranges):  # a decoy sound in (almost) every other range
        if k != rank and rng.random() < 0.9:
            tl.place(rng, _new_event(rng, others[int(rng.integers(4))]), [(round(c * _SR), round(d * _SR))])
    tl.fill(rng, others, rate)

    answer = _range_text(a, b)
    choices = _place_choices(rng, answer, [_range_text(*r) for k, r in enumerate(ranges) if k != rank], pos)
    question = f"When is the {kind} heard?"
    # Listen to the choices in the order they are listed, up to the one that holds the event.
    spans = [(float(c), float(d)) for c, d in (re.findall(r"\d+\.\d", x) for x in choices[: pos + 1])]
    steps = [(c, d, _check(kind, k == pos)) for k, (c, d) in enumerate(spans)]
    trace = _trace(f"I look for the {kind} in the time ranges, in the listed order.", steps, answer)
    return question, choices, answer, [[a, b]], trace


def _build_duration(rng: np.random.Generator, tl: _Timeline, seed: int, slot: int | None, rate: float) -> _Built:
    value, pos = _pick(rng, seed, "duration", slot, [(v, p) for v in DURATION_CHOICES for p in range(4)])
    kind = "chord"
    seconds = min(2.0, max(0.5, value + float(rng.uniform(-0.05, 0.05))))
    ev = _new_event(rng, kind, seconds=seconds)
    tl.place(rng, ev, _window_regions(tl.n))  # inside one scan window, so the scan hears it whole
    tl.fill(rng, [k for k in KINDS if k != kind], rate)

    answer = f"{value:.1f} s"
    choices = _place_choices(rng, answer, [f"{v:.1f} s" for v in DURATION_CHOICES if v != value], pos)
    question = f"How long does the {kind} last?"
    found = f" {kind}? yes; it lasts about {value:.1f} s."  # `_check`'s verdict, then the duration
    steps, evidence = _scan(tl.n, _window_of(ev), found, _check(kind, False))
    trace = _trace(f"I look for the {kind} in 10-second windows.", steps, answer)
    return question, choices, answer, evidence, trace


_BUILDERS: dict[str, Callable[[np.random.Generator, _Timeline, int, int | None, float], _Built]] = {
    "count": _build_count,
    "order": _build_order,
    "identify": _build_identify,
    "pitch": _build_pitch,
    "locate": _build_locate,
    "duration": _build_duration,
}


def _difficulty(snr_db: float, seconds: float) -> str:
    hard = (snr_db < 10.0) + (seconds > 35.0)
    return ("easy", "medium", "hard")[hard]


def item_id(split: str, seed: int, index: int) -> str:
    return f"synth-{split}-{seed}-{index:06d}"


def _plan_item(
    rng: np.random.Generator,
    category: str,
    index: int,
    split: str,
    seed: int,
    snr_range: tuple[float, float],
    durations: tuple[float, float],
    slot: int | None,
) -> _Plan:
    if category not in _BUILDERS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    seconds = _tenths(rng, max(durations[0], 10.0), max(durations[1], 10.0))
    n = round(seconds * _SR)
    snr_db = round(float(rng.uniform(*snr_range)), 2)
    noise = "pink" if rng.random() < 0.5 else "white"
    rate = float(rng.uniform(0.1, 0.3))
    tl = _Timeline(n)
    question, choices, answer, evidence, trace = _BUILDERS[category](rng, tl, seed, slot, rate)
    tl.events.sort(key=lambda e: e.start)
    iid = item_id(split, seed, index)
    item = PuzzleItem(
        id=iid,
        audio_id=f"./audio/{iid}.wav",
        question=question,
        choices=choices,
        answer=answer,
        split=split,
        category=category,
        sub_category=SUB_CATEGORIES[category],
        difficulty=_difficulty(snr_db, seconds),
        duration=seconds,
        snr_db=snr_db,
        seed=seed,
        noise=noise,
        evidence=evidence,
        trace=trace,
        events=[e.record() for e in tl.events],
    )
    return _Plan(item, n, tl.events)


# -------------------------------------------------------------------------------------------- synthesis


def _fade(x: _F64) -> _F64:
    k = min(_FADE, len(x) // 2)
    if k:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
        x[:k] *= ramp
        x[len(x) - k :] *= ramp[::-1]
    return x


def _synth(rng: np.random.Generator, ev: _Event) -> tuple[_F64, npt.NDArray[np.bool_]]:
    """The event's samples at unit RMS over its active samples, and the mask of those samples."""
    t = np.arange(ev.length) / _SR
    active = np.ones(ev.length, dtype=bool)
    if ev.kind == "beep":
        x = np.sin(2 * np.pi * ev.params["freq"] * t)
    elif ev.kind == "chirp":
        f0, f1 = ev.params["f0"], ev.params["f1"]
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * ev.length / _SR) * t * t))
    elif ev.kind == "noise burst":
        x = rng.standard_normal(ev.length)
    elif ev.kind == "chord":
        phases = rng.uniform(0, 2 * np.pi, 3)[:, None]
        ratios = np.array([1.0, 1.25, 1.5])[:, None]
        x = np.sin(2 * np.pi * ev.params["freq"] * ratios * t[None, :] + phases).sum(axis=0)
    else:  # click train: exponentially decaying noise bursts
        x = np.zeros(ev.length)
        active[:] = False
        for off, length in ev.clicks:
            x[off : off + length] = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 5))
            active[off : off + length] = True
        return x / np.sqrt(np.mean(x[active] ** 2)), active
    x = _fade(x)
    return x / np.sqrt(np.mean(x**2)), active


@functools.lru_cache(maxsize=4096)
def _fft_len(n: int) -> int:
    """The smallest 2^a·3^b·5^c ≥ n (a fast FFT size; pocketfft is slow on lengths with large primes)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            q = p35
            while q < n:
                q *= 2
            best = min(best, q)
            p35 *= 3
        p5 *= 5
    return best


def _noise(rng: np.random.Generator, n: int, colour: str) -> _F64:
    """Unit-RMS background noise. Pink: a Gaussian spectrum shaped by 1/sqrt(f) above 20 Hz, one inverse FFT."""
    if colour == "pink":
        m = _fft_len(n)
        bins = m // 2 + 1
        spec = rng.standard_normal(bins) + 1j * rng.standard_normal(bins)
        spec /= np.sqrt(np.maximum(np.fft.rfftfreq(m, 1.0 / _SR), 20.0))
        spec[0] = 0.0
        x: _F64 = np.fft.irfft(spec, m)[:n]
    else:
        x = rng.standard_normal(n)
    return x / math.sqrt(float(np.mean(x**2)))


def _render(rng: np.random.Generator, plan: _Plan) -> npt.NDArray[np.int16]:
    signal = np.zeros(plan.n)
    mask = np.zeros(plan.n, dtype=bool)
    for ev in plan.events:
        x, active = _synth(rng, ev)
        signal[ev.start : ev.end] += ev.gain * x
        mask[ev.start : ev.end] |= active
    event_power = float(np.mean(signal[mask] ** 2))
    noise = _noise(rng, plan.n, plan.item.noise) * math.sqrt(event_power / 10 ** (plan.item.snr_db / 10))
    mix = signal + noise
    mix *= _PEAK / float(np.max(np.abs(mix)))
    return np.round(mix * 32767).astype(np.int16)


# ------------------------------------------------------------------------------------------------ API


def generate_item(
    rng: np.random.Generator,
    category: str,
    index: int,
    split: str,
    seed: int,
    snr_range: tuple[float, float] = (5.0, 20.0),
    durations: tuple[float, float] = (10.0, 60.0),
    *,
    slot: int | None = None,
) -> tuple[PuzzleItem, Waveform]:
    """One puzzle and its clip (float32 in [-1, 1], 16 kHz, already quantised to what the WAV holds).

    `slot` is the item's number within its category in a suite: answers and answer positions then come
    from balanced blocks (see the module docstring). With `slot=None` they are drawn from `rng`.
    """
    plan = _plan_item(rng, category, index, split, seed, snr_range, durations, slot)
    pcm = _render(rng, plan)
    return plan.item, pcm.astype(np.float32) / 32768.0


def item_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of item `index` of the suite with seed `seed`: `SeedSequence([seed, index])`."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _suite_slots(n: int, categories: Sequence[str]) -> list[tuple[int, str, int]]:
    """(index, category, slot within the category) of a suite's items; validates `categories`."""
    if not categories:
        raise ValueError("no categories")
    for c in categories:
        if c not in _BUILDERS:
            raise ValueError(f"unknown category {c!r}; expected one of {CATEGORIES}")
    k = len(categories)
    return [(i, categories[i % k], i // k) for i in range(n)]


def plan_suite(
    n: int,
    seed: int,
    split: str = "test",
    categories: Sequence[str] = CATEGORIES,
    snr_range: tuple[float, float] = (5.0, 20.0),
    durations: tuple[float, float] = (10.0, 60.0),
) -> list[PuzzleItem]:
    """The items `write_suite` would write, without synthesising audio (about 3000 items per second)."""
    return [
        _plan_item(item_rng(seed, i), c, i, split, seed, snr_range, durations, slot).item
        for i, c, slot in _suite_slots(n, list(categories))
    ]


def _job(args: tuple[Path, int, str, int, str, int, tuple[float, float], tuple[float, float]]) -> dict[str, Any]:
    """Worker: make item `index`, write its WAV, return its JSON record."""
    import soundfile as sf

    out_dir, index, category, slot, split, seed, snr_range, durations = args
    rng = item_rng(seed, index)
    plan = _plan_item(rng, category, index, split, seed, snr_range, durations, slot)
    pcm = _render(rng, plan)
    sf.write(out_dir / plan.item.audio_id, pcm, _SR, subtype="PCM_16", format="WAV")
    return plan.item.model_dump(mode="json", by_alias=True)


def write_suite(
    out_dir: Path,
    n: int,
    seed: int,
    split: str = "test",
    categories: Sequence[str] = CATEGORIES,
    snr_range: tuple[float, float] = (5.0, 20.0),
    workers: int = 1,
    progress: bool = True,
    durations: tuple[float, float] = (10.0, 60.0),
) -> Path:
    """Write `n` items: `out_dir/<split>.json` (an MMAU JSON list) and `out_dir/audio/<id>.wav`.

    Item `i` has category `categories[i % len(categories)]`; its content depends only on (seed, i), so
    the output is byte-identical for any `workers`. Returns the JSON path.
    """
    slots = _suite_slots(n, list(categories))
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, i, c, slot, split, seed, snr_range, durations) for i, c, slot in slots]
    records: list[dict[str, Any]] = []

    def collect(results: Iterable[dict[str, Any]], advance: Callable[[], None]) -> None:
        for rec in results:
            records.append(rec)
            advance()

    def run(advance: Callable[[], None]) -> None:
        if workers <= 1:
            collect(map(_job, jobs), advance)
        else:
            chunk = max(1, min(32, n // (workers * 8)))
            # Workers start from a fresh interpreter, not a fork: a fork of a process whose torch threads hold a
            # lock (any caller that used torch first, such as a test session) can hang in the child's first torch op.
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
                collect(pool.map(_job, jobs, chunksize=chunk), advance)

    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns) as bar:
            task = bar.add_task(f"synth {split}", total=n)
            run(lambda: bar.advance(task))
    else:
        run(lambda: None)

    path = out_dir / f"{split}.json"
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def write_splits(
    out_dir: Path, n_train: int, n_val: int, n_test: int, seed: int, workers: int = 1, progress: bool = True
) -> dict[str, Path]:
    """Train/val/test suites in one folder (shared `audio/`), from seeds `seed*1000 + 0/1/2`: no shared clips."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {
        split: write_suite(out_dir, size, seed * 1000 + k, split, workers=workers, progress=progress)
        for k, (split, size) in enumerate(sizes.items())
    }


def synth_command(
    out: Path,
    n: int,
    seed: int,
    split: str = "test",
    workers: int = 1,
    durations: tuple[float, float] = (10.0, 60.0),
    snr_range: tuple[float, float] = (5.0, 20.0),
    categories: Sequence[str] = CATEGORIES,
) -> Path:
    """What `echo-agent data synth --out DIR --n N --seed S` runs: one suite with a progress bar.

    Audio costs about 32 kB per clip-second (≈1.1 MB per item at the default 10–60 s clips).
    """
    workers = max(1, workers)
    return write_suite(Path(out), n, seed, split, categories, snr_range, workers, True, durations)
