"""The sound domain of the real-audio suite: synthetic events and real recorded effects over noise or ambience.

**Vocabulary** (`KINDS`, names used verbatim in questions and choices): today's synthetic events
(`beep`, `chirp`, `noise burst`, `click`, `chord`: `training/synth.py`'s `_new_event`/`_synth`) and
real CC0 recordings from `sonic-pi-samples` (`effects.EFFECTS`: bell, crow, cowbell, snap, cymbal,
kick, snare, tabla, scratch, burp, cash register). `pitch` and `duration` stay on the synthetic beep and
chord, whose pitch and length are controlled; the other categories ask about any kind.

**Scenes.** One mono 16 kHz clip of 10-30 s: a sequence of events, at least 0.7 s apart (so every gap
holds a 0.5 s grid point 0.1 s clear of both neighbours, where question windows may start or end), 0.2 s
from the clip's edges and never across a multiple of 10 s (so the 10 s scans below hear each event whole),
over a background (coloured noise or an ambience bed) at a drawn SNR. Every scene holds what every
category needs, so a thread can ask anything about it: a low, a mid and a high beep, two chords of
different lengths among 0.5/1.0/1.5/2.0 s (±0.05), and three kinds heard exactly once (protected from
fillers); the identify scene, already crowded, has two beeps and one chord. A scene made
for category C is arranged so that *every* balanced answer of C is possible (`ask` picks the question
after the scene exists):

- `count`: five events of one countable kind in a tight run (0.7-1.2 s apart) plus one or two more of
  that kind elsewhere; the window covers n consecutive ones (n = 1..5), its ends in gaps.
- `identify`: every kind at least once.
- `pitch`: a low, a mid and a high beep, and a copy of one of them (same seed: the identical tone), so
  "higher", "lower" and "same" all occur.
- `duration`: four chords, one of each length; the question's span holds exactly one of them.
- `order`, `locate`: four or five kinds heard once; locate's four ranges are whole-second slots of one
  width and the answer's rank among them in time is balanced.

**Questions** come from `BANKS` (train / held-out / follow-up templates). Multiple choice has 3-4
choices (`pitch`: higher, lower, same; `order`: which of three is heard first).

**Gold traces** (seg-tag protocol, style of `training/synth.py`; every span is computable from the
question or from a fixed scan):

- `count`: one listen to the question's window; `` there are 3 snaps.``
- `identify`: one listen to T±0.5 s; `` it is a crow.``
- `pitch`: T1±0.5 and T2±0.5 s; `` this beep is high.`` each, then the comparison.
- `duration`: one listen to the question's span; `` the chord lasts about 1.5 s.``
- `locate` (choices): the choices' ranges in their listed order, `` snap? no.`` ... `` snap? yes.``;
  (open): 10 s windows from 0 s (the last one clamped to the clip) until the kind is heard, then the
  first half of the current span, at most twice: heard whole there -> keep it; not heard -> the other
  half (listened to last if the zoom ends there); heard in part -> stop; the answer is the event's extent.
- `order`: the same 10 s scan until a window holds one of the three; when it holds several, the zoom of
  `training/synth.py` (first half; then the first half of whichever part holds the first one).

**Held-out sources** (`sources="heldout"`, `HELDOUT_SOURCES`): held-out recordings of the kinds that have
several (snap, cymbal, kick, snare, tabla), brown noise and two ambience beds never used in training,
and a lower SNR band (3-6 dB against 6-20 dB). The other recorded kinds have one recording each, shared.

`isolate(scene, events)` re-renders chosen events alone at the scene's mixing level (for the ground-truth
checks in `bench/truth_sound.py`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import synth
from ..synth import PITCH_WORDS, _new_event, _synth
from . import effects, phrasing
from .core import (
    SAMPLE_RATE,
    Domain,
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
    "COUNTABLE",
    "DURATIONS",
    "HELDOUT_SOURCES",
    "KINDS",
    "PITCH_ANSWERS",
    "RECORDED_KINDS",
    "SUB_CATEGORIES",
    "SYNTH_KINDS",
    "ask",
    "isolate",
    "make_scene",
]

DOMAIN: Domain = "sound"
CATEGORIES: tuple[str, ...] = synth.CATEGORIES
SUB_CATEGORIES: dict[str, str] = dict(synth.SUB_CATEGORIES)
SYNTH_KINDS: tuple[str, ...] = synth.KINDS
RECORDED_KINDS: tuple[str, ...] = tuple(effects.EFFECTS)
KINDS: tuple[str, ...] = (*SYNTH_KINDS, *RECORDED_KINDS)
COUNTABLE: tuple[str, ...] = ("beep", "chirp", "noise burst", *(k for k, e in effects.EFFECTS.items() if e.countable))
"""Kinds a `count` question may be about: one clear attack each (click trains and long rings are not)."""
DURATIONS: tuple[float, ...] = synth.DURATION_CHOICES
PITCH_ANSWERS: tuple[str, ...] = ("higher", "lower", "same")
_NOUNS: dict[str, tuple[str, str]] = {
    "beep": ("beep", "beeps"),
    "chirp": ("chirp", "chirps"),
    "noise burst": ("noise burst", "noise bursts"),
    **{k: e.noun for k, e in effects.EFFECTS.items()},
}

HELDOUT_SOURCES: dict[str, tuple[str, ...]] = {
    "recordings": tuple(sorted(f for e in effects.EFFECTS.values() for f in e.heldout)),
    "beds": effects.BEDS["heldout"],
    "noise": effects.NOISE_COLOURS["heldout"],
    "snr_db": (f"{effects.SNR_DB['heldout'][0]:g}-{effects.SNR_DB['heldout'][1]:g}",),
}
"""What only `sources="heldout"` uses: recordings, beds, noise colours and the SNR band (dB)."""

_SR = SAMPLE_RATE
_GAP = 0.7  # minimum silence between events, seconds
_TIGHT = (0.7, 1.2)  # gaps inside a count run
_EDGE = 0.2
_WINDOW = 10.0  # scans listen in windows of this many seconds from 0 s
_MARGIN = 0.2  # events lie this far inside one scan window
_MIN_S, _MAX_S = 10.0, 30.0
_CUT = 0.1  # question windows end at least this far from any event
_REACH = 2.5  # ... and at most this far beyond the events they are about
_ZOOM = 2  # zoom listens after an open locate's scan
_WIDTHS = (2, 3, 4, 5)  # locate's range widths, whole seconds
_UNIQUE_POOL = tuple(k for k in KINDS if k not in ("beep", "chord"))
_SECONDS = {"beep": (0.15, 0.5), "chirp": (0.3, 1.0), "noise burst": (0.2, 1.0)}

_F64 = npt.NDArray[np.float64]

# ------------------------------------------------------------------------------------------------- banks

BANKS: dict[str, Bank] = {
    "count": Bank(
        "count",
        train=(
            "How many {many} are there {span}?",
            "Count the {many} {span}.",
            "How many times do you hear {a_kind} {span}?",
            "How many {many} do you hear {span}?",
            "What is the number of {many} {span}?",
            "Tell me how many {many} sound {span}.",
        ),
        heldout=(
            "Could you count the {many} that occur {span}?",
            "How often does {a_kind} sound {span}?",
        ),
        follow_up=("And {span}?", "What about {span}?", "And how many {many} {span}?"),
    ),
    "identify": Bank(
        "identify",
        train=(
            "Which sound is heard at {time}?",
            "What do you hear at {time}?",
            "What sound plays at {time}?",
            "Identify the sound at {time}.",
            "At {time}, which sound can be heard?",
            "What is making the sound at {time}?",
        ),
        heldout=(
            "Name the sound that occurs at {time}.",
            "Tell me what sound is playing at {time}.",
        ),
        follow_up=("And at {time}?", "What about at {time}?", "And the sound at {time}?"),
    ),
    "pitch": Bank(
        "pitch",
        train=(
            "Is the beep at {t1} higher, lower or the same in pitch as the beep at {t2}?",
            "Compared with the beep at {t2}, is the beep at {t1} higher, lower or the same?",
            "Is the tone at {t1} higher than, lower than or the same as the one at {t2}?",
            "Does the beep at {t1} sound higher, lower or the same as the beep at {t2}?",
            "Relative to the beep at {t2}, is the beep at {t1} pitched higher, lower or the same?",
            "Higher, lower or the same: the beep at {t1} against the beep at {t2}?",
        ),
        heldout=(
            "Is the pitch of the beep at {t1} above, below or equal to that of the beep at {t2}?",
            "Would you say the beep at {t1} is higher, lower or the same as the beep at {t2}?",
        ),
        follow_up=(
            "And the beep at {t1} compared with the one at {t2}?",
            "What about the beep at {t1} against the one at {t2}?",
        ),
    ),
    "order": Bank(
        "order",
        train=(
            "Which is heard first, the {x}, the {y} or the {z}?",
            "Which comes first: the {x}, the {y} or the {z}?",
            "Of the {x}, the {y} and the {z}, which do you hear first?",
            "Which sound occurs earliest: the {x}, the {y} or the {z}?",
            "Between the {x}, the {y} and the {z}, which one sounds first?",
            "What happens first, the {x}, the {y} or the {z}?",
        ),
        heldout=(
            "Which of the three starts earliest, the {x}, the {y} or the {z}?",
            "The {x}, the {y} and the {z} each sound once; which one precedes the others?",
        ),
        follow_up=("And the {x}, the {y} or the {z}?", "What about the {x}, the {y} and the {z}?"),
    ),
    "locate": Bank(
        "locate",
        train=(
            "When is the {kind} heard?",
            "When does the {kind} sound?",
            "At what time can the {kind} be heard?",
            "When do you hear the {kind}?",
            "Where in the clip is the {kind}?",
            "During which time range does the {kind} occur?",
        ),
        heldout=(
            "In which part of the recording does the {kind} appear?",
            "Find the moment the {kind} happens.",
        ),
        follow_up=("And the {kind}?", "What about the {kind}?", "And when is the {kind}?"),
    ),
    "duration": Bank(
        "duration",
        train=(
            "How long does the chord {span} last?",
            "What is the duration of the chord {span}?",
            "How long is the chord heard {span}?",
            "For how long does the chord {span} sound?",
            "How many seconds does the chord {span} last?",
            "Roughly how long is the chord {span}?",
        ),
        heldout=(
            "Estimate the length of the chord played {span}.",
            "What's the length of the chord {span}?",
        ),
        follow_up=("And the chord {span}?", "What about the chord {span}?"),
    ),
}

# --------------------------------------------------------------------------------------------- events


@dataclass
class _Ev:
    """A planned event: its samples at unit level, and how to render it again."""

    kind: str
    wav: Waveform | _F64 = field(repr=False)
    active: npt.NDArray[np.bool_] = field(repr=False)
    gain: float
    seed: int | None = None  # synthetic: the render seed
    file: str | None = None  # recorded: the sonic-pi-samples file (stem)
    params: dict[str, Any] = field(default_factory=dict)
    clicks: list[int] = field(default_factory=list)  # click trains: click offsets, samples
    tight: bool = False  # the gap before it is a count run's tight gap
    start: int = -1

    @property
    def length(self) -> int:
        return len(self.wav)

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "kind": self.kind,
            "onset": round(self.start / _SR, 6),
            "offset": round((self.start + self.length) / _SR, 6),
            "source": "recorded" if self.file else "synthetic",
            "gain": self.gain,
        }
        if self.file:
            rec["file"] = self.file
        else:
            rec["seed"] = self.seed
        rec.update(self.params)
        if self.clicks:
            rec["clicks"] = [round((self.start + c) / _SR, 6) for c in self.clicks]
        return rec


def _render_synthetic(
    kind: str, seed: int, length: int, pitch: str | None
) -> tuple[_F64, npt.NDArray[np.bool_], dict[str, Any], list[int]]:
    """A synthetic event from its seed alone (same arguments, same samples: `isolate` relies on it)."""
    ev_rng = np.random.default_rng(seed)
    ev = _new_event(ev_rng, kind, seconds=None if kind == "click" else length / _SR, pitch=pitch)
    x, active = _synth(ev_rng, ev)
    return x, active, dict(ev.params), [off for off, _ in ev.clicks]


def _synthetic(
    rng: np.random.Generator,
    kind: str,
    *,
    seconds: float | None = None,
    pitch: str | None = None,
    seed: int | None = None,
) -> _Ev:
    if kind == "beep" and pitch is None:
        pitch = PITCH_WORDS[int(rng.integers(3))]
    if seconds is None and kind in _SECONDS:
        seconds = float(rng.uniform(*_SECONDS[kind]))
    if seconds is None and kind == "chord":
        seconds = DURATIONS[int(rng.integers(len(DURATIONS)))] + float(rng.uniform(-0.05, 0.05))
    seed = int(rng.integers(2**31)) if seed is None else seed
    gain = round(float(rng.uniform(0.4, 0.8) if kind == "click" else rng.uniform(0.5, 1.0)), 4)
    x, active, params, clicks = _render_synthetic(kind, seed, round((seconds or 0.0) * _SR), pitch)
    return _Ev(kind, x, active, gain, seed=seed, params=params, clicks=clicks)


def _recorded(rng: np.random.Generator, kind: str, sources: SourceSplit) -> _Ev:
    name, wav = effects.effect(kind, sources, rng)
    gain = round(float(rng.uniform(0.5, 1.0)), 4)
    return _Ev(kind, wav, np.ones(len(wav), dtype=bool), gain, file=name)


def _event(rng: np.random.Generator, kind: str, sources: SourceSplit) -> _Ev:
    return _recorded(rng, kind, sources) if kind in effects.EFFECTS else _synthetic(rng, kind)


def _render_record(rec: dict[str, Any]) -> Waveform | _F64:
    if rec["source"] == "recorded":
        return effects.recording(rec["file"])
    length = round((rec["offset"] - rec["onset"]) * _SR)
    return _render_synthetic(rec["kind"], int(rec["seed"]), length, rec.get("pitch"))[0]


# --------------------------------------------------------------------------------------------- layout


def _tenths(rng: np.random.Generator, lo: float, hi: float) -> float:
    return int(rng.integers(math.ceil(lo * 10 - 1e-9), math.floor(hi * 10 + 1e-9) + 1)) / 10


def _push(start: int, length: int) -> int:
    """The first onset >= `start` at which the event lies inside one scan window, `_MARGIN` from its ends."""
    w, m = round(_WINDOW * _SR), round(_MARGIN * _SR)
    k = start // w
    if start < k * w + m:
        start = k * w + m
    if start + length > (k + 1) * w - m:
        start = (k + 1) * w + m
    return start


def _layout(rng: np.random.Generator, seq: list[_Ev], n: int) -> bool:
    """Set the onsets of `seq`, in order: tight gaps for count runs, the rest of the clip's slack shared at
    random (Dirichlet) among the other gaps. False when it does not fit in `n` samples."""
    gap, edge = round(_GAP * _SR), round(_EDGE * _SR)
    extra_tight = [int(rng.integers(0, round((_TIGHT[1] - _TIGHT[0]) * _SR) + 1)) if e.tight else 0 for e in seq]
    loose = [0] + [i for i in range(1, len(seq)) if not seq[i].tight] + [len(seq)]  # len(seq): the tail
    slack = n - 2 * edge - sum(e.length for e in seq) - gap * (len(seq) - 1) - sum(extra_tight)
    share = rng.dirichlet(np.ones(len(loose)))
    for _ in range(4):
        if slack < 0:
            return False
        extra = dict(zip(loose, (int(s) for s in share * slack), strict=True))
        t = edge + extra[0]
        starts = []
        for i, e in enumerate(seq):
            if i:
                t += gap + extra_tight[i] + extra.get(i, 0)
            t = _push(t, e.length)
            starts.append(t)
            t += e.length
        over = t - (n - edge)
        if over <= 0:
            for e, s in zip(seq, starts, strict=True):
                e.start = s
            return True
        slack -= over + 1
    return False


def _compose(
    rng: np.random.Generator, sources: SourceSplit, blocks: list[list[_Ev]], protected: set[str]
) -> tuple[int, list[_Ev]] | None:
    """Blocks (a block keeps its order) plus fillers, shuffled and laid out on a clip of 10-30 s."""
    need = sum(e.length / _SR + _GAP for b in blocks for e in b) + 2 * _EDGE
    lo = max(_MIN_S, need + 1.5)
    if lo > _MAX_S:
        return None
    seconds = _tenths(rng, lo, _MAX_S)
    pool = [k for k in _UNIQUE_POOL if k not in protected]
    target = float(rng.uniform(0.45, 0.7)) * seconds
    fillers: list[list[_Ev]] = []
    while need < target and len(fillers) < 20:
        ev = _event(rng, pool[int(rng.integers(len(pool)))], sources)
        need += ev.length / _SR + _GAP
        fillers.append([ev])
    while True:
        order = [*blocks, *fillers]
        seq = [e for i in rng.permutation(len(order)) for e in order[int(i)]]
        n = round(seconds * _SR)
        if _layout(rng, seq, n):
            return n, seq
        if fillers:
            fillers.pop()
        elif seconds < _MAX_S:
            seconds = min(_MAX_S, seconds + 1.0)
        else:
            return None


def _base_blocks(
    rng: np.random.Generator, sources: SourceSplit, category: str
) -> tuple[list[list[_Ev]], set[str], dict[str, Any]]:
    """What the scene for `category` holds besides fillers: (blocks, kinds fillers must not add, meta)."""
    blocks: list[list[_Ev]] = []
    meta: dict[str, Any] = {}
    # Beeps: one of each pitch word (two of different words in the already crowded identify scene); for
    # pitch also a copy of one of them (the same seed: the identical tone), so "same" can be asked.
    if category == "identify":
        words = [PITCH_WORDS[int(i)] for i in rng.choice(3, 2, replace=False)]
    else:
        words = [PITCH_WORDS[int(i)] for i in rng.permutation(3)]
    beeps = [_synthetic(rng, "beep", pitch=w) for w in words]
    if category == "pitch":
        twin = beeps[int(rng.integers(3))]
        beeps.append(_synthetic(rng, "beep", seconds=twin.length / _SR, pitch=twin.params["pitch"], seed=twin.seed))
    blocks += [[b] for b in beeps]
    # Chords of duration-choice lengths: two different ones (one in the identify scene), or one of each
    # length for duration. More than one of each thing gives a thread's follow-ups something new to ask.
    k = {"duration": 4, "identify": 1}.get(category, 2)
    for i in rng.permutation(len(DURATIONS))[:k]:
        blocks.append([_synthetic(rng, "chord", seconds=DURATIONS[int(i)] + float(rng.uniform(-0.05, 0.05)))])
    protected = {"beep", "chord"}
    count_kind = None
    if category == "count":
        count_kind = COUNTABLE[int(rng.integers(len(COUNTABLE)))]
        meta["count_kind"] = count_kind
        protected.add(count_kind)
    # Kinds heard exactly once.
    n_unique = 5 if category in ("order", "locate") else 3
    pool = [k for k in _UNIQUE_POOL if k != count_kind]
    uniques = [pool[int(i)] for i in rng.choice(len(pool), n_unique, replace=False)]
    protected.update(uniques)
    blocks += [[_event(rng, k, sources)] for k in uniques]
    if category == "count":
        assert count_kind is not None
        run = [_event(rng, count_kind, sources) for _ in range(5)]
        others = [k for k in _UNIQUE_POOL if k not in protected]
        for _ in range(int(rng.integers(0, 3))):  # a few other sounds inside the run
            run.insert(int(rng.integers(1, len(run))), _event(rng, others[int(rng.integers(len(others)))], sources))
        for e in run[1:]:
            e.tight = True
        blocks.append(run)
        if count_kind != "beep":
            blocks += [[_event(rng, count_kind, sources)] for _ in range(int(rng.integers(1, 3)))]
    if category == "identify":
        present = {e.kind for b in blocks for e in b}
        blocks += [[_event(rng, k, sources)] for k in KINDS if k not in present]
    return blocks, protected, meta


def _background(rng: np.random.Generator, sources: SourceSplit, n: int) -> tuple[str, str, _F64]:
    if rng.random() < 0.5:
        colours = effects.NOISE_COLOURS[sources]
        colour = colours[int(rng.integers(len(colours)))]
        return f"{colour} noise", "noise", effects.noise(rng, colour, n)
    beds = effects.BEDS[sources]
    name = beds[int(rng.integers(len(beds)))]
    return name, "ambience", effects.bed_track(rng, name, n)


def make_scene(rng: np.random.Generator, sources: SourceSplit, category: str) -> Scene:
    """One clip for `category` (see the module docstring), from `sources`' recordings, beds and SNRs."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if sources not in ("train", "heldout"):
        raise ValueError(f"sources must be 'train' or 'heldout', not {sources!r}")
    for _ in range(200):
        blocks, protected, meta = _base_blocks(rng, sources, category)
        composed = _compose(rng, sources, blocks, protected)
        if composed is None:
            continue
        n, seq = composed
        events = [e.record() for e in seq]
        view = _View(events, n / _SR, meta.get("count_kind", "beep"))
        if _askable(view, category):
            return _mix(rng, sources, category, n, seq, events, meta)
    raise RuntimeError(f"could not compose a {category} scene")  # pragma: no cover - never seen


