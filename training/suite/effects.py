"""Sound sources of the sound domain: recorded effects and ambience beds from `sonic-pi-samples`, and noise.

Every recording used is one of the package's files that its Debian copyright file licenses **CC0**
individually (`Files: etc/samples/<name>.flac ... License: CC0`); files that only fall under the
package-wide `Files: *` stanza (MIT: e.g. `perc_door`, `perc_bell2`, `ambi_sauna`) are not used.
Nothing is copied into the repository: files are read from the installed package, resampled to 16 kHz
mono, trimmed and cached through `core.cached_audio`.

**Effects** (`EFFECTS`): each named kind ("bell", "snap", "kick", ...) lists its train recordings and,
where the package holds several recordings of that kind, held-out ones never used for training.
Kinds with one recording (bell, crow, cowbell, scratch, burp, cash register) are shared by both
source splits: for them only the mix (neighbours, bed, SNR) differs.

**Backgrounds**: coloured noise (white and pink for training, brown held out) or a real ambience bed
(sustained drones, hums and vinyl hiss only: no rhythmic loops, which would add countable onsets),
looped seamlessly to the clip's length. Held-out SNRs are a lower, disjoint band (`SNR_DB`).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .core import SAMPLE_RATE, SourceSplit, Waveform, cached_audio, require_path

__all__ = [
    "BEDS",
    "EFFECTS",
    "MAX_EFFECT_S",
    "NOISE_COLOURS",
    "PACKAGE",
    "SNR_DB",
    "Effect",
    "bed",
    "bed_track",
    "cc0_files",
    "effect",
    "effect_files",
    "noise",
    "recording",
    "samples_dir",
]

PACKAGE = "sonic-pi-samples"
_SAMPLE_DIRS = ("/usr/share/sonic-pi/samples",)
_COPYRIGHT = Path("/usr/share/doc/sonic-pi-samples/copyright")
_VERSION = 2  # bump when the processing below changes, so stale cache entries are not reused

MAX_EFFECT_S = 1.5
"""Recorded effects are cut to at most this long (a fade-out ends the cut), so scenes stay countable."""
_TRIM_DB = 35.0  # an effect starts/ends where its 10 ms envelope first/last reaches peak - this many dB
_FADE_OUT_S = 0.05


@dataclass(frozen=True)
class Effect:
    """A named kind of recorded effect and the package files that are recordings of it."""

    kind: str
    noun: tuple[str, str]  # (one, many) as counts are written: "1 snare hit", "How many snare hits ..."
    train: tuple[str, ...]
    heldout: tuple[str, ...] = ()  # recordings of the same kind kept for `sources="heldout"`
    countable: bool = False  # one clear attack per recording, <= 1 s: fair to count

    def files(self, sources: SourceSplit) -> tuple[str, ...]:
        """The recordings `sources` may use: held-out ones when there are any, else the shared ones."""
        return self.heldout if sources == "heldout" and self.heldout else self.train


EFFECTS: dict[str, Effect] = {
    e.kind: e
    for e in (
        Effect("bell", ("bell strike", "bell strikes"), ("perc_bell",)),
        Effect("crow", ("crow caw", "crow caws"), ("misc_crow",), countable=True),
        Effect("cowbell", ("cowbell hit", "cowbell hits"), ("drum_cowbell",), countable=True),
        Effect("snap", ("snap", "snaps"), ("perc_snap",), ("perc_snap2",), countable=True),
        Effect(
            "cymbal",
            ("cymbal crash", "cymbal crashes"),
            ("drum_cymbal_hard", "drum_cymbal_open", "drum_splash_hard"),
            ("drum_cymbal_soft", "drum_splash_soft"),
        ),
        Effect(
            "kick",
            ("kick", "kicks"),
            ("bd_808", "bd_fat", "bd_gas", "bd_haus", "bd_klub", "bd_pure", "bd_tek", "drum_heavy_kick"),
            ("bd_sone", "bd_zome", "drum_bass_hard"),
            countable=True,
        ),
        Effect(
            "snare",
            ("snare hit", "snare hits"),
            ("drum_snare_hard", "sn_dolf", "sn_zome"),
            ("drum_snare_soft", "sn_dub"),
            countable=True,
        ),
        Effect(
            "tabla",
            ("tabla stroke", "tabla strokes"),
            ("tabla_ghe1", "tabla_ghe4", "tabla_na", "tabla_tas1"),
            ("tabla_ghe8", "tabla_na_o", "tabla_tas2"),
            countable=True,
        ),
        Effect("scratch", ("scratch", "scratches"), ("vinyl_scratch",)),
        Effect("burp", ("burp", "burps"), ("misc_burp",)),
        Effect("cash register", ("cash register ring", "cash register rings"), ("perc_till",)),
    )
}
"""Recorded effect kinds, by the plain word questions use."""

BEDS: dict[SourceSplit, tuple[str, ...]] = {
    "train": ("vinyl_hiss", "ambi_drone", "ambi_glass_hum", "ambi_lunar_land"),
    "heldout": ("ambi_haunted_hum", "ambi_glass_rub"),
}
"""Ambience beds (sustained, no rhythmic onsets), split by source."""

NOISE_COLOURS: dict[SourceSplit, tuple[str, ...]] = {"train": ("white", "pink"), "heldout": ("brown",)}

SNR_DB: dict[SourceSplit, tuple[float, float]] = {"train": (6.0, 20.0), "heldout": (3.0, 6.0)}
"""Foreground-over-background power (dB, foreground measured where events sound): train and a lower,
disjoint held-out band, still above the level where the bench's template matcher starts to fail."""


