"""Music sources for the suite: GM soundfont notes rendered through fluidsynth, and Hydrogen drum-kit hits.

Every source comes out as mono float32 at 16 kHz through `core.cached_audio`, so composing a scene only mixes
cached arrays.

- **Notes.** One (soundfont, GM program, MIDI pitch, duration class) note is rendered once: fluidsynth plays a
  small MIDI file holding every pitch and duration class of one program (one process per program), at 48 kHz
  with reverb and chorus off; each note is cut from its note-on to `TAIL` s after its note-off, resampled to
  16 kHz (band-limited, so bright instruments do not alias) and faded out at the end.
- **Drum hits.** Each sample file of a Hydrogen kit (`hydrogen-drumkits`) is read at run time (the kits are
  GPL / CC-BY-SA / CC0: never committed), mixed to mono, resampled, trimmed of leading silence (so the hit
  starts at its onset) and cut to a per-drum length.

Sources and their splits:

- soundfonts: every GM set installed under /usr/share/sounds/sf2 and sf3 (files resolved and de-duplicated);
  names starting with `MuseScore_General` (`musescore-general-soundfont(-small)`) are **held out**, the rest
  (FluidR3_GM from `fluid-soundfont-gm`, and any other installed set) train;
- kits: every `drumkit.xml` under /usr/share/hydrogen/data/drumkits that has a kick, a snare, a closed hi-hat
  and a crash (kit instrument names matched by `_DRUM_NAMES`, whose samples each hold a single hit);
  `HELDOUT_KITS` are held out, the rest train. With hydrogen-drumkits 2017.09.19: train Audiophob,
  ForzeeStereo, Millo-Drums_v.1, Millo_MultiLayered2, Millo_MultiLayered3; held out BJA_Pacific,
  ColomboAcousticDrumkit, The Black Pearl 1.0. Skipped: hand-percussion and electronic kits without all four
  drums, and rumpf_kit_z01_h2 (its crash sample is cut from a groove and holds several hits).
"""

from __future__ import annotations

import functools
import math
import re
import struct
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf

from .core import SAMPLE_RATE, MissingSourceError, SourceSplit, Waveform, cached_audio, require_binary

__all__ = [
    "DRUMS",
    "DURATIONS",
    "HELDOUT_KITS",
    "HELDOUT_SOUNDFONT_PREFIX",
    "INSTRUMENTS",
    "KIT_DIR",
    "SOUNDFONT_DIRS",
    "TAIL",
    "DrumLayer",
    "Instrument",
    "Kit",
    "hit",
    "instrument",
    "kit",
    "kits",
    "note",
    "resample",
    "soundfont",
    "soundfont_named",
    "soundfonts",
]

_RENDER_VERSION = "music-v1"  # bump when rendering or post-processing changes: old cache entries are ignored
_RENDER_RATE = 48000  # fluidsynth's rate; resampled to 16 kHz by FFT, so nothing above 8 kHz folds back
_GAIN = 0.5  # fluidsynth master gain: loud enough, never clipping one note
_VELOCITY = 96
_SLOT = 2.0  # seconds between note-ons in a batch render: longer than every note plus its tail
_FADE = 0.05  # fade-out at the end of every cut note / hit


@dataclass(frozen=True)
class Instrument:
    """A GM program with a plain name and the pitch range melodies use (sounding MIDI pitches, inclusive)."""

    name: str
    program: int  # 0-based GM program number
    low: int
    high: int


INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("piano", 0, 55, 79),
    Instrument("marimba", 12, 57, 81),
    Instrument("organ", 19, 53, 77),
    Instrument("guitar", 24, 48, 72),
    Instrument("violin", 40, 62, 86),
    Instrument("cello", 42, 40, 64),
    Instrument("trumpet", 56, 55, 79),
    Instrument("saxophone", 65, 52, 76),
    Instrument("clarinet", 71, 52, 76),
    Instrument("flute", 73, 67, 91),
)
"""Ten clearly distinct GM instruments; every range is two octaves, in the instrument's comfortable register."""

DURATIONS: tuple[float, ...] = (0.2, 0.35, 0.55, 0.9)
"""The note-on lengths rendered (a note's "duration class" is its index here), seconds."""
TAIL = 0.5
"""Seconds kept after a note's note-off: the instrument's release."""

SOUNDFONT_DIRS: tuple[Path, ...] = (Path("/usr/share/sounds/sf2"), Path("/usr/share/sounds/sf3"))
HELDOUT_SOUNDFONT_PREFIX = "MuseScore_General"
KIT_DIR = Path("/usr/share/hydrogen/data/drumkits")
HELDOUT_KITS: tuple[str, ...] = ("BJA_Pacific", "ColomboAcousticDrumkit", "The Black Pearl 1.0")

