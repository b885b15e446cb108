"""The audio store: validated, content-addressed, cached audio.

Graph state (checkpointed, serialised, sent between nodes) only ever holds an `AudioRef`, a small frozen
record naming the audio by the sha256 of its bytes. The samples live here, keyed by that hash, so a
checkpoint stays tiny and a listen call can cut a slice without copying the clip.

Every file is checked once, on `load`, against `AudioLimits`: it must exist and fit the byte limit; its header
must declare a sample rate and channel count in range; it must decode to at most `max_duration` seconds and
`max_decoded_bytes` of samples, to at least `min_duration` seconds, and to finite samples only. Lengths are
checked from the header before decoding and again while the samples stream in, since a header can lie (a FLAC
or OGG length, an MP3 estimate). Failures raise typed `AudioError`s (from `echo_agent.errors`, plus the three
defined here) that name the file, never a raw `soundfile` exception or a MemoryError, so the CLI and server can
show a clear message. docs/serving.md ("Audio limits") documents the limits.

Memory is linear in the audio: decoding downmixes each block to mono as it arrives (one mono float32 copy plus a
4 MiB block), and resampling fills one preallocated output chunk by chunk (`_resample`).

Decoding uses `soundfile` (libsndfile: WAV, FLAC, OGG/Vorbis, MP3, ...). `torchaudio.load` is avoided
because it needs torchcodec, which is not installed; torchaudio is only used for resampling.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile as sf
from pydantic import BaseModel, ConfigDict, Field, computed_field

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

__all__ = [
    "AudioLimits",
    "AudioRef",
    "AudioStore",
    "AudioTooShortError",
    "DecodedAudioTooLargeError",
    "UnsupportedAudioError",
]

Waveform = npt.NDArray[np.float32]

_HASH_CHUNK = 1024 * 1024
_MIB = 1024 * 1024
# libsndfile reports an unknown length (a FLAC whose STREAMINFO says 0 samples) as SF_COUNT_MAX; any count this
# large is no length at all, so such a stream is counted as it decodes instead.
_UNKNOWN_FRAMES = 1 << 62
_BLOCK_SAMPLES = 1 << 20  # samples (frames x channels) per decode block: 4 MiB of float32


class AudioTooShortError(AudioError):
    """The clip is shorter than `AudioLimits.min_duration`: too short for the models' audio encoders."""


class UnsupportedAudioError(AudioDecodeError):
    """The header declares a sample rate or channel count outside `AudioLimits`."""