def _mix(
    rng: np.random.Generator,
    sources: SourceSplit,
    category: str,
    n: int,
    seq: list[_Ev],
    events: list[dict[str, Any]],
    meta: dict[str, Any],
) -> Scene:
    fg = np.zeros(n)
    active = np.zeros(n, dtype=bool)
    for e in seq:
        place(fg, e.wav, e.start / _SR, e.gain)  # type: ignore[arg-type]
        active[e.start : e.start + e.length] |= e.active
    bed, bed_kind, bg = _background(rng, sources, n)
    snr_db = round(float(rng.uniform(*effects.SNR_DB[sources])), 2)
    mixed = mix_at_snr(fg, bg, snr_db, active)
    peak = float(np.max(np.abs(mixed))) or 1.0
    audio = peak_normalise(mixed)
    meta = {
        "sources": sources,
        "category": category,
        "package": effects.PACKAGE,
        "recordings": sorted({e.file for e in seq if e.file}),
        "bed": bed,
        "bed_kind": bed_kind,
        "snr_db": snr_db,
        "mix_scale": 0.9 / peak,  # isolate() renders at the mix's level
        **meta,
    }
    return Scene(DOMAIN, audio, events, meta)


def isolate(scene: Scene, events: list[dict[str, Any]]) -> Waveform:
    """Only `events` (entries of `scene.events`), re-rendered from their sources at the level they have in
    the mix, with no background: what a ground-truth check listens to."""
    track = np.zeros(len(scene.audio))
    for rec in events:
        place(track, _render_record(rec), rec["onset"], rec["gain"])  # type: ignore[arg-type]
    return (track * float(scene.meta["mix_scale"])).astype(np.float32)


