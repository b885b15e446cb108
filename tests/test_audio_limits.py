"""Hostile audio against the store's limits (issue 14, items 1, 10 and 16): real files, written here with soundfile
or, where soundfile will not write the lie, byte by byte with struct. Every one must decode correctly within
bounded memory or fail with a typed `AudioError` that names the file; never a MemoryError or a traceback."""

from __future__ import annotations

import io
import math
import os
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as taf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echo_agent.audio import (
    AudioLimits,
    AudioStore,
    AudioTooShortError,
    DecodedAudioTooLargeError,
    UnsupportedAudioError,
    _polyphase,
)
from echo_agent.errors import (
    AudioDecodeError,
    AudioError,
    AudioNotFoundError,
    AudioTooLongError,
    NonFiniteAudioError,
)

MIB = 1024 * 1024


def tone(sr: int, seconds: float, channels: int = 1, freqs: tuple[float, ...] = (440.0,)) -> np.ndarray:
    """Sines (a different one per channel when several are given) at `sr`, shape (frames, channels)."""
    t = np.arange(round(sr * seconds)) / sr
    cols = [0.4 * np.sin(2 * np.pi * freqs[c % len(freqs)] * t) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def encoded(data: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def wav_header(sr: int, channels: int, bits: int, data_bytes: int) -> bytes:
    """A PCM WAV header that says whatever it is told (soundfile refuses to write most of these lies)."""
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, sr, (sr * align) & 0xFFFFFFFF, align & 0xFFFF, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_bytes)
    return b"RIFF" + struct.pack("<I", (len(body) + data_bytes) & 0xFFFFFFFF) + body


def flac_with_total(data: bytes, total: int) -> bytes:
    """`data` (a FLAC) with STREAMINFO's 36-bit total-samples field set to `total` (0 means unknown)."""
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO must be the first metadata block"
    out = bytearray(data)
    off = 8 + 10  # "fLaC", block header, min/max block size (2+2), min/max frame size (3+3)
    word = int.from_bytes(out[off : off + 8], "big")
    word = (word & ~((1 << 36) - 1)) | total
    out[off : off + 8] = word.to_bytes(8, "big")
    return bytes(out)


def expect(exc_type: type[AudioError], fn: Callable[[], object], *needles: str) -> AudioError:
    """`fn()` raises exactly a typed audio error whose message holds every needle and no Python repr."""
    with pytest.raises(AudioError) as info:
        fn()
    err = info.value
    assert isinstance(err, exc_type), f"{type(err).__name__}: {err}"
    msg = str(err)
    for needle in needles:
        assert needle in msg, msg
    assert "object at 0x" not in msg and "\n" not in msg, msg
    return err


def dominant_freq(wav: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), d=1 / sr)[int(np.argmax(spectrum))])


# ---------------------------------------------------------------- rates that do not divide 16 kHz


