"""The audio store: validated, content-addressed, cached audio.

Graph state (checkpointed, serialised, sent between nodes) only ever holds an `AudioRef`, a small frozen
record naming the audio by the sha256 of its bytes. The samples live here, keyed by that hash, so a
checkpoint stays tiny and a listen call can cut a slice without copying the clip.

Every file is checked once, on `load`: it must exist, fit the byte and duration limits, decode, be non-empty
and hold only finite samples. Failures raise the typed errors from `echo_agent.errors`, never a raw
`soundfile` exception, so the CLI and server can show a clear message.

Decoding uses `soundfile` (libsndfile: WAV, FLAC, OGG/Vorbis, MP3, ...). `torchaudio.load` is avoided
because it needs torchcodec, which is not installed; torchaudio is only used for resampling.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile as sf
from pydantic import BaseModel, ConfigDict, computed_field

from echo_agent.errors import (
    AudioChangedError,
    AudioDecodeError,
    AudioError,
    AudioNotFoundError,
    AudioTooLargeError,
    AudioTooLongError,
    EmptyAudioError,
    NonFiniteAudioError,
)

__all__ = ["AudioLimits", "AudioRef", "AudioStore"]

Waveform = npt.NDArray[np.float32]

_HASH_CHUNK = 1024 * 1024


class AudioRef(BaseModel):
    """A reference to validated audio. Safe to checkpoint: it holds no samples."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    """Hex sha256 of the file bytes; the cache key, and the check that a reloaded file is unchanged."""
    path: str
    """Absolute path the audio was loaded from; "" for in-memory bytes (uploads)."""
    sample_rate: int
    """Native sample rate of the file."""
    channels: int
    frames: int
    """Number of frames at the native rate."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


class AudioLimits(BaseModel):
    """Input limits, so a huge or hour-long upload fails fast instead of exhausting memory."""

    max_bytes: int = 512 * 1024 * 1024
    max_duration: float = 3600.0
    """Seconds."""


class _Decoded:
    """Result of decoding one file: its metadata and the native-rate mono waveform."""

    __slots__ = ("channels", "frames", "mono", "sample_rate")

    def __init__(self, mono: Waveform, sample_rate: int, channels: int) -> None:
        self.mono = mono
        self.sample_rate = sample_rate
        self.channels = channels
        self.frames = int(mono.shape[0])


