"""Speech sources for the suite: TTS voices and real recorded prompts, rendered once and cached.

Every utterance (one voice saying one short text: a digit, a number in words, a letter, a word) comes out as
mono float32 at 16 kHz, trimmed of leading/trailing silence and loudness-normalised (RMS over its voiced
frames), through `core.cached_audio`, so composing a scene only mixes cached arrays.

Voices and their splits:

- **train**: espeak-ng (a fixed list of English accents x variants x pitches, in four pitch/gender clusters),
  every installed festival voice (`festvox-kallpc16k`: kal_diphone), and the Asterisk core prompts
  (`asterisk-core-sounds-en-wav`: one real female speaker, 8 kHz; its digit, number, letter and single-word
  prompts, found through the transcripts of `asterisk-core-sounds-en`), treated as one voice;
- **held out**: every voice `flite -lv` lists. `awb_time` is held out too but never spoken: it is a
  limited-domain voice (clock times) that cannot say "zero", letters or words, and its speaker is awb's.

A voice's `cluster` groups voices that sound alike (espeak voices of one gender and pitch band, flite kal and
kal16, awb and awb_time); a scene's voices come from distinct clusters, so "different voices" are clearly
different.
"""

from __future__ import annotations

import functools
import gzip
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf

from .core import SAMPLE_RATE, SourceSplit, Waveform, cached_audio, require_binary, require_path

__all__ = [
    "ASTERISK_DIR",
    "ASTERISK_VOICE",
    "NUMBER_WORDS",
    "Voice",
    "heldout_voice_ids",
    "number_words",
    "utterance",
    "voice",
    "voices",
]

Engine = Literal["espeak-ng", "festival", "asterisk", "flite"]
Gender = Literal["male", "female"]

_RENDER_VERSION = "speech-utt-v1"  # bump when rendering or post-processing changes: old cache entries are ignored
_TARGET_RMS = 0.1  # -20 dBFS over voiced frames
_FRAME = 160  # 10 ms frames for trimming and loudness
_TRIM_DB = 35.0  # frames this far below the loudest frame count as silence at the ends
_FADE = 80  # 5 ms fades at both ends, so trimmed edges never click

ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en")
_ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
ASTERISK_VOICE = "asterisk:en"
_FESTIVAL_VOICES = Path("/usr/share/festival/voices")

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")  # fmt: skip
_TENS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy", 80: "eighty", 90: "ninety"}
NUMBER_WORDS: frozenset[str] = frozenset([*_ONES, *_TENS.values(), "hundred"])
"""The words numbers below 1000 are read out with ("one hundred five", "twenty three")."""


