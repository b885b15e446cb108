from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SR = 16000


def write_beeps(
    path: Path, seconds: float, beeps: list[tuple[float, float]], freq: float = 880.0, seed: int = 0
) -> Path:
    """A real WAV file: low background noise plus sine beeps at (onset, length) in seconds."""
    t = np.arange(int(SR * seconds)) / SR
    x = 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    for onset, length in beeps:
        m = (t >= onset) & (t < onset + length)
        x[m] += 0.5 * np.sin(2 * np.pi * freq * t[m])
    sf.write(path, x.astype(np.float32), SR)
    return path


@pytest.fixture
def beeps_wav(tmp_path: Path) -> Path:
    return write_beeps(tmp_path / "beeps.wav", 6.0, [(1.0, 0.2), (2.3, 0.2), (2.7, 0.2), (4.5, 0.3)])


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # Tiny models are dominated by thread hand-off costs; on a loaded 2-core machine torch's
    # default thread pool made them ~100x slower. One thread is fastest and deterministic.
    import torch

    torch.set_num_threads(1)
