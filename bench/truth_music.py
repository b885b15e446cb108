"""The music suite's ground truth checked against the audio (issue 15): independent labellers on isolated parts.

    .venv/bin/python bench/truth_music.py --n 30 --seed 0 [--sources train heldout] [--mix]

For each source split, N scenes per checked category are made (`music.make_scene`) and asked with balanced
slots (`music.ask`); the part the question is about is re-rendered alone with `music.isolate` (the same
cached notes and hits, no other part, no bed) and an independent labeller reads it:

- ``drum_count``: every hit of the counted drum in the whole clip is isolated; librosa's onset detector
  (spectral flux, `librosa.onset.onset_detect`) runs on it, and the onsets inside the question's window
  [A, B] are counted. Agreement: the count equals the answer.
- ``note_count``: the counted instrument's whole part is isolated and cut to [A, B]; librosa's pYIN tracks
  its pitch (16 ms hop; frames 40 dB below the loudest count as unvoiced); the voiced frames are rounded to
  semitones, median-smoothed and split into runs of one pitch (runs under 64 ms dropped, neighbouring runs of
  the same pitch merged: the suite's melodies never repeat a note); the runs are counted. Agreement: runs ==
  notes. Also reported: the runs' pitches equal the events' (within a semitone, or an octave off).
- ``melody_direction``: the same note runs on the isolated phrase in [A, B]; the sign of the summed steps
  between successive runs, each folded into half an octave (so a note tracked an octave off, as pYIN does on
  church organ, does not flip it). Agreement: the sign matches rising / falling.

With `--mix` the same labellers also read the clip itself (the full mix, with the other parts, the drums
and the bed) cut to [A, B], for pitch (note count and direction): how audible the answer is in the mix.

Prints one JSON object: per source split and category, n, agreements and the rate; and which labeller ran.
The labellers are checks, never labels: nothing here feeds the suite.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from echo_agent.training.suite import music
from echo_agent.training.suite.core import SAMPLE_RATE, Question, Scene

CHECKED = ("drum_count", "note_count", "melody_direction")
_HOP = 256  # 16 ms
_FRAME = 2048  # 128 ms: shorter frames lose low clarinet and cello notes
_MIN_RUN = 4  # frames: a pitch run shorter than 64 ms is noise, not a note
_GATE_DB = 40.0  # frames this far below the loudest are unvoiced (pYIN calls digital silence voiced)


def _window(q: Question) -> tuple[float, float]:
    """The question's span [A, B]: the evidence is that span, or its two halves."""
    return min(e[0] for e in q.evidence), max(e[1] for e in q.evidence)


def _slice(x: npt.NDArray[np.float32], a: float, b: float) -> npt.NDArray[np.float64]:
    return np.asarray(x[round(a * SAMPLE_RATE) : round(b * SAMPLE_RATE)], dtype=np.float64)


def onsets_in(y: npt.NDArray[np.float32], a: float, b: float) -> int:
    """Onsets librosa detects in the isolated track `y`, counted inside [a, b]."""
    import librosa

    times = librosa.onset.onset_detect(
        y=np.asarray(y, dtype=np.float64), sr=SAMPLE_RATE, units="time", hop_length=_HOP, backtrack=False
    )
    return int(sum(a <= t <= b for t in times))