class DecodedAudioTooLargeError(AudioError):
    """The decoded samples (frames x channels x 4 bytes) exceed `AudioLimits.max_decoded_bytes`.

    Not an `AudioTooLargeError`: that one is about the file's bytes, and a small compressed file can decode to
    gigabytes."""


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
    """Input limits, so a huge, hour-long or hostile file fails fast with a clear error instead of exhausting
    memory or time. docs/serving.md ("Audio limits") explains each default."""

    max_bytes: int = Field(512 * _MIB, gt=0)
    """Size of the file or upload, in bytes."""
    max_duration: float = Field(3600.0, gt=0)
    """Seconds."""
    min_duration: float = Field(0.1, ge=0)
    """Seconds. Shorter clips are refused, not padded: Whisper-style features need more than 200 samples at 16 kHz
    (echo-tiny, Qwen2.5-Omni) and Qwen2-Audio at least 961 (two audio tokens); 0.1 s leaves a margin for both."""
    max_decoded_bytes: int = Field(256 * _MIB, gt=0)
    """frames x channels x 4 (float32): what decoding produces, whatever the file's compression. The default admits
    70 min of 16 kHz mono, 11.6 min of 48 kHz stereo, 40 s of 32 channels at 48 kHz."""
    min_sample_rate: int = Field(1000, gt=0)
    """Hz. Lower rates are not audio a model can use, and upsampling them multiplies the samples."""
    max_sample_rate: int = Field(384_000, gt=0)
    """Hz. The highest rate that real converters record at."""
    max_channels: int = Field(32, gt=0)
    """Channels in the file (they are downmixed to mono)."""


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

    The cache is keyed by (sha256, sample_rate) and bounded to `max_cached` waveforms and `max_cached_bytes` of
    samples (the newest waveform is kept even when it alone is larger). A ref whose samples were evicted, or that
    comes from state saved by another process, is re-read from `ref.path` and must still hash to `ref.sha256`.
    """

    def __init__(
        self, limits: AudioLimits | None = None, max_cached: int = 32, max_cached_bytes: int = 256 * _MIB
    ) -> None:
        if max_cached < 1:
            raise ValueError(f"max_cached must be >= 1, got {max_cached}")
        if max_cached_bytes < 1:
            raise ValueError(f"max_cached_bytes must be >= 1, got {max_cached_bytes}")
        self.limits = limits if limits is not None else AudioLimits()
        self.max_cached = max_cached
        # A byte bound as well as a count: a few long clips at a high rate would otherwise stay resident (and a
        # long clip's native-rate copy is dropped once its model-rate copy is made).
        self.max_cached_bytes = max_cached_bytes
        self._cache: OrderedDict[tuple[str, int], Waveform] = OrderedDict()
        self._cached_bytes = 0
        # sha -> (sample_rate, channels, frames) of audio that already passed validation. Tiny, so it is
        # kept even when the samples are evicted: loading the same file again then needs no decode.
        self._meta: dict[str, tuple[int, int, int]] = {}
        self._decodes = 0
        # LangGraph may run sync nodes in worker threads; the lock keeps the cache consistent.
        # Decoding happens outside it.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading

    def load(self, path: str | os.PathLike[str], name: str | None = None) -> AudioRef:
        """Validate and decode the file at `path` (once per content hash) and return a reference to it. Errors
        name the file `name` (default: its path; a server's upload is "uploaded audio", not its scratch path)."""
        p = Path(path).expanduser().absolute()
        self._stat_file(p, name)
        sha = _hash_file(p)
        with self._lock:
            meta = self._meta.get(sha)
        if meta is not None:
            return AudioRef(sha256=sha, path=str(p), sample_rate=meta[0], channels=meta[1], frames=meta[2])
        decoded = self._decode(p, name or str(p))
        return self._remember(sha, str(p), decoded)

    def load_bytes(self, data: bytes, name: str = "<bytes>") -> AudioRef:
        """Validate and decode in-memory audio (an upload). `name` is only used in error messages.

        The returned ref has `path=""`: if its samples are evicted from the cache they cannot be reloaded,
        so size `max_cached` and `max_cached_bytes` for the uploads a session keeps using.
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
        """The mono float32 waveform of `ref` at `sample_rate`. Read-only: it is shared by every caller.

        `sample_rate` must lie within the limits' sample-rate range (a caller's choice, not user input: outside
        it, resampling would cost unbounded memory).
        """
        lim = self.limits
        if not lim.min_sample_rate <= sample_rate <= lim.max_sample_rate:
            raise ValueError(
                f"sample_rate must be within {lim.min_sample_rate}-{lim.max_sample_rate} Hz, got {sample_rate}"
            )
        cached = self._get(ref.sha256, sample_rate)
        if cached is not None:
            return cached
        native = self._get(ref.sha256, ref.sample_rate)
        if native is None:
            native = self._reload(ref)
        if sample_rate == ref.sample_rate:
            return native
        name = ref.path or f"in-memory audio {ref.sha256[:12]}"
        resampled = _readonly(_resample(native, ref.sample_rate, sample_rate, name))
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

    def _stat_file(self, p: Path, name: str | None = None) -> None:
        """Check `p` is a readable regular file within the byte limit, before reading any of it."""
        shown = name or str(p)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise AudioNotFoundError(f"{shown}: no such file") from None
        except OSError as e:
            raise AudioNotFoundError(f"{shown}: cannot access file ({e.strerror})") from None
        except ValueError:  # os.stat refuses an embedded NUL byte
            shown = str(p).replace("\0", "\\0")
            raise AudioNotFoundError(f"{shown}: not a valid path (it contains a NUL byte)") from None
        if not p.is_file():
            raise AudioNotFoundError(f"{shown}: not a regular file")
        if st.st_size > self.limits.max_bytes:
            raise AudioTooLargeError(f"{shown}: {st.st_size} bytes is over the limit of {self.limits.max_bytes} bytes")

    def _decode(self, source: Path | io.BytesIO, name: str) -> _Decoded:
        """Decode and validate; every failure becomes a typed `AudioError` naming `name`."""
        try:
            with sf.SoundFile(source if isinstance(source, io.BytesIO) else str(source)) as f:
                sr, channels, header_frames = int(f.samplerate), int(f.channels), int(f.frames)
                self._check_header(name, sr, channels, header_frames)
                with self._lock:
                    self._decodes += 1
                mono = self._stream(f, name, sr, channels, header_frames)
        except AudioError:
            raise
        except MemoryError:  # a backstop: the limits above are meant to make this unreachable
            raise DecodedAudioTooLargeError(f"{name}: not enough memory to decode this audio") from None
        except (sf.SoundFileError, RuntimeError, ValueError, TypeError, OSError) as e:
            if isinstance(source, Path) and not source.exists():
                raise AudioNotFoundError(f"{name}: no such file") from None
            raise AudioDecodeError(f"{name}: cannot decode audio ({_reason(e)})") from None
        lim = self.limits
        if mono.shape[0] / sr < lim.min_duration:
            raise AudioTooShortError(
                f"{name}: {mono.shape[0]} samples ({1000 * mono.shape[0] / sr:.1f} ms) is shorter than the minimum "
                f"of {lim.min_duration:g} s ({math.ceil(lim.min_duration * sr)} samples at {sr} Hz)"
            )
        return _Decoded(_readonly(mono), sr, channels)

    def _check_header(self, name: str, sr: int, channels: int, frames: int) -> None:
        """Refuse, before decoding anything, what the header alone shows to be out of limits."""
        lim = self.limits
        if not lim.min_sample_rate <= sr <= lim.max_sample_rate:
            raise UnsupportedAudioError(
                f"{name}: sample rate {sr} Hz is outside the supported {lim.min_sample_rate}-{lim.max_sample_rate} Hz"
            )
        if not 1 <= channels <= lim.max_channels:
            raise UnsupportedAudioError(f"{name}: {channels} channels is over the limit of {lim.max_channels}")
        if frames < _UNKNOWN_FRAMES:
            err = self._length_error(name, frames, sr, channels, at_least=False)
            if err is not None:
                raise err

    def _length_error(self, name: str, frames: int, sr: int, channels: int, *, at_least: bool) -> AudioError | None:
        """The error for `frames` over the duration or decoded-size limit, or None. `at_least`: decoding was
        stopped there, so the audio is at least that long."""
        lim = self.limits
        more = "more than " if at_least else ""
        duration = frames / sr
        if duration > lim.max_duration:
            return AudioTooLongError(f"{name}: {more}{duration:.1f} s is over the limit of {lim.max_duration:.1f} s")
        decoded = frames * channels * 4
        if decoded > lim.max_decoded_bytes:
            return DecodedAudioTooLargeError(
                f"{name}: {more}{decoded / _MIB:.1f} MiB of decoded samples ({frames} frames x {channels} channels "
                f"x 4 bytes) is over the limit of {lim.max_decoded_bytes / _MIB:.1f} MiB; "
                "use fewer channels, a lower sample rate or a shorter clip"
            )
        return None

    def _stream(self, f: sf.SoundFile, name: str, sr: int, channels: int, header_frames: int) -> Waveform:
        """Decode block by block into a mono buffer, counting frames against the limits as they arrive."""
        lim = self.limits
        limit_frames = min(math.floor(lim.max_duration * sr), lim.max_decoded_bytes // (4 * channels))
        block = np.empty((max(1, _BLOCK_SAMPLES // channels), channels), dtype=np.float32)
        # A header that states a length (checked above) sizes the buffer exactly; an unknown one grows it.
        out = np.empty(max(1, header_frames if header_frames < _UNKNOWN_FRAMES else block.shape[0]), np.float32)
        filled = 0
        while (n := _read_block(f, block)) > 0:
            if filled + n > limit_frames:
                err = self._length_error(name, filled + n, sr, channels, at_least=True)
                raise err if err is not None else DecodedAudioTooLargeError(f"{name}: audio over the limits")
            chunk = block[:n]
            if not np.isfinite(chunk).all():
                raise NonFiniteAudioError(f"{name}: audio contains NaN or infinite samples")
            if filled + n > out.shape[0]:
                grown = np.empty(min(max(2 * out.shape[0], filled + n), limit_frames), np.float32)
                grown[:filled] = out[:filled]
                out = grown
            dst = out[filled : filled + n]
            if channels == 1:
                dst[:] = chunk[:, 0]
            else:
                # Mean over channels: a neutral downmix for any layout (stereo, 5.1, ...).
                np.mean(chunk, axis=1, dtype=np.float32, out=dst)
            filled += n
        if filled == 0:
            raise EmptyAudioError(f"{name}: audio has no samples")
        if filled < out.shape[0]:  # the header overstated the length (MP3 estimates do)
            out.resize((filled,), refcheck=False)
        return out

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
            old = self._cache.pop(key, None)
            if old is not None:
                self._cached_bytes -= old.nbytes
            self._cache[key] = wav
            self._cached_bytes += wav.nbytes
            while len(self._cache) > 1 and (
                len(self._cache) > self.max_cached or self._cached_bytes > self.max_cached_bytes
            ):
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes


def _read_block(f: sf.SoundFile, block: Waveform) -> int:
    """Fill `block` (frames x channels, C-contiguous) from the current position; return the frames read.

    soundfile's own `read()` calls tell() and seek() around every block, and libsndfile's FLAC seek fails
    ("Internal psf_fseek() failed") when STREAMINFO's length is unknown or wrong. The C read call streams such
    files like any other, and stops where the data really ends, so it also counts the true length.
    """
    lib, ffi, handle = sf._snd, sf._ffi, getattr(f, "_file")  # noqa: B009 (private: no public equivalent)
    n = int(lib.sf_readf_float(handle, ffi.cast("float *", block.ctypes.data), block.shape[0]))
    code = int(lib.sf_error(handle))
    if code:
        raise sf.LibsndfileError(code)
    return n


# A Python repr such as "<_io.BytesIO object at 0x7f...>" that libsndfile's messages would otherwise carry.
_REPR_RE = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_UNRECOGNISED = "not a recognised audio format, or corrupt data"


def _reason(e: BaseException) -> str:
    """A short, repr-free reason for a decode failure."""
    text = str(e)
    if isinstance(e, sf.LibsndfileError):
        text = e.error_string
        # The file was found and stat'ed before decoding, so libsndfile's "does not exist" (what its MP3 reader
        # says for undecodable data) and its garbled message under concurrency both mean unreadable data.
        if text.startswith(("File does not exist", "(Garbled")):
            text = _UNRECOGNISED
    text = _REPR_RE.sub("the data", text).strip().rstrip(".")[:200]
    return text[:1].lower() + text[1:] if text else _UNRECOGNISED


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


# ---------------------------------------------------------------------- resampling
#
# torchaudio's `resample` builds an (up, down + 2 * width) kernel for the ratio new/orig reduced by their gcd: a
# few hundred kilobytes for 44.1 or 48 kHz, but 1.4 GB for 22,051 Hz (gcd 1), whose building then takes 5-6 GB.
# Ratios with a small kernel keep torchaudio's own kernel (so their output is bit-identical to
# `torchaudio.functional.resample`), applied chunk by chunk instead of to one padded copy of the whole clip.
# Other ratios go through a polyphase resampler with the same windowed-sinc filter, one row of taps per output
# phase (at most `_TABLE_MAX` taps in all), so memory stays linear in the audio for any pair of rates.

_LOWPASS_WIDTH = 6  # zero crossings each side, torchaudio's default
_ROLLOFF = 0.99  # cutoff as a fraction of the lower Nyquist, torchaudio's default
_KERNEL_MAX = 1 << 20  # elements of a torchaudio kernel that is still cheap to build
_TABLE_MAX = 1 << 21  # elements of the polyphase table (phases x taps)
_CHUNK_IN = 1 << 18  # input samples per torchaudio convolution
_CHUNK_TAPS = 1 << 20  # output samples x taps per polyphase step


def _resample(wav: Waveform, orig: int, new: int, name: str) -> Waveform:
    """`wav` from `orig` to `new` Hz: ceil(n * new / orig) samples, as torchaudio gives."""
    g = math.gcd(orig, new)
    up, down = new // g, orig // g
    width = math.ceil(_LOWPASS_WIDTH * down / (min(up, down) * _ROLLOFF))
    n = int(wav.shape[0])
    out: Waveform = np.empty(-(-n * up // down), dtype=np.float32)
    kernel = _torchaudio_kernel(orig, new, g) if up * (down + 2 * width) <= _KERNEL_MAX else None
    if kernel is not None:
        _apply_kernel(wav, out, up, down, *kernel)
    else:
        _polyphase(wav, out, orig, new, up, down)
    # Finite input can still overflow float32 in the filter (samples near 3e38).
    for i in range(0, out.shape[0], _CHUNK_TAPS):
        if not np.isfinite(out[i : i + _CHUNK_TAPS]).all():
            raise NonFiniteAudioError(f"{name}: samples overflow when resampled to {new} Hz")
    return out


def _torchaudio_kernel(orig: int, new: int, g: int) -> tuple[Any, int] | None:
    """torchaudio's own kernel and width for this ratio (the ones `resample` uses), or None if this torchaudio
    no longer has the (private) builder."""
    # Imported lazily: torch is slow to import and only needed when rates differ.
    import torch
    from torchaudio.functional import functional as taf

    build = getattr(taf, "_get_sinc_resample_kernel", None)
    if build is None:
        return None
    kernel, width = build(orig, new, g, _LOWPASS_WIDTH, _ROLLOFF, "sinc_interp_hann", None, torch.device("cpu"),
                          torch.float32)  # fmt: skip
    return kernel, int(width)


def _apply_kernel(wav: Waveform, out: Waveform, up: int, down: int, kernel: Any, width: int) -> None:
    """torchaudio's `_apply_sinc_resample_kernel`, a chunk of output groups at a time.

    Group k (outputs k*up .. k*up + up - 1) reads input k*down - width .. k*down + down + width, with zeros past
    either end, exactly as torchaudio's padded convolution does; the same dot products give the same floats.
    """
    import torch

    n, total = int(wav.shape[0]), int(out.shape[0])
    groups = n // down + 1
    step = max(1, _CHUNK_IN // down)
    for k0 in range(0, groups, step):
        o0 = k0 * up
        if o0 >= total:
            break
        k1 = min(groups, k0 + step)
        lo, hi = k0 * down - width, k1 * down + width
        seg = np.zeros(hi - lo, dtype=np.float32)
        a, b = max(lo, 0), min(hi, n)
        seg[a - lo : b - lo] = wav[a:b]
        y = torch.nn.functional.conv1d(torch.from_numpy(seg)[None, None], kernel, stride=down)
        flat = y[0].transpose(0, 1).reshape(-1).numpy()
        o1 = min(total, k1 * up)
        out[o0:o1] = flat[: o1 - o0]


def _polyphase(wav: Waveform, out: Waveform, orig: int, new: int, up: int, down: int) -> None:
    """Windowed-sinc resampling for any ratio: output m sits at input position m * down / up, and takes the taps
    of its fractional phase. With more phases than `_TABLE_MAX` allows, the phase is rounded to the nearest of
    those there are (under 1e-8 s of timing error at any supported rate)."""
    base = min(orig, new) * _ROLLOFF  # cutoff, Hz
    half = _LOWPASS_WIDTH * orig / base  # filter half-width, in input samples
    k_lo, k_hi = -math.floor(half), math.floor(half) + 1  # tap offsets around floor(position)
    taps = k_hi - k_lo + 1
    phases = min(up, max(1, _TABLE_MAX // taps))
    # torchaudio's filter (sinc_interp_hann), evaluated in float64 at each phase's tap offsets, a few rows at a
    # time so the float64 temporaries stay small.
    table = np.empty((phases, taps), dtype=np.float32)
    offsets = np.arange(k_lo, k_hi + 1, dtype=np.float64)[None, :]
    rows = max(1, (1 << 16) // taps)
    for p0 in range(0, phases, rows):
        frac = np.arange(p0, min(phases, p0 + rows), dtype=np.float64)[:, None] / phases
        t = np.clip((offsets - frac) * (base / orig), -_LOWPASS_WIDTH, _LOWPASS_WIDTH)
        table[p0 : p0 + frac.shape[0]] = np.sinc(t) * np.cos(t * (math.pi / (2 * _LOWPASS_WIDTH))) ** 2 * (base / orig)
    n, total = int(wav.shape[0]), int(out.shape[0])
    step = max(256, _CHUNK_TAPS // taps)
    for m0 in range(0, total, step):
        num = np.arange(m0, min(total, m0 + step), dtype=np.int64) * down
        first, phase = num // up, num % up
        if phases != up:
            phase = (phase * phases + up // 2) // up
            carry = phase == phases
            first += carry
            phase[carry] = 0
        first += k_lo
        lo, hi = int(first[0]), int(first[-1]) + taps
        seg = np.zeros(hi - lo, dtype=np.float32)
        a, b = max(lo, 0), min(hi, n)
        if a < b:
            seg[a - lo : b - lo] = wav[a:b]
        windows = np.lib.stride_tricks.sliding_window_view(seg, taps)[first - lo]
        out[m0 : m0 + num.shape[0]] = np.einsum("ij,ij->i", windows, table[phase])