DRUMS: tuple[str, ...] = ("kick", "snare", "hi-hat", "crash")
"""Drum sounds, named as questions and answers name them."""
# Seconds kept of each hit: a kick's body is over by 0.5 s (Millo-Drums_v.1's kick has a second bump at 0.6 s).
_DRUM_LENGTH = {"kick": 0.5, "snare": 0.8, "hi-hat": 0.5, "crash": 2.5}
# How a kit's instrument names map to our drums: the first instrument in the kit's order that matches and is
# not excluded (so "Snare Rimshot", "Crash/Ride" or "Hi-Hat Pedal" never stand in for the plain sound).
_DRUM_NAMES: dict[str, tuple[str, str]] = {
    "kick": (r"\bkick\b|bass ?drum", r"$^"),
    "snare": (r"snare", r"rim|roll|stick|side|off|jazz"),
    "hi-hat": (r"(hh|hat).*(clos|\bcl\b)|clos\w*.*(hh|hat)", r"pedal|open|semi|\bop\b"),
    "crash": (r"crash", r"ride"),
}


def instrument(name: str) -> Instrument:
    for inst in INSTRUMENTS:
        if inst.name == name:
            return inst
    raise KeyError(f"unknown instrument {name!r}")


# ------------------------------------------------------------------------------------------- resampling