@pytest.mark.parametrize("sr", [22051, 44101, 96001])
def test_odd_rates_resample_correctly_in_bounded_memory(tmp_path: Path, sr: int) -> None:
    # The 4 KB 22,051 Hz WAV of the issue (8-bit, 0.18 s) drove torchaudio to 4.8-6.2 GB; 44,101 and 96,001 Hz
    # did the same. gcd(rate, 16000) = 1 for all three.
    seconds, subtype = (0.18, "PCM_U8") if sr == 22051 else (1.0, "PCM_16")
    path = tmp_path / f"odd{sr}.wav"
    sf.write(path, tone(sr, seconds, freqs=(1000.0,)), sr, subtype=subtype)
    if sr == 22051:
        assert path.stat().st_size < 4200
    store = AudioStore()
    ref = store.load(path)
    tracemalloc.start()
    try:
        wav = store.waveform(ref, 16000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * MIB, f"resampling {path.stat().st_size} bytes at {sr} Hz took {peak / MIB:.0f} MiB"
    assert len(wav) == math.ceil(ref.frames * 16000 / sr)
    assert wav.dtype == np.float32 and np.isfinite(wav).all()
    assert dominant_freq(wav, 16000) == pytest.approx(1000, abs=16000 / len(wav) + 1)


_ODD_RATES_RSS = """
import resource, sys
import numpy as np, soundfile as sf, torch  # torch first: its own pages are not what is measured
from echo_agent.audio import AudioStore
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in sys.argv[1:]:
    store = AudioStore()
    store.waveform(store.load(name), 16000)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_odd_rates_peak_rss_in_a_fresh_process(tmp_path: Path) -> None:
    # tracemalloc does not see torch's allocations, so the whole process is measured too: 4.8-6.2 GB before.
    paths = []
    for sr in (22051, 44101, 96001):
        paths.append(tmp_path / f"odd{sr}.wav")
        sf.write(paths[-1], tone(sr, 30.0), sr, subtype="PCM_16")
    proc = subprocess.run([sys.executable, "-c", _ODD_RATES_RSS, *map(str, paths)], capture_output=True, text=True,
                          timeout=300, check=True)  # fmt: skip
    grown = int(proc.stdout.split()[-1]) * 1024
    assert grown < 100 * MIB, f"peak RSS grew by {grown / MIB:.0f} MiB resampling 30 s clips"


@pytest.mark.parametrize("sr", [22051, 44101, 96001, 8001])
def test_odd_rate_resampling_matches_the_signal(sr: int) -> None:
    # Against the analytic signal at the output times (away from the zero-padded edges): an exact-ratio resampler
    # keeps both the frequencies and the timing, so the error stays at the filter's passband ripple.
    def signal(t: np.ndarray) -> np.ndarray:
        return 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234.5 * t + 0.3)

    x = signal(np.arange(2 * sr) / sr).astype(np.float32)
    store = AudioStore()
    ref = store.load_bytes(encoded(x, sr, "WAV", "FLOAT"), name="sines")
    y = store.waveform(ref, 16000)
    inner = slice(1600, len(y) - 1600)
    assert np.abs(y[inner] - signal(np.arange(len(y)) / 16000)[inner]).max() < 1e-3


@pytest.mark.parametrize(("sr", "channels"), [(44100, 1), (48000, 2), (22050, 1), (8000, 2), (11025, 6)])
def test_ordinary_rates_stay_bit_identical_to_torchaudio(tmp_path: Path, sr: int, channels: int) -> None:
    # What the store did before the limits: decode the whole file, mean the channels, torchaudio's resample.
    rng = np.random.default_rng(sr)
    x = (0.3 * rng.standard_normal((sr * 3 + 17, channels))).astype(np.float32)
    path = tmp_path / f"real{sr}.flac"
    sf.write(path, x, sr, subtype="PCM_24")
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    mono = data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32)
    expected = taf.resample(torch.from_numpy(np.ascontiguousarray(mono)), sr, 16000).numpy()
    store = AudioStore()
    ref = store.load(path)
    np.testing.assert_array_equal(store.waveform(ref, ref.sample_rate), mono)
    np.testing.assert_array_equal(store.waveform(ref, 16000), expected)


def test_polyphase_path_agrees_with_torchaudio_where_both_run() -> None:
    # The path odd rates take, forced on a ratio torchaudio can also do: the same filter, computed in float64.
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(44100 * 2 + 5)).astype(np.float32)
    expected = taf.resample(torch.from_numpy(x), 44100, 16000).numpy()
    out = np.empty_like(expected)
    _polyphase(x, out, 44100, 16000, 160, 441)
    assert np.abs(out - expected).max() < 1e-4


# ---------------------------------------------------------------- absurd headers


@pytest.mark.parametrize(
    ("label", "make"),
    [
        ("1 Hz", lambda: encoded(tone(1, 3500), 1, "WAV", "PCM_16")),  # the 7 KB file that cost 2.6 GB
        ("999 Hz", lambda: encoded(tone(999, 1), 999, "WAV", "PCM_16")),
        ("384001 Hz", lambda: encoded(tone(384001, 0.2), 384001, "WAV", "PCM_16")),
        ("655350 Hz", lambda: encoded(tone(655350, 0.5, channels=8), 655350, "FLAC", "PCM_16")),  # 3-3.9 GB before
        ("2000000 Hz", lambda: wav_header(2_000_000, 1, 16, 2000) + bytes(2000)),  # written byte by byte
    ],
)
def test_absurd_sample_rates_are_refused_before_decoding(label: str, make: Callable[[], bytes]) -> None:
    store = AudioStore()
    expect(UnsupportedAudioError, lambda: store.load_bytes(make(), name=f"rate-{label}"), f"rate-{label}", label,
           "1000-384000 Hz")  # fmt: skip
    assert store.decode_count() == 0


def test_the_rate_bounds_themselves_decode() -> None:
    store = AudioStore()
    for sr in (1000, 384000):
        ref = store.load_bytes(encoded(tone(sr, 0.5), sr, "WAV", "PCM_16"), name=f"{sr}")
        assert ref.sample_rate == sr
        assert len(store.waveform(ref, 16000)) == 8000


def test_255_channel_ogg_is_refused(tmp_path: Path) -> None:
    # A 20 KB OGG with 255 channels decoded to 490 MB.
    path = tmp_path / "many.ogg"
    sf.write(path, tone(16000, 0.5, channels=255), 16000, format="OGG", subtype="VORBIS")
    store = AudioStore()
    expect(UnsupportedAudioError, lambda: store.load(path), "many.ogg", "255 channels", "limit of 32")
    assert store.decode_count() == 0


@pytest.mark.parametrize(("sr", "channels"), [(16000, 65535), (16000, 1024), (4_000_000_000, 1), (0, 1), (16000, 0)])
def test_wav_headers_with_absurd_fields_are_decode_errors(sr: int, channels: int) -> None:
    # Some of these libsndfile refuses itself, the rest the store does: a typed error either way.
    size = min(max(channels, 1) * 2 * 4000, 1 << 16)  # some frames, not half a gigabyte of them
    data = wav_header(sr, channels, 16, size) + bytes(size)
    store = AudioStore()
    expect(AudioDecodeError, lambda: store.load_bytes(data, name="fields.wav"), "fields.wav")
    assert store.decode_count() == 0


@pytest.mark.parametrize("fmt", ["OGG", "WAV"])
def test_32_channels_decode_and_downmix(fmt: str) -> None:
    x = tone(16000, 0.5, channels=32, freqs=(300.0,))
    store = AudioStore()
    ref = store.load_bytes(encoded(x, 16000, fmt, "VORBIS" if fmt == "OGG" else "FLOAT"), name="32ch")
    assert ref.channels == 32
    tol = 0.05 if fmt == "OGG" else 1e-6
    np.testing.assert_allclose(store.waveform(ref, 16000), x[:, 0], atol=tol)


def test_many_channels_decode_into_one_mono_copy(tmp_path: Path) -> None:
    # Downmixed block by block: a 32-channel file costs its mono samples plus one block, not 32 copies.
    path = tmp_path / "wide.wav"
    sf.write(path, tone(48000, 10.0, channels=32), 48000, subtype="PCM_16")
    store = AudioStore()
    tracemalloc.start()
    try:
        ref = store.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    mono = ref.frames * 4
    assert ref.frames * ref.channels * 4 > 50 * MIB  # what decoding all channels at once would hold
    assert peak < mono + 12 * MIB, f"{peak / MIB:.1f} MiB for {mono / MIB:.1f} MiB of mono samples"


# ---------------------------------------------------------------- lengths that lie


def test_decoded_size_is_refused_from_the_header() -> None:
    # The 213 KB FLAC inside the server's 600 s and 32 MB limits that asked for 11.7 GiB: 384 kHz x 8 channels
    # claiming 599 s is 7 GB of float32, refused before a sample is decoded.
    data = flac_with_total(encoded(tone(384000, 0.2, channels=8), 384000, "FLAC", "PCM_16"), 599 * 384000)
    store = AudioStore(AudioLimits(max_bytes=32 * MIB, max_duration=600.0))
    expect(DecodedAudioTooLargeError, lambda: store.load_bytes(data, name="huge.flac"), "huge.flac",
           "8 channels", "over the limit of 256.0 MiB")  # fmt: skip
    assert store.decode_count() == 0


@pytest.mark.parametrize("total", [10**9, (1 << 36) - 1])
def test_flac_claiming_a_huge_length_is_refused_not_a_memory_error(total: int) -> None:
    data = flac_with_total(encoded(tone(16000, 1.0), 16000, "FLAC", "PCM_16"), total)
    store = AudioStore()
    expect(AudioTooLongError, lambda: store.load_bytes(data, name="liar.flac"), "liar.flac", "over the limit")
    assert store.decode_count() == 0


def test_flac_of_unknown_length_decodes_to_its_true_length(tmp_path: Path) -> None:
    # STREAMINFO total 0 means "unknown": it was refused as "576460752303423.5 s"; it is ordinary audio.
    x = tone(16000, 1.25)
    path = tmp_path / "streamed.flac"
    path.write_bytes(flac_with_total(encoded(x, 16000, "FLAC", "PCM_16"), 0))
    with sf.SoundFile(path) as f:
        assert f.frames > 1 << 62  # what libsndfile reports for it
    store = AudioStore()
    ref = store.load(path)
    assert ref.frames == len(x)
    np.testing.assert_allclose(store.waveform(ref, 16000), x[:, 0], atol=1 / 32768)


def test_unknown_length_stream_is_cut_at_the_limits_while_decoding() -> None:
    # A header cannot be trusted, so the frames are counted as they stream in; memory stays near the limit.
    data = flac_with_total(encoded(np.zeros((48000 * 12, 8), np.float32), 48000, "FLAC", "PCM_16"), 0)
    assert len(data) < 200_000  # silence: a small file that decodes to 18 MB
    small = AudioStore(AudioLimits(max_decoded_bytes=4 * MIB))
    tracemalloc.start()
    try:
        expect(DecodedAudioTooLargeError, lambda: small.load_bytes(data, name="silence.flac"), "silence.flac",
               "more than", "over the limit of 4.0 MiB")  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB
    expect(AudioTooLongError, lambda: AudioStore(AudioLimits(max_duration=5.0)).load_bytes(data, name="s.flac"),
           "s.flac", "more than", "limit of 5.0 s")  # fmt: skip


def test_wav_whose_data_size_overstates_the_file_decodes_what_is_there() -> None:
    pcm = (tone(16000, 0.5)[:, 0] * 32767).astype("<i2").tobytes()
    for claimed in (0xFFFFFFFF, len(pcm) * 1000):
        ref = AudioStore().load_bytes(wav_header(16000, 1, 16, claimed) + pcm, name="liar.wav")
        assert ref.frames == 8000


def test_wav_header_claiming_hours_at_a_high_rate_is_refused_from_the_header() -> None:
    # 384 kHz x 32 channels, 4 GB of data claimed, 8 KB present.
    data = wav_header(384000, 32, 16, 0xFFFFFF00) + bytes(8192)
    expect(AudioError, lambda: AudioStore().load_bytes(data, name="claim.wav"), "claim.wav")


# ---------------------------------------------------------------- too short for the encoders


def test_clip_shorter_than_the_minimum_is_refused_with_the_minimum(tmp_path: Path) -> None:
    path = tmp_path / "blip.wav"
    sf.write(path, tone(16000, 100 / 16000), 16000)  # 100 samples: crashed the processor
    expect(AudioTooShortError, lambda: AudioStore().load(path), "blip.wav", "100 samples", "6.2 ms",
           "minimum of 0.1 s", "1600 samples at 16000 Hz")  # fmt: skip
    data = encoded(tone(44100, 0.05), 44100, "WAV", "PCM_16")
    expect(AudioTooShortError, lambda: AudioStore().load_bytes(data, name="blip"), "blip", "4410 samples at 44100 Hz")


@pytest.mark.parametrize("model", ["echo-tiny", "tiny-random-qwen2-audio", "tiny-random-qwen2.5-omni"])
async def test_a_clip_of_the_minimum_length_runs_on_every_model(tmp_path: Path, model: str) -> None:
    # The minimum is what the encoders need: Whisper-style STFTs more than 200 samples, Qwen2-Audio two audio
    # tokens (961 samples); a clip just at it must go through each model without a crash.
    from echo_agent import EchoAgent, SamplingParams, load_backend

    limits = AudioLimits()
    frames = math.ceil(limits.min_duration * 16000)
    path = tmp_path / "shortest.wav"
    sf.write(path, tone(16000, frames / 16000), 16000)
    agent = EchoAgent(load_backend(model), store=AudioStore(limits))
    result = await agent.ask(path, "What is it?", ["a", "b"], sampling=SamplingParams(max_new_tokens=2))
    assert result.status in ("answered", "no_answer")
    expect(AudioTooShortError, lambda: AudioStore(limits).load_bytes(encoded(tone(16000, (frames - 1) / 16000),
           16000, "WAV", "PCM_16"), name="one-short"), "one-short")  # fmt: skip


# ---------------------------------------------------------------- messages


def test_undecodable_bytes_name_the_upload_not_a_python_repr() -> None:
    err = expect(AudioDecodeError, lambda: AudioStore().load_bytes(b"\x00garbage" * 64, name="uploaded audio"),
                 "uploaded audio: cannot decode audio")  # fmt: skip
    assert "BytesIO" not in str(err)


def test_undecodable_mp3_does_not_claim_the_file_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp3"
    path.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" + bytes(400))
    err = expect(AudioDecodeError, lambda: AudioStore().load(path), "broken.mp3", "not a recognised audio format")
    assert "does not exist" not in str(err)


def test_nul_byte_in_a_path_is_a_typed_error() -> None:
    expect(AudioNotFoundError, lambda: AudioStore().load("clip\0.wav"), "clip\\0.wav", "NUL byte")


def test_overflow_in_resampling_is_a_typed_error() -> None:
    # A full-scale square wave near float32's maximum: finite, but the filter's overshoot at each edge is not.
    x = np.where((np.arange(16000) // 50) % 2 == 0, 3.3e38, -3.3e38).astype(np.float32)
    store = AudioStore()
    ref = store.load_bytes(encoded(x, 16000, "WAV", "FLOAT"), name="loud.wav")
    with pytest.raises(NonFiniteAudioError, match="overflow"):
        store.waveform(ref, 22050)


# ---------------------------------------------------------------- cache bound


def test_cache_is_bounded_in_bytes_and_drops_the_native_copy_of_a_long_clip() -> None:
    store = AudioStore(max_cached_bytes=2 * MIB)
    ref = store.load_bytes(encoded(tone(48000, 10.0), 48000, "WAV", "PCM_16"), name="long")  # 1.9 MB native
    wav = store.waveform(ref, 16000)  # 0.6 MB more: over budget, so the older native copy goes
    assert store._cached_bytes <= 2 * MIB
    assert store.waveform(ref, 16000) is wav
    with pytest.raises(AudioNotFoundError):  # an upload has no file to reload its native copy from
        store.waveform(ref, 48000)


# ---------------------------------------------------------------- fuzz


def _seeds() -> list[bytes]:
    x = tone(16000, 0.3, channels=2, freqs=(440.0, 660.0))
    seeds = [
        encoded(x, 16000, "WAV", "PCM_16"),
        encoded(x, 22050, "WAV", "FLOAT"),
        encoded(x, 44100, "FLAC", "PCM_16"),
        encoded(x, 16000, "OGG", "VORBIS"),
    ]
    if "MP3" in sf.available_formats() and "MPEG_LAYER_III" in sf.available_subtypes("MP3"):
        seeds.append(encoded(x, 16000, "MP3", "MPEG_LAYER_III"))
    return seeds


_SEEDS = _seeds()
# Small limits keep each example fast; the code paths are the same as at the defaults.
_FUZZ_LIMITS = AudioLimits(max_decoded_bytes=8 * MIB, max_duration=60.0)


@st.composite
def _mutants(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    # Headers hold the interesting fields (rates, channels, lengths), so most edits land in the first 64 bytes.
    pos = st.one_of(st.integers(0, 63), st.integers(0, len(data) - 1))
    for p, b in draw(st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=12)):
        data[p] = b
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_mutants())
def test_fuzz_mutated_files_only_raise_audio_errors(data: bytes) -> None:
    store = AudioStore(_FUZZ_LIMITS)
    try:
        ref = store.load_bytes(data, name="fuzz")
        wav = store.waveform(ref, 16000)
    except AudioError as e:
        assert str(e).startswith("fuzz") or "in-memory audio" in str(e), str(e)
        assert "object at 0x" not in str(e)
        return
    assert ref.frames >= math.ceil(_FUZZ_LIMITS.min_duration * ref.sample_rate) - 1
    assert ref.frames * ref.channels * 4 <= _FUZZ_LIMITS.max_decoded_bytes
    assert len(wav) == math.ceil(ref.frames * 16000 / ref.sample_rate)
    assert np.isfinite(wav).all()


# ---------------------------------------------------------------- peak memory of `ask`

_SCRIPT = Path(sys.executable).with_name("echo-agent")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "echo_agent.cli"]
RSS_LIMIT = 1.5e9


def _write_long(path: Path, sr: int, channels: int, seconds: float) -> None:
    """Sines plus a little noise, written block by block so the test itself stays small."""
    n = round(sr * seconds)
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", sr, channels, subtype="PCM_16") as f:
        for i in range(0, n, 1 << 20):
            t = (np.arange(i, min(n, i + (1 << 20))) / sr)[:, None]
            x = 0.3 * np.sin(2 * np.pi * 440 * t * (1 + np.arange(channels) / 10)) + 0.01 * rng.standard_normal(
                (len(t), channels)
            )
            f.write(x.astype(np.float32))


# Measured from a small wrapper process: a child forked straight from pytest would count pytest's own pages
# (torch and all) in its peak RSS until it execs.
_PEAK_RSS = """
import resource, subprocess, sys
with open(sys.argv[1], "wb") as log:
    code = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT, check=False).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _ask_peak_rss(path: Path, tmp_path: Path) -> int:
    """Peak RSS in bytes of a real `echo-agent ask` on `path`."""
    env = {**os.environ, "ECHO_AGENT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "ask.log"
    ask = [*CLI, "ask", str(path), "What is it?", "--model", "tiny-random-qwen2-audio", "--max-new-tokens", "2"]
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(log), *ask], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600, check=True)  # fmt: skip
    code, kilobytes = proc.stdout.split()
    assert code == "0", log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    return int(kilobytes) * 1024  # ru_maxrss is in kilobytes on Linux


@pytest.mark.parametrize(
    ("label", "sr", "channels", "seconds"),
    [
        ("resampling: 10 min at 44,101 Hz, 106 MB decoded", 44101, 1, 600.0),
        ("channels: 32 x 48 kHz for 40 s, 246 MB decoded", 48000, 32, 40.0),
    ],
)
def test_ask_peak_rss_stays_under_1_5_gb(tmp_path: Path, label: str, sr: int, channels: int, seconds: float) -> None:
    path = tmp_path / "long.wav"
    _write_long(path, sr, channels, seconds)
    assert sr * seconds * channels * 4 <= AudioLimits().max_decoded_bytes  # within the documented limits
    try:
        peak = _ask_peak_rss(path, tmp_path)
    finally:
        path.unlink()
    print(f"\npeak RSS of `echo-agent ask` ({label}): {peak / 1e9:.2f} GB")
    assert peak < RSS_LIMIT
