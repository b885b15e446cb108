"""Ground truth of the sound domain checked against the audio, by labellers that read only samples.

    .venv/bin/python bench/truth_sound.py [--n 20] [--seed 0] [--json]

For each source split (train, heldout) and each of the six categories, N scenes are made, a balanced
multiple-choice question is asked (slot 0..N-1), the events the question is about are re-rendered alone
with `sound.isolate` (no background), and an independent labeller that sees only samples gives its own
answer, compared with the item's:

- `count`: an energy-onset count (10 ms RMS envelope; an onset is a rise above -20 dB of the slice's
  peak after at least 50 ms below -30 dB) on the question's window of the isolated count-kind events.
- `identify` (recorded kinds): the nearest template among *all* the effect recordings of the package
  (both source splits) by normalised cross-correlation over every lag, on the isolated T±0.5 s slice of
  every event of the scene (so a neighbour reaching into the slice would spoil the match);
  `identify_mix` does the same with log-mel cosine similarity on the *mixed* slice (background and all),
  a rough check that the effect stays recognisable at the drawn SNR.
- `duration`: the chord's energy-envelope length (5 ms frames above -20 dB of its peak) on the isolated
  span, nearest of the four choices; the mean absolute error is reported too.
- `pitch`: the dominant frequency (Hann-windowed FFT peak) of each isolated beep window: higher / lower
  when they differ by more than 3 %, else the same.
- `order`: the first energy onset of each of the three named kinds, isolated kind by kind.
- `locate`: at least 95 % of the isolated kind's energy lies inside the answer's range.

The labellers are checks, never labels: the items come from the scene's timeline.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from echo_agent.matching import normalise, parse_number, parse_times
from echo_agent.training.suite import effects, sound
from echo_agent.training.suite.core import SAMPLE_RATE, Question, Scene, SourceSplit

SR = SAMPLE_RATE
F64 = npt.NDArray[np.float64]


def _slice(x: npt.NDArray[Any], a: float, b: float) -> F64:
    return np.asarray(x[round(a * SR) : round(b * SR)], dtype=np.float64)


def _envelope_db(x: F64, frame: int) -> F64:
    n = len(x) // frame
    e = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1)) + 1e-12
    return np.asarray(20 * np.log10(e / e.max()), dtype=np.float64)


def onset_times(x: F64, rise_db: float = -20.0, fall_db: float = -30.0, rest_s: float = 0.05) -> list[float]:
    """Onsets (s) of `x`: its 10 ms envelope rising above `rise_db` (re the peak) after `rest_s` below `fall_db`."""
    frame = SR // 100
    if len(x) < frame or not np.any(x):
        return []
    db = _envelope_db(x, frame)
    out, armed, quiet = [], True, 0
    for i, d in enumerate(db):
        if armed and d > rise_db:
            out.append(i * frame / SR)
            armed, quiet = False, 0
        elif not armed:
            quiet = quiet + 1 if d < fall_db else 0
            if quiet * frame >= rest_s * SR:
                armed = True
    return out


def envelope_length(x: F64, floor_db: float = -20.0) -> float:
    frame = SR // 200
    loud = np.flatnonzero(_envelope_db(x, frame) >= floor_db)
    return float((loud[-1] + 1 - loud[0]) * frame / SR) if len(loud) else 0.0


def dominant_freq(x: F64) -> float:
    n = 1 << 16
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    return float(np.argmax(spec) * SR / n)


# ------------------------------------------------------------------------------------- template matchers


@functools.lru_cache(maxsize=1)
def _templates() -> list[tuple[str, str, F64]]:
    """(kind, file, samples) for every recording of every effect kind, both source splits."""
    return [
        (kind, f, effects.recording(f).astype(np.float64))
        for kind, e in effects.EFFECTS.items()
        for f in (*e.train, *e.heldout)
    ]


def ncc_best(s: F64, t: F64, min_overlap: int = SR // 10) -> float:
    """The highest normalised cross-correlation of `s` and `t` over every lag with enough overlap."""
    n = 1 << (len(s) + len(t)).bit_length()
    corr = np.fft.irfft(np.fft.rfft(s, n) * np.conj(np.fft.rfft(t, n)), n)
    lags = np.arange(-(len(t) - 1), len(s))
    dots = corr[lags % n]
    cs, ct = np.concatenate([[0.0], np.cumsum(s**2)]), np.concatenate([[0.0], np.cumsum(t**2)])
    s_lo, s_hi = np.maximum(lags, 0), np.minimum(len(s), lags + len(t))
    t_lo, t_hi = s_lo - lags, s_hi - lags
    ok = s_hi - s_lo >= min(min_overlap, len(s), len(t))
    den = np.sqrt((cs[s_hi] - cs[s_lo]) * (ct[t_hi] - ct[t_lo])) + 1e-12
    return float(np.max(np.where(ok, dots / den, -1.0)))


def nearest_by_ncc(s: F64) -> tuple[str, float]:
    best = max(((ncc_best(s, t), kind) for kind, _, t in _templates()), key=lambda p: p[0])
    return best[1], best[0]


@functools.lru_cache(maxsize=1)
def _mel_bank(n_fft: int = 512, bands: int = 40) -> F64:
    def mel(f: F64 | float) -> Any:
        return 2595 * np.log10(1 + np.asarray(f) / 700)

    edges = 700 * (10 ** (np.linspace(0, mel(SR / 2), bands + 2) / 2595) - 1)
    freqs = np.fft.rfftfreq(n_fft, 1 / SR)
    bank = np.zeros((bands, len(freqs)))
    for i in range(bands):
        lo, mid, hi = edges[i : i + 3]
        bank[i] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return bank


def mel_power(x: F64, hop: int = 160, n_fft: int = 512) -> F64:
    """Mel power, (frames, 40)."""
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    idx = np.arange(0, len(x) - n_fft + 1, hop)[:, None] + np.arange(n_fft)[None, :]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft), axis=1)) ** 2
    return np.asarray(spec @ _mel_bank(n_fft).T)


@functools.lru_cache(maxsize=1)
def _mel_templates() -> list[tuple[str, F64]]:
    return [(kind, np.cbrt(mel_power(t))) for kind, _, t in _templates()]


def noise_floor(clip: F64) -> F64:
    """Per-band background power of a mixed clip: the 30th percentile over its frames (events fill about half)."""
    return np.asarray(np.percentile(mel_power(clip), 30, axis=0))


def nearest_by_mel(s: F64, floor: F64, min_overlap: int = 10) -> str:
    """The kind whose template best matches the slice (cosine of cube-root mel power, best lag), after
    subtracting the background's per-band floor from the slice."""
    ms = np.cbrt(np.maximum(mel_power(s) - 2.0 * floor, 0.0))
    best, best_kind = -2.0, ""
    for kind, mt in _mel_templates():
        for lag in range(-(len(mt) - min_overlap), len(ms) - min_overlap + 1):
            s_lo, s_hi = max(0, lag), min(len(ms), lag + len(mt))
            if s_hi - s_lo < min(min_overlap, len(mt)):
                continue
            a, b = ms[s_lo:s_hi].ravel(), mt[s_lo - lag : s_hi - lag].ravel()
            score = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
            if score > best:
                best, best_kind = score, kind
    return best_kind