def pitch_track(y: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(frame times, MIDI pitch or NaN where unvoiced) from pYIN over 60-2100 Hz (every suite instrument)."""
    import librosa

    f0, voiced, _ = librosa.pyin(y, fmin=60.0, fmax=2100.0, sr=SAMPLE_RATE, frame_length=_FRAME, hop_length=_HOP)
    rms = librosa.feature.rms(y=y, frame_length=_FRAME, hop_length=_HOP)[0][: len(f0)]
    loud = 20 * np.log10(rms + 1e-12) > 20 * np.log10(float(rms.max()) + 1e-12) - _GATE_DB
    midi = np.where(voiced & loud, librosa.hz_to_midi(np.nan_to_num(f0, nan=1.0)), np.nan)
    return librosa.frames_to_time(np.arange(len(midi)), sr=SAMPLE_RATE, hop_length=_HOP), midi


def note_runs(midi: npt.NDArray[np.float64]) -> list[int]:
    """The pitches of the notes in a pitch track: runs of one rounded, median-smoothed pitch."""
    voiced = ~np.isnan(midi)
    idx = np.flatnonzero(voiced)
    if not len(idx):
        return []
    p = np.round(midi[idx]).astype(int)
    smooth = np.array([int(np.median(p[max(0, i - 2) : i + 3])) for i in range(len(p))])
    runs: list[tuple[int, int]] = []  # (pitch, frames)
    for v in smooth:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((int(v), 1))
    out: list[int] = []
    for v, k in runs:
        if k >= _MIN_RUN and (not out or out[-1] != v):
            out.append(v)
    return out


def _pitches_match(got: Sequence[int], want: Sequence[int]) -> bool:
    return len(got) == len(want) and all(
        min(abs(g - w), abs(abs(g - w) - 12)) <= 1 for g, w in zip(got, want, strict=True)
    )


def direction(runs: Sequence[int]) -> int:
    """+1 rising, -1 falling, 0 undecided: the sign of the summed steps between successive notes, each folded
    into [-6, 6) semitones, so a note tracked an octave off (pYIN on organ and clarinet) does not flip it."""
    total = sum((b - a + 6) % 12 - 6 for a, b in itertools.pairwise(runs))
    return int(np.sign(total))


def _item(rng: np.random.Generator, sources: str, category: str, slot: int, seed: int) -> tuple[Scene, Question]:
    scene = music.make_scene(rng, sources, category)
    q = music.ask(rng, scene, category, phrasing="train", open_question=True, slot=slot, seed=seed)
    return scene, q


def _named(text: str, names: Sequence[str]) -> list[str]:
    """The names that occur in `text` as words (the question names exactly one instrument or drum)."""
    return [x for x in names if re.search(rf"(?<![\w-]){re.escape(x)}(?![\w-])", text, re.IGNORECASE)]


def check(category: str, scene: Scene, q: Question, mix: bool) -> dict[str, Any]:
    a, b = _window(q)
    notes = [e for e in scene.events if e["kind"] == "note"]
    if category == "drum_count":
        (drum,) = _named(q.question, ["kick", "snare", "hi-hat", "crash"])
        y = music.isolate(scene, [e for e in scene.events if e["kind"] == "drum" and e["drum"] == drum])
        got = onsets_in(y, a, b)
        return {"agree": got == int(q.answer), "got": got, "want": int(q.answer), "drum": drum}
    if category == "note_count":
        (inst,) = _named(q.question, scene.meta["instruments"])
        part = [e for e in notes if e["instrument"] == inst]
        want = [e["pitch"] for e in part if a <= e["onset"] <= b]
        runs = note_runs(pitch_track(_slice(music.isolate(scene, part), a, b))[1])
        out: dict[str, Any] = {
            "agree": len(runs) == int(q.answer),
            "pitches": _pitches_match(runs, want),
            "got": len(runs),
            "want": int(q.answer),
            "instrument": inst,
        }
        if mix:
            out["mix_agree"] = len(note_runs(pitch_track(_slice(scene.audio, a, b))[1])) == int(q.answer)
        return out
    # melody_direction: the phrase inside [A, B] (the window holds exactly one)
    phrase = [e for e in notes if a <= e["onset"] <= b]
    sign = 1 if q.answer == "rising" else -1
    runs = note_runs(pitch_track(_slice(music.isolate(scene, phrase), a, b))[1])
    out = {"agree": direction(runs) == sign, "runs": runs, "want": q.answer}
    if mix:
        out["mix_agree"] = direction(note_runs(pitch_track(_slice(scene.audio, a, b))[1])) == sign
    return out


def run(n: int, seed: int, sources: Sequence[str], mix: bool = False) -> dict[str, Any]:
    version = importlib.metadata.version("librosa")
    report: dict[str, Any] = {
        "labellers": {
            "drum_count": f"librosa {version} onset_detect on the isolated drum",
            "note_count": f"librosa {version} pyin note runs on the isolated part",
            "melody_direction": f"librosa {version} pyin note runs, folded steps, on the isolated phrase",
        },
        "n_per_category": n,
        "seed": seed,
        "results": {},
    }
    t0 = time.perf_counter()
    for split in sources:
        for ci, category in enumerate(CHECKED):
            rows = []
            for i in range(n):
                rng = np.random.default_rng(np.random.SeedSequence([seed, ci, i, int(split == "heldout")]))
                scene, q = _item(rng, split, category, i, seed)
                rows.append(check(category, scene, q, mix))
            agree = sum(r["agree"] for r in rows)
            res: dict[str, Any] = {"n": n, "agree": agree, "rate": round(agree / n, 3)}
            if category == "note_count":
                res["pitch_rate"] = round(sum(r["pitches"] for r in rows) / n, 3)
            if mix and category != "drum_count":
                res["mix_rate"] = round(sum(r["mix_agree"] for r in rows) / n, 3)
            res["misses"] = [r for r in rows if not r["agree"]][:5]
            report["results"][f"{split}/{category}"] = res
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=30, help="items per category and source split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", nargs="+", default=["train", "heldout"], choices=("train", "heldout"))
    ap.add_argument("--mix", action="store_true", help="also run the pitch labellers on the full mix")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.n, args.seed, args.sources, args.mix), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
