"""Tests for the audio store, on real files written with soundfile (no mocks)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_agent.audio import AudioLimits, AudioRef, AudioStore
from echo_agent.errors import (
    AudioChangedError,
    AudioDecodeError,
    AudioNotFoundError,
    AudioTooLargeError,
    AudioTooLongError,
    EchoError,
    EmptyAudioError,
    NonFiniteAudioError,
)


def sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, data: np.ndarray, sr: int, **kw: str) -> Path:
    sf.write(str(path), data, sr, **kw)
    return path


def wav_bytes(data: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    return write(tmp_path / "tone.wav", sine(440, 16000, 1.0), 16000, subtype="PCM_16")


def _mp3_writable() -> bool:
    return "MP3" in sf.available_formats() and "MPEG_LAYER_III" in sf.available_subtypes("MP3")


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("ext", "fmt", "subtype", "tol"),
    [
        ("wav", "WAV", "PCM_16", 0.0),
        ("flac", "FLAC", "PCM_16", 0.0),
        ("ogg", "OGG", "VORBIS", 0.01),
        pytest.param(
            "mp3",
            "MP3",
            "MPEG_LAYER_III",
            0.06,
            marks=pytest.mark.skipif(not _mp3_writable(), reason="this libsndfile cannot write MP3"),
        ),
    ],
)
def test_formats_decode_to_right_duration(tmp_path: Path, ext: str, fmt: str, subtype: str, tol: float) -> None:
    path = write(tmp_path / f"clip.{ext}", sine(440, 16000, 1.5), 16000, format=fmt, subtype=subtype)
    store = AudioStore()
    ref = store.load(path)
    assert ref.sample_rate == 16000
    assert ref.channels == 1
    assert ref.duration == pytest.approx(1.5, abs=tol)
    assert ref.path == str(path.absolute())
    wav = store.waveform(ref, 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert len(wav) == ref.frames
    assert ref.model_dump()["duration"] == ref.duration


# ---------------------------------------------------------------- downmix and resampling


def test_stereo_opposite_channels_downmix_to_silence(tmp_path: Path) -> None:
    x = sine(440, 16000, 0.5)
    path = write(tmp_path / "stereo.wav", np.stack([x, -x], axis=1), 16000, subtype="FLOAT")
    store = AudioStore()
    ref = store.load(path)
    assert ref.channels == 2
    assert np.abs(store.waveform(ref, 16000)).max() < 1e-6


def test_six_channel_equal_channels_downmix_to_same_signal(tmp_path: Path) -> None:
    x = sine(300, 16000, 0.5)
    path = write(tmp_path / "surround.wav", np.tile(x[:, None], (1, 6)), 16000, subtype="FLOAT")
    store = AudioStore()
    ref = store.load(path)
    assert ref.channels == 6
    np.testing.assert_allclose(store.waveform(ref, 16000), x, atol=1e-6)


def test_resample_44k1_to_16k_keeps_length_and_frequency(tmp_path: Path) -> None:
    path = write(tmp_path / "hi.wav", sine(440, 44100, 1.0), 44100, subtype="FLOAT")
    store = AudioStore()
    ref = store.load(path)
    assert ref.sample_rate == 44100
    wav = store.waveform(ref, 16000)
    assert abs(len(wav) - 16000) <= 1
    assert wav.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(wav))
    freqs = np.fft.rfftfreq(len(wav), d=1 / 16000)
    assert freqs[int(np.argmax(spectrum))] == pytest.approx(440, abs=2)
    # Cached: the same array comes back, without another decode.
    assert store.waveform(ref, 16000) is wav
    assert store.decode_count() == 1


# ---------------------------------------------------------------- caching and hashing


def test_same_file_twice_decodes_once_and_copy_has_same_sha(tmp_path: Path, wav: Path) -> None:
    store = AudioStore()
    a = store.load(wav)
    b = store.load(str(wav))
    assert store.decode_count() == 1
    assert a == b
    copy = tmp_path / "sub" / "copy.wav"
    copy.parent.mkdir()
    shutil.copyfile(wav, copy)
    c = store.load(copy)
    assert c.sha256 == a.sha256
    assert c.path == str(copy.absolute())
    assert store.decode_count() == 1


def test_load_bytes_matches_file(wav: Path) -> None:
    store = AudioStore()
    ref = store.load_bytes(wav.read_bytes(), name="upload.wav")
    assert ref.path == ""
    assert ref.sha256 == AudioStore().load(wav).sha256
    assert len(store.waveform(ref, 16000)) == 16000


def test_lru_eviction_reloads_from_path(tmp_path: Path) -> None:
    store = AudioStore(max_cached=1)
    a = store.load(write(tmp_path / "a.wav", sine(440, 8000, 0.2), 8000))
    b = store.load(write(tmp_path / "b.wav", sine(880, 8000, 0.2), 8000))
    assert store.decode_count() == 2
    wa = store.waveform(a, 8000)  # evicted by b: re-read and re-hashed
    assert store.decode_count() == 3
    assert len(wa) == a.frames
    store.waveform(b, 8000)
    assert store.decode_count() == 4


def test_waveform_is_read_only(wav: Path) -> None:
    store = AudioStore()
    ref = store.load(wav)
    for w in (store.waveform(ref, 16000), store.waveform(ref, 8000), store.slice(ref, 0.1, 0.2, 16000)):
        assert not w.flags.writeable
        with pytest.raises(ValueError):
            w[0] = 1.0


# ---------------------------------------------------------------- slicing


def test_slice_is_a_view_with_right_length(wav: Path) -> None:
    store = AudioStore()
    ref = store.load(wav)
    full = store.waveform(ref, 16000)
    s = store.slice(ref, 0.25, 0.5, 16000)
    assert len(s) == 4000
    assert np.shares_memory(s, full)
    np.testing.assert_array_equal(s, full[4000:8000])
    # Also at a resampled rate.
    s8 = store.slice(ref, 0.25, 0.5, 8000)
    assert len(s8) == 2000
    assert np.shares_memory(s8, store.waveform(ref, 8000))


def test_slice_clamps_and_empty(wav: Path) -> None:
    store = AudioStore()
    ref = store.load(wav)
    assert len(store.slice(ref, 0.9, 5.0, 16000)) == 1600
    assert len(store.slice(ref, -1.0, 0.1, 16000)) == 1600
    assert len(store.slice(ref, 0.5, 0.5, 16000)) == 0
    assert len(store.slice(ref, 0.6, 0.4, 16000)) == 0
    assert len(store.slice(ref, 2.0, 3.0, 16000)) == 0


# One store shared by all hypothesis examples (a function-scoped fixture would not be reset between them).
_PROP_STORE = AudioStore()
_PROP_REF = _PROP_STORE.load_bytes(wav_bytes(sine(440, 8000, 1.0), 8000), name="prop.wav")


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(min_value=-2, max_value=3, allow_nan=False),
    end=st.floats(min_value=-2, max_value=3, allow_nan=False),
)
def test_slice_bounds_property(start: float, end: float) -> None:
    full = _PROP_STORE.waveform(_PROP_REF, 8000)
    s = _PROP_STORE.slice(_PROP_REF, start, end, 8000)
    lo = min(max(round(start * 8000), 0), len(full))
    hi = min(max(round(end * 8000), lo), len(full))
    assert len(s) == hi - lo
    assert len(s) == 0 or np.shares_memory(s, full)


# ---------------------------------------------------------------- bad input


def _assert_typed(exc: pytest.ExceptionInfo[Exception], name: str) -> None:
    assert isinstance(exc.value, EchoError)
    assert name in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioNotFoundError) as exc:
        AudioStore().load(tmp_path / "nope.wav")
    _assert_typed(exc, "nope.wav")


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "adir.wav"
    d.mkdir()
    with pytest.raises(AudioNotFoundError) as exc:
        AudioStore().load(d)
    _assert_typed(exc, "adir.wav")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.wav", b""),
        ("random.wav", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
        ("text.mp3", b"this is not audio at all\n" * 20),
    ],
)
def test_undecodable_files(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AudioDecodeError) as exc:
        AudioStore().load(path)
    _assert_typed(exc, name)


def test_truncated_header(tmp_path: Path, wav: Path) -> None:
    path = tmp_path / "trunc.wav"
    path.write_bytes(wav.read_bytes()[:20])
    with pytest.raises(AudioDecodeError) as exc:
        AudioStore().load(path)
    _assert_typed(exc, "trunc.wav")


def test_load_bytes_garbage() -> None:
    store = AudioStore()
    with pytest.raises(AudioDecodeError) as exc:
        store.load_bytes(b"\x00\x01garbage" * 100, name="upload.bin")
    _assert_typed(exc, "upload.bin")
    with pytest.raises(AudioDecodeError):
        store.load_bytes(b"", name="empty-upload")


def test_zero_length_audio(tmp_path: Path) -> None:
    path = write(tmp_path / "silent.wav", np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    with pytest.raises(EmptyAudioError) as exc:
        AudioStore().load(path)
    _assert_typed(exc, "silent.wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path: Path, bad: float) -> None:
    x = sine(440, 16000, 0.1)
    x[100] = bad
    path = write(tmp_path / "nan.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(NonFiniteAudioError) as exc:
        AudioStore().load(path)
    _assert_typed(exc, "nan.wav")


def test_too_large_refused_before_decoding(wav: Path) -> None:
    store = AudioStore(AudioLimits(max_bytes=1000))
    with pytest.raises(AudioTooLargeError) as exc:
        store.load(wav)
    _assert_typed(exc, wav.name)
    assert store.decode_count() == 0
    with pytest.raises(AudioTooLargeError) as exc2:
        store.load_bytes(wav.read_bytes(), name="big-upload.wav")
    _assert_typed(exc2, "big-upload.wav")


def test_too_long_refused_from_header(wav: Path) -> None:
    store = AudioStore(AudioLimits(max_duration=0.5))
    with pytest.raises(AudioTooLongError) as exc:
        store.load(wav)
    _assert_typed(exc, wav.name)
    assert store.decode_count() == 0


# ---------------------------------------------------------------- restart


def test_restart_reproduces_then_detects_change_and_deletion(wav: Path) -> None:
    first = AudioStore()
    ref = first.load(wav)
    expected = first.waveform(ref, 8000).copy()

    saved = AudioRef.model_validate(ref.model_dump())
    assert saved == ref

    fresh = AudioStore()
    np.testing.assert_array_equal(fresh.waveform(saved, 8000), expected)
    assert fresh.decode_count() == 1

    # Rewrite the file with different content, keeping the name.
    write(wav, sine(660, 16000, 1.0), 16000, subtype="PCM_16")
    with pytest.raises(AudioChangedError) as exc:
        AudioStore().waveform(saved, 16000)
    _assert_typed(exc, wav.name)

    os.remove(wav)
    with pytest.raises(AudioNotFoundError) as exc2:
        AudioStore().waveform(saved, 16000)
    _assert_typed(exc2, wav.name)


def test_evicted_in_memory_audio_is_reported() -> None:
    store = AudioStore(max_cached=1)
    a = store.load_bytes(wav_bytes(sine(440, 8000, 0.1), 8000), name="a")
    store.load_bytes(wav_bytes(sine(880, 8000, 0.1), 8000), name="b")
    with pytest.raises(AudioNotFoundError):
        store.waveform(a, 8000)