# ------------------------------------------------------------------------------------------- the checks


def _kind_of(answer: str) -> str:
    return next(k for k in sorted(sound.KINDS, key=len, reverse=True) if normalise(answer) == normalise(k))


def _events(scene: Scene, kind: str) -> list[dict[str, Any]]:
    return [e for e in scene.events if e["kind"] == kind]


def check_count(scene: Scene, q: Question) -> dict[str, Any]:
    a, b = q.evidence[0]
    iso = sound.isolate(scene, _events(scene, scene.meta.get("count_kind", "beep")))
    heard = len(onset_times(_slice(iso, a, b)))
    return {"agree": heard == parse_number(q.answer)}


def check_identify(scene: Scene, q: Question) -> dict[str, Any] | None:
    kind = _kind_of(q.answer)
    if kind not in effects.EFFECTS:
        return None
    a, b = q.evidence[0]
    iso = _slice(sound.isolate(scene, scene.events), a, b)
    got, score = nearest_by_ncc(iso)
    audio = scene.audio.astype(np.float64)
    mixed = nearest_by_mel(_slice(audio, a, b), noise_floor(audio))
    return {"agree": got == kind and score > 0.9, "agree_mix": mixed == kind}


def check_duration(scene: Scene, q: Question) -> dict[str, Any]:
    a, b = q.evidence[0]
    length = envelope_length(_slice(sound.isolate(scene, _events(scene, "chord")), a, b))
    gold = parse_times(q.answer)[0]
    nearest = min(sound.DURATIONS, key=lambda v: abs(v - length))
    chord = next(e for e in _events(scene, "chord") if a <= e["onset"] and e["offset"] <= b)
    return {"agree": math.isclose(nearest, gold), "error_s": abs(length - (chord["offset"] - chord["onset"]))}


