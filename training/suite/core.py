"""What every domain of the real-audio suite shares: the item record, scenes, the render cache, mixing, balance.

A **scene** is one clip composed on a known timeline from real sources (its `events` are the ground truth);
a **question** is one puzzle about a scene, phrased through `phrasing`. A domain module (`speech`, `music`,
`sound`) exposes::

    CATEGORIES: tuple[str, ...]
    BANKS: dict[str, phrasing.Bank]          # one phrasing bank per category
    def make_scene(rng, sources: SourceSplit, category: str) -> Scene
    def ask(rng, scene, category, *, phrasing: PhrasingSplit, open_question: bool,
            slot: int | None, seed: int, follow_up: bool = False) -> Question

`write` turns (scene, questions) into `SuiteItem` records and WAV files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from ...errors import EchoError

__all__ = [
    "DOMAINS",
    "SAMPLE_RATE",
    "SUITE_DATASET",
    "AnswerKind",
    "Domain",
    "MissingSourceError",
    "PhrasingSplit",
    "Question",
    "Scene",
    "SourceSplit",
    "SuiteItem",
    "balanced",
    "cache_root",
    "cached_audio",
    "mix_at_snr",
    "peak_normalise",
    "place",
    "require_binary",
    "require_path",
    "seg",
]

SAMPLE_RATE = 16000
SUITE_DATASET = "echo-suite"
Domain = Literal["speech", "music", "sound"]
DOMAINS: tuple[Domain, ...] = ("speech", "music", "sound")
SourceSplit = Literal["train", "heldout"]
PhrasingSplit = Literal["train", "heldout"]
AnswerKind = Literal["choice", "number", "word", "time", "duration", "span"]
"""How an open answer is matched (`echo_agent.matching`); multiple-choice items are "choice"."""

Waveform = npt.NDArray[np.float32]


class MissingSourceError(EchoError):
    """A Debian package (or binary) the suite renders from is not installed; the message names it."""


def require_binary(name: str, package: str) -> str:
    """The path of executable `name`, or a MissingSourceError telling which Debian package provides it."""
    path = shutil.which(name)
    if path is None:
        raise MissingSourceError(
            f"`{name}` not found: install the Debian package {package} (apt-get install {package})"
        )
    return path


def require_path(path: str | os.PathLike[str], package: str) -> Path:
    """`path` if it exists, else a MissingSourceError naming the Debian package that installs it."""
    p = Path(path)
    if not p.exists():
        raise MissingSourceError(f"{p} not found: install the Debian package {package} (apt-get install {package})")
    return p


# --------------------------------------------------------------------------------------------- the record


@dataclass
class Scene:
    """One composed clip and its ground truth."""

    domain: Domain
    audio: Waveform = field(repr=False)  # mono float32 in [-1, 1] at SAMPLE_RATE
    events: list[dict[str, Any]]  # time-sorted; each {"kind", "onset", "offset", ...attributes}, seconds
    meta: dict[str, Any] = field(default_factory=dict)  # sources used (voices, soundfont, kit, bed), snr_db, ...

    @property
    def duration(self) -> float:
        return round(len(self.audio) / SAMPLE_RATE, 3)


@dataclass
class Question:
    """One phrased puzzle about a scene. `answer` is one of `choices`, or the open answer when `choices` is []."""

    category: str
    question: str
    template: str  # the phrasing-bank template id (`<category>/<train|heldout|follow>/<n>`)
    choices: list[str]
    choice_format: str | None  # the `phrasing` choice-format id; None for open questions
    answer: str
    answer_kind: AnswerKind
    evidence: list[list[float]]  # the tightest spans that decide the answer, seconds
    trace: str  # gold reasoning in the seg-tag format
    formats: list[str] = field(default_factory=list)  # the `phrasing` time/span format ids used in `question`


class SuiteItem(BaseModel):
    """One record of the suite: an MMAU record (first fields) plus what training, threads and checks need."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    id: str
    audio_id: str = Field(description='"./audio/<clip>.wav", relative to the JSON file')
    question: str
    choices: list[str] = Field(description="[] for an open question")
    answer: str
    dataset: str = SUITE_DATASET
    task: Domain = Field(description="MMAU's task: speech | music | sound")
    split: str
    category: str
    sub_category: str = Field(alias="sub-category")
    difficulty: str
    sources: SourceSplit = Field(description="train: training sources; heldout: voices/soundfont/kits never trained on")
    phrasing: PhrasingSplit = Field(description="heldout: templates and formats that never appear in training")
    template: str
    formats: list[str] = Field(description="time/span/choice format ids the question and choices use")
    choice_format: str | None
    answer_kind: AnswerKind
    thread: str | None = Field(description="thread id: turns of one conversation share it; None for single items")
    turn: int = Field(ge=0, description="0-based turn index within the thread")
    duration: float
    seed: int
    evidence: list[list[float]]
    trace: str
    events: list[dict[str, Any]]
    scene: dict[str, Any] = Field(description="the scene's sources and mixing settings")