def effect_files(sources: SourceSplit | None = None) -> tuple[str, ...]:
    """Every recording a source split uses (None: both), sorted."""
    names = {f for e in EFFECTS.values() for f in (e.train + e.heldout if sources is None else e.files(sources))}
    return tuple(sorted(names))


# ------------------------------------------------------------------------------------------------ files


@functools.lru_cache(maxsize=1)
def samples_dir() -> Path:
    """Where `sonic-pi-samples` put its FLACs; a MissingSourceError naming the package if not installed.

    Asked before every render, even one the cache could serve, so a missing package is always reported."""
    for d in _SAMPLE_DIRS:
        if Path(d).is_dir() and any(Path(d).glob("*.flac")):
            return Path(d)
    return require_path(_SAMPLE_DIRS[0] + "/bd_808.flac", PACKAGE).parent


@functools.lru_cache(maxsize=1)
def _available() -> frozenset[str]:
    return frozenset(p.stem for p in sorted(samples_dir().glob("*.flac")))


def cc0_files() -> frozenset[str]:
    """The sample names the package's Debian copyright file licenses CC0 one by one (empty if the file is
    absent, e.g. on an image that drops /usr/share/doc)."""
    if not _COPYRIGHT.exists():
        return frozenset()
    names: set[str] = set()
    for para in _COPYRIGHT.read_text(encoding="utf-8").split("\n\n"):
        files = re.search(r"^Files:(.*?)(?=^[A-Za-z-]+:)", para, re.S | re.M)
        lic = re.search(r"^License:\s*(\S+)", para, re.M)
        if files and lic and lic.group(1) == "CC0":
            names.update(Path(f).stem for f in files.group(1).split() if f.endswith(".flac"))
    return frozenset(names)


def _resample(x: npt.NDArray[np.float64], sr: int) -> npt.NDArray[np.float64]:
    """FFT resampling to SAMPLE_RATE with a raised-cosine roll-off over the top 10 % of the new band (a
    brick wall would ring around every attack). The signal is zero-padded first so nothing wraps round."""
    if sr == SAMPLE_RATE:
        return x
    pad = sr // 10
    xp = np.concatenate([np.zeros(pad), x, np.zeros(pad)])
    n_out = round(len(xp) * SAMPLE_RATE / sr)
    spec = np.fft.rfft(xp)
    keep = n_out // 2 + 1
    spec = spec[:keep] if len(spec) >= keep else np.concatenate([spec, np.zeros(keep - len(spec))])
    f = np.arange(keep) / (keep - 1)
    roll = np.clip((f - 0.9) / 0.1, 0.0, 1.0)
    spec = spec * (0.5 + 0.5 * np.cos(np.pi * roll))
    y = np.fft.irfft(spec, n_out) * (n_out / len(xp))
    cut = round(pad * SAMPLE_RATE / sr)
    return y[cut : n_out - cut]


def _read(name: str) -> npt.NDArray[np.float64]:
    import soundfile as sf

    if name not in _available():
        raise FileNotFoundError(f"{name}.flac is not in {samples_dir()} ({PACKAGE})")
    x, sr = sf.read(samples_dir() / f"{name}.flac", dtype="float64", always_2d=True)
    return _resample(x.mean(axis=1), int(sr))


def _envelope_db(x: npt.NDArray[np.float64], frame: int) -> npt.NDArray[np.float64]:
    n = len(x) // frame
    e = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1)) + 1e-12
    return np.asarray(20 * np.log10(e / e.max()), dtype=np.float64)


