from __future__ import annotations

from pathlib import Path
from typing import Any

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


def json_paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a node inside a JSON value (dict keys and list indices): where the fuzz tests mutate."""
    out = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            out += json_paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += json_paths(v, (*here, i))
    return out


@pytest.fixture
def beeps_wav(tmp_path: Path) -> Path:
    return write_beeps(tmp_path / "beeps.wav", 6.0, [(1.0, 0.2), (2.3, 0.2), (2.7, 0.2), (4.5, 0.3)])


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # Tiny models are dominated by thread hand-off costs; on a loaded 2-core machine torch's
    # default thread pool made them ~100x slower. One thread is fastest and deterministic.
    import torch

    torch.set_num_threads(1)


# ---- a tiny model that has memorised one Echo trace, saved as a model directory -----------------
# Shared by the HTTP tests (served by `echo-agent serve`, and loaded locally to compare against).

ECHO_QUESTION, ECHO_CHOICES = "How many beeps are there?", ["3", "4", "5"]


@pytest.fixture(scope="session")
def echo_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory, clip): greedy decoding of this model on this clip and question re-listens to
    2.0-3.0 s once and answers 4."""
    from memorize import Trace, teach

    from echo_agent.backends.transformers import TransformersBackend
    from echo_agent.tiny_models import build_tiny_qwen2_audio

    root = tmp_path_factory.mktemp("echo-model")
    wav = write_beeps(root / "beeps.wav", 6.0, [(1.0, 0.2), (2.3, 0.2), (2.7, 0.2), (4.5, 0.3)])
    trace = Trace(
        before="<think>Two beeps sit close together near <seg>2.0, 3.0</seg>",
        span=(2.0, 3.0),
        after=" yes, two there, one at 1 s and one at 4.5 s.</think><answer>4</answer>",
    )
    model, processor = build_tiny_qwen2_audio(0)
    teach(TransformersBackend(model, processor), wav, ECHO_QUESTION, ECHO_CHOICES, trace)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model_dir, wav