# ------------------------------------------------------------------------------- what a scene can ask


@dataclass
class _View:
    """A scene's events as the question builders see them."""

    events: list[dict[str, Any]]
    duration: float
    count_kind: str
    _spots: dict[int, list[float]] = field(default_factory=dict, repr=False)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    def uniques(self) -> list[dict[str, Any]]:
        counts = Counter(e["kind"] for e in self.events)
        return [e for e in self.events if counts[e["kind"]] == 1]

    def cuts(self, lo: float, hi: float) -> list[float]:
        """Where a question window may end in [lo, hi]: on the 0.5 s grid if it can, else the 0.1 s grid,
        inside the clip and at least `_CUT` from every event."""
        for step in (5, 1):
            pts = [
                k / 10
                for k in range(math.ceil(max(lo, 0.0) * 10 - 1e-9), math.floor(min(hi, self.duration) * 10 + 1e-9) + 1)
                if k % step == 0 and not any(e["onset"] - _CUT < k / 10 < e["offset"] + _CUT for e in self.events)
            ]
            if pts:
                return pts
        return []

    def spots(self, e: dict[str, Any]) -> list[float]:
        """Times T (0.1 s grid) inside event `e` whose listen T±0.5 s holds no other event."""
        if id(e) in self._spots:
            return self._spots[id(e)]
        lo, hi = math.ceil((e["onset"] + 0.02) * 10), math.floor((e["offset"] - 0.02) * 10)
        out = []
        for k in range(lo, hi + 1):
            t = k / 10
            if not any(o is not e and o["onset"] < t + 0.5 and o["offset"] > t - 0.5 for o in self.events):
                out.append(t)
        self._spots[id(e)] = out
        return out