def _make_effect(name: str) -> Waveform:
    """Cut to its audible extent (<= MAX_EFFECT_S), faded out, scaled so its loudest 100 ms have unit RMS:
    the level of a steady synthetic event of gain 1, so a struck sound with a long quiet tail is not
    boosted until its attack dwarfs everything else."""
    x = _read(name)
    frame = SAMPLE_RATE // 100
    loud = np.flatnonzero(_envelope_db(x, frame) >= -_TRIM_DB)
    start = max(0, loud[0] * frame - frame // 2)
    end = min(len(x), (loud[-1] + 1) * frame, start + round(MAX_EFFECT_S * SAMPLE_RATE))
    y = x[start:end].copy()
    k = min(len(y) // 4, round(_FADE_OUT_S * SAMPLE_RATE))
    y[len(y) - k :] *= np.cos(0.5 * np.pi * np.arange(1, k + 1) / k)
    win = min(len(y), SAMPLE_RATE // 10)
    power = np.convolve(y**2, np.ones(win) / win, mode="valid")
    return (y / math.sqrt(float(power.max()))).astype(np.float32)


@functools.lru_cache(maxsize=256)
def recording(name: str) -> Waveform:
    """One effect recording, 16 kHz mono, trimmed, unit RMS (rendered once, then read from the cache)."""
    samples_dir()
    wav = cached_audio((PACKAGE, "effect", name, _VERSION, SAMPLE_RATE), lambda: _make_effect(name))
    wav.setflags(write=False)
    return wav


def effect(kind: str, sources: SourceSplit, rng: np.random.Generator) -> tuple[str, Waveform]:
    """A recording of `kind` drawn from those `sources` may use: (file name, samples)."""
    files = EFFECTS[kind].files(sources)
    name = files[int(rng.integers(len(files)))]
    return name, recording(name)


# ------------------------------------------------------------------------------------------ backgrounds


def _make_bed(name: str) -> Waveform:
    """A bed's sustained part (its fade-in and fade-out dropped) made loopable, at unit RMS.

    The last `xf` samples are cross-faded (equal power) into the first ones, so tiling the result has
    no click and no dip at the seam."""
    x = _read(name)
    frame = SAMPLE_RATE // 10
    db = _envelope_db(x, frame)
    body = np.flatnonzero(db >= np.percentile(db, 90) - 15.0)
    x = x[body[0] * frame : (body[-1] + 1) * frame]
    xf = min(len(x) // 4, SAMPLE_RATE // 4)
    t = np.arange(xf) / xf
    loop = x[: len(x) - xf].copy()
    loop[:xf] = x[:xf] * np.sin(0.5 * np.pi * t) + x[len(x) - xf :] * np.cos(0.5 * np.pi * t)
    return (loop / math.sqrt(float(np.mean(loop**2)))).astype(np.float32)


@functools.lru_cache(maxsize=32)
def bed(name: str) -> Waveform:
    """One ambience bed, loopable, 16 kHz mono, unit RMS (cached)."""
    samples_dir()
    wav = cached_audio((PACKAGE, "bed", name, _VERSION, SAMPLE_RATE), lambda: _make_bed(name))
    wav.setflags(write=False)
    return wav


def bed_track(rng: np.random.Generator, name: str, n: int) -> npt.NDArray[np.float64]:
    """`n` samples of bed `name`, looped from a random offset."""
    loop = bed(name)
    idx = (int(rng.integers(len(loop))) + np.arange(n)) % len(loop)
    return loop[idx].astype(np.float64)


def noise(rng: np.random.Generator, colour: str, n: int) -> npt.NDArray[np.float64]:
    """Unit-RMS coloured noise: white; pink (power ~ 1/f) or brown (~ 1/f^2) shaped in one inverse FFT,
    flat below 20 Hz so there is no drift."""
    if colour == "white":
        x = rng.standard_normal(n)
    else:
        exponent = {"pink": 0.5, "brown": 1.0}[colour]
        m = 1 << max(1, (n - 1).bit_length())
        bins = m // 2 + 1
        spec = rng.standard_normal(bins) + 1j * rng.standard_normal(bins)
        spec /= np.maximum(np.fft.rfftfreq(m, 1.0 / SAMPLE_RATE), 20.0) ** exponent
        spec[0] = 0.0
        x = np.fft.irfft(spec, m)[:n]
    return np.asarray(x / math.sqrt(float(np.mean(x**2))), dtype=np.float64)