def resample(x: npt.NDArray[np.floating], rate: int, to: int = SAMPLE_RATE) -> Waveform:
    """Band-limited resampling by FFT (zero-padded, so the circular wrap stays silent), with a raised-cosine
    roll-off over the top 10% of the new band so the cut does not ring."""
    x = np.asarray(x, dtype=np.float64)
    if rate == to:
        return x.astype(np.float32)
    g = math.gcd(rate, to)
    p, q = to // g, rate // g
    n = len(x)
    pad = q * math.ceil((n + rate // 10) / q)  # >= 0.1 s of zeros, a multiple of q so the ratio is exact
    m = pad * p // q
    spec = np.fft.rfft(x, pad)
    bins = min(len(spec), m // 2 + 1)
    out = np.zeros(m // 2 + 1, dtype=np.complex128)
    out[:bins] = spec[:bins]
    edge = int(0.9 * (min(rate, to) / 2) / (to / m))  # bin where the roll-off starts
    if edge < bins:
        k = np.arange(bins - edge)
        out[edge:bins] *= 0.5 + 0.5 * np.cos(np.pi * k / (bins - edge))
    y = np.fft.irfft(out, m) * (m / pad)
    return y[: round(n * p / q)].astype(np.float32)


def _fade_out(x: Waveform, seconds: float = _FADE) -> Waveform:
    k = min(len(x), round(seconds * SAMPLE_RATE))
    if k:
        x = x.copy()
        x[len(x) - k :] *= (0.5 + 0.5 * np.cos(np.pi * np.arange(k) / k)).astype(np.float32)
    return x


# --------------------------------------------------------------------------------------------- soundfonts


def soundfonts(split: SourceSplit) -> list[Path]:
    """The installed GM soundfonts of `split` (real paths, sorted by name). Raises MissingSourceError when the
    split has none: train needs `fluid-soundfont-gm`, held-out `musescore-general-soundfont-small`."""
    fonts = _soundfonts()[split]
    if not fonts:
        package = "fluid-soundfont-gm" if split == "train" else "musescore-general-soundfont-small"
        raise MissingSourceError(
            f"no {split} GM soundfont under /usr/share/sounds: install the Debian package {package}"
            f" (apt-get install {package})"
        )
    return list(fonts)


@functools.cache
def _soundfonts() -> dict[SourceSplit, tuple[Path, ...]]:
    found: dict[str, Path] = {}
    for folder in SOUNDFONT_DIRS:
        for p in sorted(folder.glob("*.sf[23]")) if folder.is_dir() else []:
            real = p.resolve()
            if real.is_file():
                found[real.name] = real
    fonts: dict[SourceSplit, tuple[Path, ...]] = {
        "train": tuple(p for n, p in sorted(found.items()) if not n.startswith(HELDOUT_SOUNDFONT_PREFIX)),
        "heldout": tuple(p for n, p in sorted(found.items()) if n.startswith(HELDOUT_SOUNDFONT_PREFIX)),
    }
    return fonts


def soundfont_named(name: str) -> Path:
    """The installed soundfont with file name `name` (as `scene.meta["soundfont"]` records it)."""
    for fonts in _soundfonts().values():
        for p in fonts:
            if p.name == name:
                return p
    raise MissingSourceError(
        f"soundfont {name} is not installed: install fluid-soundfont-gm / musescore-general-soundfont-small"
    )


def soundfont(split: SourceSplit, rng: np.random.Generator) -> Path:
    """One soundfont of `split`, drawn from `rng`."""
    fonts = soundfonts(split)
    return fonts[int(rng.integers(len(fonts)))]


def _same(wav: Waveform) -> Waveform:
    return wav


def _vlq(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def _midi(notes: list[tuple[float, float, int]], program: int) -> bytes:
    """A format-0 MIDI file: program change, then (on, off, pitch) notes on channel 0; one tick = 1 ms."""
    events: list[tuple[int, int, bytes]] = []
    for on, off, pitch in notes:
        events.append((round(on * 1000), 1, bytes([0x90, pitch, _VELOCITY])))
        events.append((round(off * 1000), 0, bytes([0x80, pitch, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    track = b"\x00\xff\x51\x03" + (1_000_000).to_bytes(3, "big") + b"\x00" + bytes([0xC0, program])
    t = 0
    for tick, _, data in events:
        track += _vlq(tick - t) + data
        t = tick
    track += _vlq(1000) + b"\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 1000) + b"MTrk" + struct.pack(">I", len(track)) + track


def _note_key(font: Path, program: int, pitch: int, dur_class: int) -> tuple[object, ...]:
    return (_RENDER_VERSION, "fluidsynth", font.name, font.stat().st_size, program, pitch, dur_class)


def _render_program(font: Path, inst: Instrument) -> dict[tuple[int, int], Waveform]:
    """Every (pitch, duration class) note of `inst` from one fluidsynth run; each is also put in the cache."""
    binary = require_binary("fluidsynth", "fluidsynth")
    plan = [(p, d) for p in range(inst.low, inst.high + 1) for d in range(len(DURATIONS))]
    notes = [(1.0 + k * _SLOT, 1.0 + k * _SLOT + DURATIONS[d], p) for k, (p, d) in enumerate(plan)]
    with tempfile.TemporaryDirectory(prefix="echo-music-") as tmp:
        mid, wav = Path(tmp) / "notes.mid", Path(tmp) / "notes.wav"
        mid.write_bytes(_midi(notes, inst.program))
        cmd = [binary, "-ni", "-q", "-R", "0", "-C", "0", "-g", str(_GAIN), "-r", str(_RENDER_RATE)]
        cmd += ["-O", "float", "-T", "wav", "-F", str(wav), str(font), str(mid)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not wav.exists():
            raise MissingSourceError(f"fluidsynth failed on {font.name}: {done.stderr.strip()[:300]}")
        audio, rate = sf.read(wav, dtype="float64", always_2d=True)
    mono = audio.mean(axis=1)
    out: dict[tuple[int, int], Waveform] = {}
    for (on, off, _), key in zip(notes, plan, strict=True):
        a, b = round(on * rate), round((off + TAIL) * rate)
        wav16 = _fade_out(resample(mono[a:b], rate))
        out[key] = cached_audio(_note_key(font, inst.program, *key), functools.partial(_same, wav16))
    return out


@functools.lru_cache(maxsize=8192)
def note(font: Path, program: int, pitch: int, dur_class: int) -> Waveform:
    """One rendered note: note-on at sample 0, note-off at `DURATIONS[dur_class]`, then `TAIL` s of release.
    The returned array is shared (memoised): never modify it."""
    inst = next((i for i in INSTRUMENTS if i.program == program), None)
    if inst is None or not inst.low <= pitch <= inst.high:
        raise ValueError(f"program {program} pitch {pitch} is not a suite note")
    wav = cached_audio(
        _note_key(font, program, pitch, dur_class), lambda: _render_program(font, inst)[(pitch, dur_class)]
    )
    wav.flags.writeable = False
    return wav


# --------------------------------------------------------------------------------------------- drum kits


@dataclass(frozen=True)
class DrumLayer:
    """One velocity layer of a kit instrument: the sample file and the velocity range (0..1) it plays for."""

    file: str
    low: float
    high: float


@dataclass(frozen=True)
class Kit:
    """A Hydrogen kit with the four drums the suite uses: drum -> (the kit's instrument name, its layers)."""

    name: str
    folder: Path
    licence: str
    drums: dict[str, tuple[str, tuple[DrumLayer, ...]]]

    def layer(self, drum: str, velocity: float) -> DrumLayer:
        """The layer that plays `velocity` (the nearest one when the kit leaves a gap)."""
        layers = self.drums[drum][1]
        inside = [lay for lay in layers if lay.low <= velocity <= lay.high]
        if inside:
            return inside[-1]
        return min(layers, key=lambda lay: min(abs(lay.low - velocity), abs(lay.high - velocity)))

    def __hash__(self) -> int:
        return hash(self.name)


def _text(el: ET.Element, tag: str, ns: str) -> str | None:
    child = el.find(ns + tag)
    return child.text.strip() if child is not None and child.text else None


def _read_kit(xml: Path) -> Kit | None:
    """The kit in `xml`, or None when it lacks one of `DRUMS`: a matching instrument whose sample files are
    all present and hold a single hit (`_single_hit`; some kits' samples are slices of a groove)."""
    root = ET.parse(xml).getroot()
    m = re.match(r"\{.*\}", root.tag)
    ns = m.group(0) if m else ""
    kit_name = xml.parent.name
    candidates: list[tuple[str, tuple[DrumLayer, ...]]] = []
    for ins in root.iter(ns + "instrument"):
        iname = _text(ins, "name", ns)
        if not iname:
            continue
        layers = []
        for lay in ins.iter(ns + "layer"):
            file = _text(lay, "filename", ns)
            if file:
                layers.append(DrumLayer(file, float(_text(lay, "min", ns) or 0.0), float(_text(lay, "max", ns) or 1.0)))
        if not layers and (file := _text(ins, "filename", ns)):  # old kits: one sample, no layers
            layers.append(DrumLayer(file, 0.0, 1.0))
        if layers and all((xml.parent / lay.file).is_file() for lay in layers):
            candidates.append((iname, tuple(sorted(layers, key=lambda lay: (lay.low, lay.high)))))
    drums: dict[str, tuple[str, tuple[DrumLayer, ...]]] = {}
    for drum, (want, exclude) in _DRUM_NAMES.items():
        for iname, found in candidates:
            low = iname.lower()
            named = re.search(want, low) and not re.search(exclude, low)
            if named and all(_single_hit(_hit_wave(xml.parent, kit_name, drum, lay.file)) for lay in found):
                drums[drum] = (iname, found)
                break
        else:
            return None
    return Kit(kit_name, xml.parent, _text(root, "license", ns) or "see the kit's folder", drums)


def _single_hit(x: Waveform) -> bool:
    """No second attack: after the peak, the 20 ms energy envelope never climbs 10 dB above its running
    minimum to within 20 dB of the peak (rumpf_kit's crash, cut from a groove, holds several hits)."""
    n = len(x) // 320 * 320
    db = 10 * np.log10(np.mean(np.square(x[:n].reshape(-1, 320), dtype=np.float64), axis=1) + 1e-12)
    if not len(db):
        return False
    top = int(np.argmax(db))
    low = db[top]
    for v in db[top + 1 :]:
        low = min(low, v)
        if v - low > 10.0 and v > db[top] - 20.0:
            return False
    return True


@functools.cache
def _kits() -> dict[SourceSplit, tuple[Kit, ...]]:
    found = [k for xml in sorted(KIT_DIR.glob("*/drumkit.xml")) if (k := _read_kit(xml)) is not None]
    return {
        "train": tuple(k for k in found if k.name not in HELDOUT_KITS),
        "heldout": tuple(k for k in found if k.name in HELDOUT_KITS),
    }


def kits(split: SourceSplit) -> list[Kit]:
    """The installed Hydrogen kits of `split` that have all of `DRUMS`, sorted by folder name."""
    found = _kits()[split]
    if not found:
        raise MissingSourceError(
            f"no {split} drum kit under {KIT_DIR}: install the Debian package hydrogen-drumkits"
            " (apt-get install hydrogen-drumkits)"
        )
    return list(found)


def kit(name: str) -> Kit:
    for found in _kits().values():
        for k in found:
            if k.name == name:
                return k
    raise MissingSourceError(f"drum kit {name!r} not found under {KIT_DIR}: install hydrogen-drumkits")


def _hit_wave(folder: Path, kit_name: str, drum: str, file: str) -> Waveform:
    def make() -> Waveform:
        audio, rate = sf.read(folder / file, dtype="float64", always_2d=True)
        x = resample(audio.mean(axis=1), rate)
        peak = float(np.max(np.abs(x))) or 1.0
        start = max(0, int(np.argmax(np.abs(x) > 0.05 * peak)) - round(0.002 * SAMPLE_RATE))
        x = x[start : start + round(_DRUM_LENGTH[drum] * SAMPLE_RATE)]
        return _fade_out(x / peak)

    return cached_audio((_RENDER_VERSION, "hydrogen", kit_name, file, drum, _DRUM_LENGTH[drum]), make)


@functools.lru_cache(maxsize=4096)
def hit(kit_name: str, drum: str, file: str) -> Waveform:
    """One drum sample of a kit at 16 kHz mono, starting at its attack and cut to the drum's length; peak 1.
    The returned array is shared (memoised): never modify it."""
    wav = _hit_wave(kit(kit_name).folder, kit_name, drum, file)
    wav.flags.writeable = False
    return wav