def _count_windows(view: _View, n: int) -> list[tuple[list[float], list[float]]]:
    """(start cuts, end cuts) of windows holding exactly `n` consecutive events of the count kind."""
    ks = view.of(view.count_kind)
    out = []
    for i in range(len(ks) - n + 1):
        first, last = ks[i], ks[i + n - 1]
        a_lo = max(ks[i - 1]["offset"] + _CUT if i else 0.0, first["onset"] - _REACH)
        b_hi = min(ks[i + n]["onset"] - _CUT if i + n < len(ks) else view.duration, last["offset"] + _REACH)
        starts, ends = view.cuts(a_lo, first["onset"] - _CUT), view.cuts(last["offset"] + _CUT, b_hi)
        if starts and ends:
            out.append((starts, ends))
    return out


def _pitch_pairs(view: _View, answer: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Ordered beep pairs (first asked about, compared with) whose answer is `answer`, with spots >= 1.6 s apart."""
    beeps = [b for b in view.of("beep") if view.spots(b)]
    out = []
    for a in beeps:
        for b in beeps:
            if a is b:
                continue
            wa, wb = PITCH_WORDS.index(a["pitch"]), PITCH_WORDS.index(b["pitch"])
            if a["freq"] == b["freq"]:
                got = "same"
            elif wa != wb:
                got = "higher" if wa > wb else "lower"
            else:
                continue  # same word, different tone: never asked
            sa, sb = view.spots(a), view.spots(b)
            if got == answer and max(abs(max(sb) - min(sa)), abs(max(sa) - min(sb))) >= 1.6:
                out.append((a, b))
    return out


def _slot_of(e: dict[str, Any], width: int) -> int | None:
    s = int(e["onset"] // width)
    if s * width + _MARGIN <= e["onset"] and e["offset"] <= (s + 1) * width - _MARGIN:
        return s
    return None


def _locate_options(view: _View, rank: int | None) -> list[tuple[dict[str, Any], int]]:
    """(event, range width) pairs where the event's range can have `rank` (any rank: None) among four."""
    out = []
    for e in view.uniques():
        for w in _WIDTHS:
            m = int(view.duration // w)
            s = _slot_of(e, w)
            if m < 4 or s is None or s >= m:
                continue
            ranks = [r for r in range(4) if s >= r and m - 1 - s >= 3 - r]
            if (rank is None and ranks) or rank in ranks:
                out.append((e, w))
    return out


def _duration_options(view: _View, value: float | None) -> list[tuple[dict[str, Any], list[float], list[float]]]:
    """(chord, start cuts, end cuts): spans holding that chord whole and no other chord."""
    chords = view.of("chord")
    out = []
    for i, c in enumerate(chords):
        length = c["offset"] - c["onset"]
        if value is not None and abs(length - value) > 0.06:
            continue
        a_lo = max(chords[i - 1]["offset"] + _CUT if i else 0.0, c["onset"] - _REACH)
        b_hi = min(chords[i + 1]["onset"] - _CUT if i + 1 < len(chords) else view.duration, c["offset"] + _REACH)
        starts, ends = view.cuts(a_lo, c["onset"] - _CUT), view.cuts(c["offset"] + _CUT, b_hi)
        if starts and ends:
            out.append((c, starts, ends))
    return out


def _askable(view: _View, category: str) -> bool:
    """Every category can be asked; `category` with every balanced answer."""
    full = {
        "count": lambda: all(_count_windows(view, n) for n in range(1, 6)),
        "identify": lambda: all(any(view.spots(e) for e in view.of(k)) for k in KINDS),
        "pitch": lambda: all(_pitch_pairs(view, a) for a in PITCH_ANSWERS),
        "order": lambda: (
            len(view.uniques()) >= 4
            and any(_order_listens(view, [view.uniques()[i] for i in t])[1] for t in _triples(len(view.uniques())))
        ),
        "locate": lambda: all(_locate_options(view, r) for r in range(4)),
        "duration": lambda: all(_duration_options(view, v) for v in DURATIONS),
    }
    some = {
        "count": lambda: bool(_count_windows(view, 1)),
        "identify": lambda: any(view.spots(e) for e in view.events),
        "pitch": lambda: any(_pitch_pairs(view, a) for a in PITCH_ANSWERS),
        "order": lambda: len(view.uniques()) >= 3,
        "locate": lambda: bool(_locate_options(view, None)),
        "duration": lambda: bool(_duration_options(view, None)),
    }
    return bool(full[category]()) and all(bool(some[c]()) for c in CATEGORIES if c != category)


# ---------------------------------------------------------------------------------------------- asking


@dataclass
class _Choices:
    strings: list[str]
    format: str
    pos: int  # where the answer is
    values: list[Any]  # what each string says, in the listed order


@dataclass
class _Ask:
    rng: np.random.Generator
    view: _View
    category: str
    phrasing: PhrasingSplit
    open_question: bool
    slot: int | None
    seed: int
    follow_up: bool

    def pick(self, combos: Sequence[Any]) -> Any:
        if self.slot is None:
            return combos[int(self.rng.integers(len(combos)))]
        return balanced((self.seed, DOMAIN, self.category), self.slot, combos)

    def one(self, items: Sequence[Any]) -> Any:
        return items[int(self.rng.integers(len(items)))]

    def template(self) -> tuple[str, str]:
        return BANKS[self.category].pick(self.rng, self.phrasing, self.follow_up)

    def choices(self, values: list[Any], kind: str, pos: int) -> _Choices:
        """`values[0]` is the answer: it goes to `pos`, the rest in random order, written in one format."""
        rest = [values[1 + int(i)] for i in self.rng.permutation(len(values) - 1)]
        ordered = [*rest[:pos], values[0], *rest[pos:]]
        strings, fid = phrasing.choice_strings(ordered, kind, self.rng, self.phrasing)
        return _Choices(strings, fid, pos, ordered)

    def variant(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]


def _format_id(table: Any, rng: np.random.Generator, split: PhrasingSplit) -> str:
    """`phrasing.pick_format` for a time or span table (its parameter type is invariant in the writer)."""
    return phrasing.pick_format(table, rng, split)


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _trace(q: _Ask, lead: str, steps: Sequence[tuple[float, float, str]], answer: str, close: str = "") -> str:
    body = " ".join(f"{phrasing.listen(a, b, q.rng)}{obs}" for a, b, obs in steps)
    return f"<think>{lead} {body}{close}</think><answer>{answer}</answer>"


def _question(
    q: _Ask,
    template: tuple[str, str],
    text: str,
    answer_value: str,
    answer_kind: str,
    choice: _Choices | None,
    evidence: list[list[float]],
    trace_parts: tuple[str, Sequence[tuple[float, float, str]], str],
    formats: list[str],
) -> Question:
    if q.open_question or choice is None:
        choices, fid, answer = [], None, answer_value
    else:
        choices, fid = choice.strings, choice.format
        answer, answer_kind = choices[choice.pos], "choice"
    lead, steps, close = trace_parts
    return Question(
        category=q.category,
        question=text,
        template=template[0],
        choices=choices,
        choice_format=fid,
        answer=answer,
        answer_kind=answer_kind,  # type: ignore[arg-type]
        evidence=evidence,
        trace=_trace(q, lead, steps, answer, close),
        formats=formats,
    )


def _clamp(view: _View, a: float, b: float) -> tuple[float, float]:
    return max(0.0, round(a, 1)), min(round(view.duration, 1), round(b, 1))


def _ask_count(q: _Ask) -> Question:
    kind = q.view.count_kind
    one, many = _NOUNS[kind]
    n, pos = q.pick([(k, p) for k in range(1, 6) for p in range(4)])
    windows = _count_windows(q.view, n)
    if not windows and q.slot is None:
        n = q.one([k for k in range(1, 6) if _count_windows(q.view, k)])
        windows = _count_windows(q.view, n)
    if not windows:
        raise RuntimeError(f"no window holds {n} {many}")
    starts, ends = q.one(windows)
    a, b = q.one(starts), q.one(ends)
    fmt = _format_id(phrasing.SPAN_FORMATS, q.rng, q.phrasing)
    tpl = q.template()
    text = tpl[1].format(many=many, a_kind=_article(kind), span=phrasing.say_span(a, b, fmt))
    others = [k for k in range(1, 6) if k != n]
    others = [others[int(i)] for i in sorted(q.rng.choice(4, 3, replace=False))]
    choice = q.choices([n, *others], "count", pos)
    obs = (
        q.variant([f" there is 1 {one}.", f" it holds 1 {one}.", f" that is 1 {one}."])
        if n == 1
        else q.variant([f" there are {n} {many}.", f" it holds {n} {many}.", f" that is {n} {many}."])
    )
    lead = q.variant(
        [f"I count the {many} in the window.", f"I need the number of {many} in that window.", f"Counting the {many}."]
    )
    return _question(q, tpl, text, str(n), "number", choice, [[a, b]], (lead, [(a, b, obs)], ""), [fmt])


def _ask_identify(q: _Ask) -> Question:
    kind, pos = q.pick([(k, p) for k in KINDS for p in range(4)])
    cands = [e for e in q.view.of(kind) if q.view.spots(e)]
    if not cands and q.slot is None:
        cands = [e for e in q.view.events if q.view.spots(e)]
    if not cands:
        raise RuntimeError(f"no clear {kind} to ask about")
    ev = q.one(cands)
    kind = ev["kind"]
    t = q.one(q.view.spots(ev))
    a, b = _clamp(q.view, t - 0.5, t + 0.5)
    fmt = _format_id(phrasing.TIME_FORMATS, q.rng, q.phrasing)
    tpl = q.template()
    text = tpl[1].format(time=phrasing.say_time(t, fmt))
    others = [k for k in KINDS if k != kind]
    others = [others[int(i)] for i in sorted(q.rng.choice(len(others), 3, replace=False))]
    choice = q.choices([kind, *others], "word", pos)
    obs = q.variant([f" it is {_article(kind)}.", f" this is {_article(kind)}.", f" that is {_article(kind)}."])
    lead = q.variant([f"I check the sound at {t:.1f} s.", f"I listen around {t:.1f} s.", f"The sound at {t:.1f} s:"])
    return _question(q, tpl, text, kind, "word", choice, [[a, b]], (lead, [(a, b, obs)], ""), [fmt])


def _ask_pitch(q: _Ask) -> Question:
    answer, pos = q.pick([(v, p) for v in PITCH_ANSWERS for p in range(3)])
    pairs = _pitch_pairs(q.view, answer)
    if not pairs and q.slot is None:
        answer = q.one([v for v in PITCH_ANSWERS if _pitch_pairs(q.view, v)])
        pairs = _pitch_pairs(q.view, answer)
    if not pairs:
        raise RuntimeError(f"no beep pair whose answer is {answer}")
    ea, eb = q.one(pairs)
    spots = [(ta, tb) for ta in q.view.spots(ea) for tb in q.view.spots(eb) if abs(ta - tb) >= 1.6]
    t1, t2 = q.one(spots)
    fmt = _format_id(phrasing.TIME_FORMATS, q.rng, q.phrasing)
    tpl = q.template()
    text = tpl[1].format(t1=phrasing.say_time(t1, fmt), t2=phrasing.say_time(t2, fmt))
    choice = q.choices([answer, *(v for v in PITCH_ANSWERS if v != answer)], "label", pos)
    windows = [list(_clamp(q.view, t - 0.5, t + 0.5)) for t in (t1, t2)]
    w1, w2 = ea["pitch"], eb["pitch"]
    steps = [
        (a, b, q.variant([f" this beep is {w}.", f" the beep here is {w}.", f" it is a {w} beep."]))
        for (a, b), w in zip(windows, (w1, w2), strict=True)
    ]
    if answer == "same":
        close = q.variant([" Both are the same tone, so it is the same.", " The two tones match: the same."])
    else:
        close = q.variant(
            [
                f" {w1.capitalize()} is {answer} than {w2}, so the answer is {answer}.",
                f" {w1.capitalize()} against {w2}: {answer}.",
            ]
        )
    lead = q.variant(
        [f"I compare the beeps at {t1:.1f} s and {t2:.1f} s.", f"Two beeps to compare, at {t1:.1f} s and {t2:.1f} s."]
    )
    return _question(q, tpl, text, answer, "word", choice, windows, (lead, steps, close), [fmt])


def _heard(e: dict[str, Any], a: float, b: float) -> bool:
    """The rule scans use (`synth.kinds_heard`): half of the event, or 0.25 s of it, lies inside [a, b]."""
    inside = max(0.0, min(b, float(e["offset"])) - max(a, float(e["onset"])))
    return inside >= min(0.5 * (float(e["offset"]) - float(e["onset"])), 0.25)


def _scan_windows(view: _View) -> list[tuple[float, float]]:
    k, out = 0, []
    while k * _WINDOW < view.duration:
        out.append((k * _WINDOW, min((k + 1) * _WINDOW, round(view.duration, 1))))
        k += 1
    return out


def _check(kind: str, present: bool, style: int) -> str:
    """A scan step's check, kind first and verdict second (design §8), in one of three wordings."""
    verdict = "yes" if present else "no"
    return (f" {kind}? {verdict}.", f" {kind}: {verdict}.", f" {kind}? {'yes, here' if present else 'not here'}.")[
        style
    ]


def _order_listens(view: _View, trio: Sequence[dict[str, Any]]) -> tuple[list[tuple[float, float, list[bool]]], bool]:
    """The listens of an `order` trace for `trio` (any order) and whether the last one hears exactly one.

    10 s windows from 0 s until one hears any of the three; if it hears several, synth's zoom: its first
    half, then the first half of whichever part holds the first one (the first half again when several
    are heard, the next part when none is), until one is heard alone or the 6 listens are spent."""
    steps: list[tuple[float, float, list[bool]]] = []
    for a, b in _scan_windows(view):
        heard = [_heard(e, a, b) for e in trio]
        steps.append((a, b, heard))
        if not any(heard):
            continue
        za, zb = a, round((a + b) / 2, 1)
        while sum(heard) != 1 and len(steps) < 6:
            heard = [_heard(e, za, zb) for e in trio]
            steps.append((za, zb, heard))
            half = round((zb - za) / 2, 1)
            za, zb = (za, round(za + half, 1)) if any(heard) else (zb, round(zb + half, 1))
        return steps, sum(heard) == 1
    return steps, False  # pragma: no cover - every trio is heard by some window


def _ask_order(q: _Ask) -> Question:
    first_at, pos = q.pick([(i, p) for i in range(3) for p in range(3)])
    uniques = q.view.uniques()
    trios = [[uniques[i], uniques[j], uniques[k]] for i, j, k in _triples(len(uniques))]
    # Trios whose fixed-rule scan ends hearing the first one alone, so the trace decides from what it heard.
    resolved = [t for t in trios if _order_listens(q.view, t)[1]]
    trio = q.one(resolved or trios)
    first = trio[0]
    rest = [trio[1 + int(i)] for i in q.rng.permutation(2)]
    named = [*rest[:first_at], first, *rest[first_at:]]
    x, y, z = (e["kind"] for e in named)
    tpl = q.template()
    text = tpl[1].format(x=x, y=y, z=z)
    choice = q.choices([first["kind"], trio[1]["kind"], trio[2]["kind"]], "word", pos)
    style = int(q.rng.integers(3))
    won = q.variant([f" The {first['kind']} comes first.", f" So the {first['kind']} is first."])
    listens = _order_listens(q.view, named)[0]
    steps = [
        (a, b, "".join(_check(e["kind"], h, style) for e, h in zip(named, heard, strict=True)))
        for a, b, heard in listens
    ]
    steps[-1] = (steps[-1][0], steps[-1][1], steps[-1][2] + won)
    lead = q.variant(
        [
            f"I look for the {x}, the {y} and the {z} in 10-second windows.",
            f"I scan 10-second windows for the {x}, the {y} and the {z}.",
        ]
    )
    a, b = steps[-1][0], steps[-1][1]
    evidence = [[a, min(b, round(q.view.duration, 1))]]
    return _question(q, tpl, text, first["kind"], "word", choice, evidence, (lead, steps, ""), [])


def _triples(n: int) -> list[tuple[int, int, int]]:
    return [(i, j, k) for i in range(n) for j in range(i + 1, n) for k in range(j + 1, n)]


def _ask_locate(q: _Ask) -> Question:
    rank, pos = q.pick([(r, p) for r in range(4) for p in range(4)])
    options = _locate_options(q.view, rank)
    if not options and q.slot is None:
        options = _locate_options(q.view, None)
    if not options:
        raise RuntimeError(f"no event whose range has rank {rank}")
    ev, width = q.one(options)
    kind = ev["kind"]
    m, s = int(q.view.duration // width), _slot_of(ev, width)
    assert s is not None
    ranks = [r for r in range(4) if s >= r and m - 1 - s >= 3 - r]
    rank = rank if rank in ranks else q.one(ranks)
    before = sorted(int(i) for i in q.rng.choice(s, rank, replace=False)) if rank else []
    after = sorted(s + 1 + int(i) for i in q.rng.choice(m - 1 - s, 3 - rank, replace=False)) if rank < 3 else []
    tpl = q.template()
    text = tpl[1].format(kind=kind)
    style = int(q.rng.integers(3))
    if not q.open_question:
        ranges = [(float(k * width), float((k + 1) * width)) for k in (*before, s, *after)]
        answer_range = ranges[rank]
        choice = q.choices([answer_range, *(r for r in ranges if r != answer_range)], "span", pos)
        steps = [(a, b, _check(kind, (a, b) == answer_range, style)) for a, b in choice.values[: pos + 1]]
        lead = q.variant(
            [
                f"I look for the {kind} in the listed ranges, in order.",
                f"I check each listed range for the {kind}, in order.",
            ]
        )
        return _question(q, tpl, text, "", "span", choice, [list(answer_range)], (lead, steps, ""), [])
    # Open: scan 10 s windows, then zoom by halves; the answer is the event's extent.
    steps = []
    span = (0.0, 0.0)
    for a, b in _scan_windows(q.view):
        if ev["onset"] >= a and ev["offset"] <= b:
            steps.append((a, b, _check(kind, True, style)))
            span = (a, b)
            break
        steps.append((a, b, _check(kind, False, style)))
    final: tuple[float, float] | None = None  # a span holding it that the zoom has not listened to yet
    for _ in range(_ZOOM):
        a, b = span
        mid = round((a + b) / 2, 1)
        if ev["offset"] <= mid:  # whole in the first half
            steps.append((a, mid, _check(kind, True, style)))
            span, final = (a, mid), None
        elif ev["onset"] >= mid:  # whole in the second half
            steps.append((a, mid, _check(kind, False, style)))
            span = final = (mid, b)
        elif _heard(ev, a, mid):  # across the middle, heard in the first half: stop (and hear the span whole)
            steps.append((a, mid, f" {kind}? partly; it runs on past {mid:.1f} s."))
            break
        else:  # across the middle, barely inside the first half: it is heard in the second
            steps.append((a, mid, _check(kind, False, style)))
            final = (mid, b)
            break
    if final is not None:  # still within 6 listens: 3 windows, 2 zooms, this one
        steps.append((final[0], final[1], _check(kind, True, style)))
    on, off = round(ev["onset"], 1), round(ev["offset"], 1)
    off = max(off, round(on + 0.1, 1))
    answer = f"{on:.1f}-{off:.1f} s"
    close = q.variant(
        [f" It sounds from {on:.1f} to {off:.1f} s.", f" The {kind} runs from {on:.1f} s to {off:.1f} s."]
    )
    lead = q.variant([f"I look for the {kind} in 10-second windows.", f"I scan 10-second windows for the {kind}."])
    return _question(q, tpl, text, answer, "span", None, [list(span)], (lead, steps, close), [])


def _ask_duration(q: _Ask) -> Question:
    value, pos = q.pick([(v, p) for v in DURATIONS for p in range(4)])
    options = _duration_options(q.view, value)
    if not options and q.slot is None:
        options = _duration_options(q.view, None)
    if not options:
        raise RuntimeError(f"no chord of {value} s to ask about")
    chord, starts, ends = q.one(options)
    length = chord["offset"] - chord["onset"]
    value = min(DURATIONS, key=lambda v: abs(v - length))
    a, b = q.one(starts), q.one(ends)
    fmt = _format_id(phrasing.SPAN_FORMATS, q.rng, q.phrasing)
    tpl = q.template()
    text = tpl[1].format(span=phrasing.say_span(a, b, fmt))
    choice = q.choices([value, *(v for v in DURATIONS if v != value)], "duration", pos)
    said = f"{round(length, 1):.1f}" if q.open_question else f"{value:.1f}"
    obs = q.variant(
        [
            f" the chord lasts about {said} s.",
            f" chord? yes; it lasts about {said} s.",
            f" it is a chord of about {said} s.",
        ]
    )
    lead = q.variant(["I time the chord in the window.", "I measure how long the chord in that window lasts."])
    return _question(q, tpl, text, f"{said} s", "duration", choice, [[a, b]], (lead, [(a, b, obs)], ""), [fmt])


_ASKERS = {
    "count": _ask_count,
    "identify": _ask_identify,
    "pitch": _ask_pitch,
    "order": _ask_order,
    "locate": _ask_locate,
    "duration": _ask_duration,
}


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
    """One question of `category` about `scene` (any sound scene; the one made for `category` supports
    every balanced answer). `slot` draws the answer and its position from `core.balanced` blocks."""
    if category not in _ASKERS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    view = _View(scene.events, scene.duration, scene.meta.get("count_kind", "beep"))
    return _ASKERS[category](_Ask(rng, view, category, phrasing, open_question, slot, seed, follow_up))