class AudioStore:
    """Loads and validates audio once, then serves mono float32 waveforms at any rate from an LRU cache.

    The cache is keyed by (sha256, sample_rate) and bounded to `max_cached` waveforms. A ref whose samples
    were evicted, or that comes from state saved by another process, is re-read from `ref.path` and must
    still hash to `ref.sha256`.
    """

    def __init__(self, limits: AudioLimits | None = None, max_cached: int = 32) -> None:
        if max_cached < 1:
            raise ValueError(f"max_cached must be >= 1, got {max_cached}")
        self.limits = limits if limits is not None else AudioLimits()
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple[str, int], Waveform] = OrderedDict()
        # sha -> (sample_rate, channels, frames) of audio that already passed validation. Tiny, so it is
        # kept even when the samples are evicted: loading the same file again then needs no decode.
        self._meta: dict[str, tuple[int, int, int]] = {}
        self._decodes = 0
        # LangGraph may run sync nodes in worker threads; the lock keeps the cache consistent.
        # Decoding happens outside it.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading

    def load(self, path: str | os.PathLike[str]) -> AudioRef:
        """Validate and decode the file at `path` (once per content hash) and return a reference to it."""
        p = Path(path).expanduser().absolute()
        self._stat_file(p)
        sha = _hash_file(p)
        with self._lock:
            meta = self._meta.get(sha)
        if meta is not None:
            return AudioRef(sha256=sha, path=str(p), sample_rate=meta[0], channels=meta[1], frames=meta[2])
        decoded = self._decode(p, str(p))
        return self._remember(sha, str(p), decoded)

    def load_bytes(self, data: bytes, name: str = "<bytes>") -> AudioRef:
        """Validate and decode in-memory audio (an upload). `name` is only used in error messages.

        The returned ref has `path=""`: if its samples are evicted from the cache they cannot be reloaded,
        so size `max_cached` for the uploads a session keeps using.
        """
        if len(data) > self.limits.max_bytes:
            raise AudioTooLargeError(f"{name}: {len(data)} bytes is over the limit of {self.limits.max_bytes} bytes")
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            meta = self._meta.get(sha)
        if meta is not None:
            return AudioRef(sha256=sha, path="", sample_rate=meta[0], channels=meta[1], frames=meta[2])
        decoded = self._decode(io.BytesIO(data), name)
        return self._remember(sha, "", decoded)

    def decode_count(self) -> int:
        """How many times audio has been decoded (file or bytes); lets tests check caching."""
        with self._lock:
            return self._decodes

    # ------------------------------------------------------------------ serving samples

    def waveform(self, ref: AudioRef, sample_rate: int) -> Waveform:
        """The mono float32 waveform of `ref` at `sample_rate`. Read-only: it is shared by every caller."""
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        cached = self._get(ref.sha256, sample_rate)
        if cached is not None:
            return cached
        native = self._get(ref.sha256, ref.sample_rate)
        if native is None:
            native = self._reload(ref)
        if sample_rate == ref.sample_rate:
            return native
        resampled = _readonly(_resample(native, ref.sample_rate, sample_rate))
        self._put(ref.sha256, sample_rate, resampled)
        return resampled

    def slice(self, ref: AudioRef, start: float, end: float, sample_rate: int) -> Waveform:
        """Samples from `start` to `end` seconds, clamped to the clip, as a view of `waveform()` (no copy).

        Empty when `start >= end` or the range lies past the end of the clip.
        """
        if not (math.isfinite(start) and math.isfinite(end)):
            raise ValueError(f"slice bounds must be finite, got start={start}, end={end}")
        wav = self.waveform(ref, sample_rate)
        n = int(wav.shape[0])
        lo = min(max(round(start * sample_rate), 0), n)
        hi = min(max(round(end * sample_rate), lo), n)
        return wav[lo:hi]

    # ------------------------------------------------------------------ internals

    def _stat_file(self, p: Path) -> None:
        """Check `p` is a readable regular file within the byte limit, before reading any of it."""
        try:
            st = p.stat()
        except FileNotFoundError:
            raise AudioNotFoundError(f"{p}: no such file") from None
        except OSError as e:
            raise AudioNotFoundError(f"{p}: cannot access file ({e.strerror})") from None
        if not p.is_file():
            raise AudioNotFoundError(f"{p}: not a regular file")
        if st.st_size > self.limits.max_bytes:
            raise AudioTooLargeError(f"{p}: {st.st_size} bytes is over the limit of {self.limits.max_bytes} bytes")

    def _decode(self, source: Path | io.BytesIO, name: str) -> _Decoded:
        """Decode and validate; every failure becomes a typed `AudioError` naming `name`."""
        try:
            with sf.SoundFile(source if isinstance(source, io.BytesIO) else str(source)) as f:
                sr = int(f.samplerate)
                channels = int(f.channels)
                header_frames = int(f.frames)
                if sr <= 0 or channels <= 0:
                    raise AudioDecodeError(f"{name}: invalid header (sample rate {sr}, {channels} channels)")
                # Check the length from the header first, so an over-long file is refused before decoding.
                self._check_duration(name, header_frames, sr)
                data: Any = f.read(dtype="float32", always_2d=True)
        except AudioError:
            raise
        except FileNotFoundError:
            raise AudioNotFoundError(f"{name}: no such file") from None
        except (sf.SoundFileError, RuntimeError, ValueError, TypeError, OSError) as e:
            raise AudioDecodeError(f"{name}: cannot decode audio ({e})") from None
        with self._lock:
            self._decodes += 1
        frames = int(data.shape[0])
        if frames == 0:
            raise EmptyAudioError(f"{name}: audio has no samples")
        # Header frame counts can be estimates (e.g. MP3); check the decoded length too.
        self._check_duration(name, frames, sr)
        if not np.isfinite(data).all():
            raise NonFiniteAudioError(f"{name}: audio contains NaN or infinite samples")
        # Mean over channels: a neutral downmix for any layout (stereo, 5.1, ...).
        mono = data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32)
        return _Decoded(_readonly(np.ascontiguousarray(mono, dtype=np.float32)), sr, channels)

    def _check_duration(self, name: str, frames: int, sr: int) -> None:
        duration = frames / sr
        if duration > self.limits.max_duration:
            raise AudioTooLongError(f"{name}: {duration:.1f} s is over the limit of {self.limits.max_duration:.1f} s")

    def _remember(self, sha: str, path: str, d: _Decoded) -> AudioRef:
        with self._lock:
            self._meta[sha] = (d.sample_rate, d.channels, d.frames)
        self._put(sha, d.sample_rate, d.mono)
        return AudioRef(sha256=sha, path=path, sample_rate=d.sample_rate, channels=d.channels, frames=d.frames)

    def _reload(self, ref: AudioRef) -> Waveform:
        """Re-read a ref whose samples are not cached, refusing a file whose content has changed."""
        if not ref.path:
            raise AudioNotFoundError(
                f"in-memory audio {ref.sha256[:12]} is no longer cached and has no file to reload it from"
            )
        p = Path(ref.path)
        self._stat_file(p)
        sha = _hash_file(p)
        if sha != ref.sha256:
            raise AudioChangedError(
                f"{p}: file content changed since it was loaded (sha256 {ref.sha256[:12]} -> {sha[:12]})"
            )
        decoded = self._decode(p, str(p))
        self._remember(sha, ref.path, decoded)
        return decoded.mono

    def _get(self, sha: str, sample_rate: int) -> Waveform | None:
        key = (sha, sample_rate)
        with self._lock:
            wav = self._cache.get(key)
            if wav is not None:
                self._cache.move_to_end(key)
            return wav

    def _put(self, sha: str, sample_rate: int, wav: Waveform) -> None:
        key = (sha, sample_rate)
        with self._lock:
            self._cache[key] = wav
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)


def _hash_file(p: Path) -> str:
    """sha256 of the file, read in chunks so a large file is never held in memory just to hash it."""
    h = hashlib.sha256()
    try:
        with p.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except FileNotFoundError:
        raise AudioNotFoundError(f"{p}: no such file") from None
    except OSError as e:
        raise AudioNotFoundError(f"{p}: cannot read file ({e.strerror})") from None
    return h.hexdigest()


def _readonly(wav: Waveform) -> Waveform:
    # Cached arrays are shared by every caller (and slices are views of them): freeze them.
    wav.flags.writeable = False
    return wav


def _resample(wav: Waveform, orig: int, new: int) -> Waveform:
    # Imported lazily: torch is slow to import and only needed when rates differ.
    import torch
    import torchaudio.functional as taf

    # Copy: torch warns on (and must not write to) the read-only cached array.
    out = taf.resample(torch.from_numpy(wav.copy()), orig, new)
    result: Waveform = out.numpy().astype(np.float32, copy=False)
    return result