def number_words(n: int) -> str:
    """0 <= n < 1000 in words, space-separated and without "and": 105 -> "one hundred five"."""
    if not 0 <= n < 1000:
        raise ValueError(f"numbers are read out from 0 to 999, not {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens * 10] + ("" if ones == 0 else f" {_ONES[ones]}")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + ("" if rest == 0 else f" {number_words(rest)}")


@dataclass(frozen=True)
class Voice:
    """One speaking voice. `words` is None for TTS (any text), else the only words it has recordings of."""

    id: str  # "espeak-ng:en-us+m3:p30", "festival:kal_diphone", "asterisk:en", "flite:slt"
    engine: Engine
    name: str  # the engine's own name: "en-us+m3", "kal_diphone", "slt"
    gender: Gender
    cluster: str  # voices of one cluster sound alike; a scene takes at most one voice per cluster
    split: SourceSplit
    pitch: int = 50  # espeak-ng -p
    speed: int = 175  # espeak-ng -s (words per minute)
    words: frozenset[str] | None = None

    def can_say(self, text: str) -> bool:
        return self.words is None or all(w in self.words for w in text.split())


# ------------------------------------------------------------------------------------------ the voices

# (accent, variant, pitch, speed): four clusters of four, pitch bands far apart so clusters sound different
# (median f0 about 80, 120, 180 and 240 Hz). "en" is British English: espeak-ng 1.51 ignores a variant given
# as "en-gb+f2", and "en-us-nyc" renders exactly as "en-us", so neither is used.
_ESPEAK: dict[str, tuple[tuple[str, str, int, int], ...]] = {
    "espeak-male-low": (
        ("en-us", "m1", 25, 165),
        ("en", "m3", 30, 175),
        ("en-gb-scotland", "m2", 30, 160),
        ("en-029", "m4", 25, 180),
    ),
    "espeak-male-high": (
        ("en-us", "m7", 70, 180),
        ("en-gb-x-rp", "m5", 75, 170),
        ("en", "m6", 70, 185),
        ("en-gb-x-gbclan", "m2", 75, 165),
    ),
    "espeak-female-low": (
        ("en-us", "f1", 55, 170),
        ("en", "f2", 55, 160),
        ("en-029", "f4", 55, 175),
        ("en-gb-x-rp", "f5", 50, 180),
    ),
    "espeak-female-high": (
        ("en-us", "f3", 75, 175),
        ("en-gb-scotland", "f2", 80, 165),
        ("en-gb-x-gbclan", "f4", 80, 185),
        ("en-gb-x-gbcwmd", "f1", 80, 170),
    ),
}

# flite voice -> (gender, cluster); a voice flite lists but this table lacks is its own male cluster.
_FLITE: dict[str, tuple[Gender, str]] = {
    "kal": ("male", "flite:kal"),
    "kal16": ("male", "flite:kal"),  # the same speaker as kal, at 16 kHz
    "awb": ("male", "flite:awb"),
    "awb_time": ("male", "flite:awb"),
    "rms": ("male", "flite:rms"),
    "slt": ("female", "flite:slt"),
}
_LIMITED_DOMAIN = frozenset({"awb_time"})  # can only say clock times: held out, never spoken
_FESTIVAL_GENDER: dict[str, Gender] = {"kal_diphone": "male", "ked_diphone": "male", "rab_diphone": "male"}


def _run(cmd: list[str], stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True, timeout=60).stdout


@functools.cache
def _espeak_accents() -> frozenset[str]:
    require_binary("espeak-ng", "espeak-ng")
    out = _run(["espeak-ng", "--voices=en"])
    return frozenset(line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1)


@functools.cache
def _flite_names() -> tuple[str, ...]:
    require_binary("flite", "flite")
    out = _run(["flite", "-lv"])
    return tuple(sorted(out.split(":", 1)[1].split())) if ":" in out else ()


def heldout_voice_ids() -> tuple[str, ...]:
    """Every flite voice (`flite -lv`), spoken or not: the voices `sources="train"` must never use."""
    return tuple(f"flite:{n}" for n in _flite_names())


@functools.cache
def _festival_names() -> tuple[str, ...]:
    """Installed festival voices: folders `voices/<language>/<name>/` holding `festvox/<name>.scm`."""
    require_binary("text2wave", "festival")
    names = sorted(
        {p.parent.parent.name for p in _FESTIVAL_VOICES.glob("*/*/festvox/*.scm") if p.stem == p.parent.parent.name}
    )
    if not names:
        require_path(_FESTIVAL_VOICES / "english" / "kal_diphone", "festvox-kallpc16k")
    return tuple(names)


@functools.cache
def _asterisk_files() -> dict[str, Path]:
    """Asterisk prompt per word it says: digits/numbers, letters, and single-word prompts (from transcripts)."""
    root = require_path(ASTERISK_DIR / "digits", "asterisk-core-sounds-en-wav").parent
    files: dict[str, Path] = {}
    for n, word in enumerate(_ONES):
        files[word] = root / "digits" / f"{n}.wav"
    for n, word in _TENS.items():
        files[word] = root / "digits" / f"{n}.wav"
    files["hundred"] = root / "digits" / "hundred.wav"
    for p in sorted((root / "letters").glob("?.wav")):
        files[p.stem] = p
    transcripts = require_path(_ASTERISK_TRANSCRIPTS, "asterisk-core-sounds-en")
    with gzip.open(transcripts, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            name, _, text = line.partition(":")
            spoken = re.sub(r"[^a-z ]", "", text.lower()).split()
            # A top-level prompt whose whole transcript is its own name ("hello: Hello.") is that one word.
            if "/" not in name and spoken == [name] and (root / f"{name}.wav").exists():
                files.setdefault(name, root / f"{name}.wav")
    return {w: p for w, p in files.items() if p.exists()}


@functools.cache
def _voices_of(split: SourceSplit) -> tuple[Voice, ...]:
    """Discovered once per process (and split): each split only needs its own engines installed."""
    if split == "heldout":
        heldout: list[Voice] = []
        for name in _flite_names():
            if name in _LIMITED_DOMAIN:
                continue
            g, cluster = _FLITE.get(name, ("male", f"flite:{name}"))
            heldout.append(Voice(f"flite:{name}", "flite", name, g, cluster, "heldout"))
        return tuple(sorted(heldout, key=lambda v: v.id))
    train: list[Voice] = []
    accents = _espeak_accents()
    for cluster, rows in _ESPEAK.items():
        gender: Gender = "female" if "female" in cluster else "male"
        for accent, variant, pitch, speed in rows:
            if accent in accents:
                name = f"{accent}+{variant}"
                train.append(
                    Voice(f"espeak-ng:{name}:p{pitch}", "espeak-ng", name, gender, cluster, "train", pitch, speed)
                )
    for name in _festival_names():
        g = _FESTIVAL_GENDER.get(name, "male")
        train.append(Voice(f"festival:{name}", "festival", name, g, f"festival:{name}", "train"))
    words = frozenset(_asterisk_files())
    train.append(Voice(ASTERISK_VOICE, "asterisk", "en", "female", "asterisk", "train", words=words))
    return tuple(sorted(train, key=lambda v: v.id))


def voices(split: SourceSplit) -> tuple[Voice, ...]:
    """The speaking voices of `split`, sorted by id (raises `MissingSourceError` naming a missing package)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"sources must be train or heldout, not {split!r}")
    return _voices_of(split)


def voice(voice_id: str) -> Voice:
    """The voice with this id, from either split."""
    split: SourceSplit = "heldout" if voice_id.startswith("flite:") else "train"
    for v in voices(split):
        if v.id == voice_id:
            return v
    raise KeyError(f"unknown voice {voice_id!r}")


# --------------------------------------------------------------------------------------------- rendering


def _read(path: Path) -> tuple[np.ndarray, int]:
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1), int(sr)


def _tts_text(text: str) -> str:
    # A lone letter is written as a capital, which every engine reads as the letter's name ("bee").
    return " ".join(w.upper() if len(w) == 1 else w for w in text.split())


def _synthesise(v: Voice, text: str) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory(prefix="echo-tts-") as tmp:
        out = Path(tmp) / "u.wav"
        spoken = _tts_text(text)
        if v.engine == "espeak-ng":
            _run(["espeak-ng", "-v", v.name, "-p", str(v.pitch), "-s", str(v.speed), "-w", str(out), spoken])
        elif v.engine == "flite":
            _run(["flite", "-voice", v.name, "-t", spoken, "-o", str(out)])
        elif v.engine == "festival":
            _run(["text2wave", "-eval", f"(voice_{v.name})", "-o", str(out)], stdin=spoken + "\n")
        else:
            raise ValueError(f"{v.id} is not a TTS voice")
        return _read(out)


def _recorded(v: Voice, text: str) -> tuple[np.ndarray, int]:
    """Asterisk prompts, one per word, each trimmed, joined with 40 ms pauses (numbers: "twenty" + "three")."""
    files = _asterisk_files()
    parts: list[np.ndarray] = []
    sr = 8000
    for word in text.split():
        if word not in files:
            raise ValueError(f"{v.id} has no recording of {word!r}")
        x, sr = _read(files[word])
        parts += [_trim(x, sr), np.zeros(round(0.04 * sr), dtype=np.float32)]
    return np.concatenate(parts[:-1]), sr


def _trim(x: np.ndarray, sr: int) -> np.ndarray:
    """Cut leading/trailing frames more than `_TRIM_DB` below the loudest frame (keeping one frame of margin)."""
    frame = max(1, round(_FRAME * sr / SAMPLE_RATE))
    n = len(x) // frame
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame).astype(np.float64) ** 2, axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (-_TRIM_DB / 20))
    if len(loud) == 0:
        return x
    a, b = max(0, (loud[0] - 1) * frame), min(len(x), (loud[-1] + 2) * frame)
    return x[a:b]


def _finish(x: np.ndarray, sr: int, name: str) -> Waveform:
    """16 kHz, trimmed, faded, RMS over the voiced frames at `_TARGET_RMS` (peak kept below 0.99)."""
    from echo_agent.audio import _resample  # torch is imported only when a render is not cached

    x = np.ascontiguousarray(x, dtype=np.float32)
    if sr != SAMPLE_RATE:
        x = _resample(x, sr, SAMPLE_RATE, name)
    x = _trim(x, SAMPLE_RATE).astype(np.float64)
    if len(x) < _FRAME:
        raise ValueError(f"{name}: the render is empty")
    n = len(x) // _FRAME
    rms = np.sqrt(np.mean(x[: n * _FRAME].reshape(n, _FRAME) ** 2, axis=1))
    voiced = rms >= rms.max() * 10 ** (-20 / 20)
    level = float(np.sqrt(np.mean(rms[voiced] ** 2)))
    x *= _TARGET_RMS / level
    peak = float(np.max(np.abs(x)))
    if peak > 0.99:
        x *= 0.99 / peak
    k = min(_FADE, len(x) // 2)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
    x[:k] *= ramp
    x[len(x) - k :] *= ramp[::-1]
    return x.astype(np.float32)


def utterance(v: Voice, text: str) -> Waveform:
    """`v` saying `text` (lower-case words; a lone letter is read as its name), 16 kHz, cached."""
    if not v.can_say(text):
        raise ValueError(f"{v.id} cannot say {text!r}")

    def make() -> Waveform:
        x, sr = _recorded(v, text) if v.engine == "asterisk" else _synthesise(v, text)
        return _finish(x, sr, f"{v.id} {text!r}")

    return cached_audio((_RENDER_VERSION, v.id, text), make)