def check_pitch(scene: Scene, q: Question) -> dict[str, Any]:
    iso = sound.isolate(scene, _events(scene, "beep"))
    f1, f2 = (dominant_freq(_slice(iso, a, b)) for a, b in q.evidence)
    got = "higher" if f1 > 1.03 * f2 else "lower" if f2 > 1.03 * f1 else "same"
    return {"agree": normalise(q.answer) == got}


def check_order(scene: Scene, q: Question) -> dict[str, Any]:
    firsts = {}
    for choice in q.choices:
        kind = _kind_of(choice)
        times = onset_times(sound.isolate(scene, _events(scene, kind)).astype(np.float64))
        firsts[kind] = times[0] if times else math.inf
    return {"agree": min(firsts, key=firsts.__getitem__) == _kind_of(q.answer)}


def check_locate(scene: Scene, q: Question) -> dict[str, Any]:
    kind = next(k for k in sorted(sound.KINDS, key=len, reverse=True) if f"the {k}" in q.question)
    a, b = parse_times(q.answer)
    energy = sound.isolate(scene, _events(scene, kind)).astype(np.float64) ** 2
    return {"agree": float(_slice(energy, a, b).sum()) >= 0.95 * float(energy.sum())}


CHECKS: dict[str, Callable[[Scene, Question], dict[str, Any] | None]] = {
    "count": check_count,
    "identify": check_identify,
    "duration": check_duration,
    "pitch": check_pitch,
    "order": check_order,
    "locate": check_locate,
}


def run(n: int, seed: int, splits: tuple[SourceSplit, ...] = ("train", "heldout")) -> dict[str, Any]:
    """Agreement rates per source split and category (and `identify_mix`), with the disagreeing items."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {"n": n, "seed": seed}
    for k, split in enumerate(splits):
        tallies: dict[str, list[dict[str, Any]]] = {}
        for c_index, category in enumerate(sound.CATEGORIES):
            for i in range(n):
                rng = np.random.default_rng(np.random.SeedSequence([seed, k, c_index, i]))
                scene = sound.make_scene(rng, split, category)
                q = sound.ask(rng, scene, category, phrasing="train", open_question=False, slot=i, seed=seed)
                res = CHECKS[category](scene, q)
                if res is not None:
                    tallies.setdefault(category, []).append({**res, "i": i, "answer": q.answer})
        out: dict[str, Any] = {}
        for category, rows in tallies.items():
            out[category] = _rate(rows, "agree")
            if category == "identify":
                out["identify_mix"] = _rate(rows, "agree_mix")
            if category == "duration":
                out[category]["mean_error_s"] = round(float(np.mean([r["error_s"] for r in rows])), 4)
        report[split] = out
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _rate(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    agree = sum(bool(r[key]) for r in rows)
    return {
        "checked": len(rows),
        "agree": agree,
        "rate": round(agree / len(rows), 4) if rows else None,
        "disagree": [r["i"] for r in rows if not r[key]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20, help="items per category and source split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object only")
    args = p.parse_args(argv)
    report = run(args.n, args.seed)
    if args.json:
        print(json.dumps(report))
        return 0
    for split in ("train", "heldout"):
        for category, r in report[split].items():
            print(f"{split:8s} {category:13s} {r['agree']:4d}/{r['checked']:<4d} {r['rate']}")
    print(f"{report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