# ------------------------------------------------------------------------------------------------ helpers


def seg(a: float, b: float) -> str:
    """The seg tag the protocol parses: ``<seg>3.0, 7.5</seg>``."""
    return f"<seg>{a:.1f}, {b:.1f}</seg>"


def balanced(key: Sequence[int | str], slot: int, combos: Sequence[Any]) -> Any:
    """Combination number `slot` of a shuffled run of blocks of all `combos`: each block holds every
    combination once, so answers and answer positions are exactly balanced per block. `key` names the
    stream (suite seed, domain, category...)."""
    block, pos = divmod(slot, len(combos))
    words = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "big") for k in key]
    ss = np.random.SeedSequence([*words, block, 0xBA1A])
    return combos[int(np.random.default_rng(ss).permutation(len(combos))[pos])]


def cache_root() -> Path:
    """Where renders are cached: `$ECHO_RENDER_CACHE`, else `~/.cache/echo-agent/renders`."""
    env = os.environ.get("ECHO_RENDER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "echo-agent" / "renders"


def cached_audio(key: Sequence[object], make: Callable[[], Waveform]) -> Waveform:
    """`make()` once per `key` (e.g. ("espeak-ng", voice, text)); later calls, in any process, read the cache.

    The file is written to a unique temporary name and renamed, so parallel workers never read half a file.
    """
    digest = hashlib.sha256("\x00".join(map(str, key)).encode()).hexdigest()
    path = cache_root() / digest[:2] / f"{digest}.npy"
    if path.exists():
        try:
            cached: Waveform = np.load(path).astype(np.float32, copy=False)
            return cached
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a corrupt cache entry is re-rendered, never trusted
    wav = np.asarray(make(), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, wav)
    tmp.replace(path)
    return wav


def place(track: npt.NDArray[np.float64], wav: Waveform, onset: float, gain: float = 1.0) -> tuple[float, float]:
    """Add `wav` into `track` at `onset` seconds (clipped at the end); returns (onset, offset) in seconds."""
    start = round(onset * SAMPLE_RATE)
    end = min(len(track), start + len(wav))
    track[start:end] += gain * wav[: end - start]
    return start / SAMPLE_RATE, end / SAMPLE_RATE


def mix_at_snr(
    foreground: npt.NDArray[np.float64], bed: npt.NDArray[np.float64], snr_db: float, active: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float64]:
    """foreground + bed scaled so foreground power (over `active` samples) / bed power = `snr_db`."""
    sig = float(np.mean(foreground[active] ** 2)) if active.any() else 0.0
    noise = float(np.mean(bed**2)) or 1.0
    scale = np.sqrt(sig / (noise * 10 ** (snr_db / 10))) if sig > 0 else 0.0
    return foreground + scale * bed


def peak_normalise(x: npt.NDArray[np.float64], peak: float = 0.9) -> Waveform:
    """Scale to `peak` and quantise to what a 16-bit WAV holds, so the returned array equals the file's content."""
    m = float(np.max(np.abs(x))) or 1.0
    pcm = np.round(x * (peak / m) * 32767).astype(np.int16)
    return pcm.astype(np.float32) / 32768.0
