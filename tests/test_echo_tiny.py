"""echo-tiny: a fixed audio-token budget per input, Auto-class loading, and the shared backend path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_beeps

import echo_agent.echo_tiny  # noqa: F401  (registers the Auto classes)
from echo_agent.agent import EchoAgent
from echo_agent.backends.transformers import TransformersBackend, encode_audio_placeholder
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.echo_tiny import (
    EchoTinyConfig,
    EchoTinyFeatureExtractor,
    EchoTinyForConditionalGeneration,
    EchoTinyProcessor,
    train_tokenizer,
)

CORPUS = ["<think>I listen to 1.0-2.0 s: <seg>1.0, 2.0</seg> there are 2 beeps.</think><answer>2</answer>"] * 20


def tiny(audio_tokens: int = 16, time_tokens: int = 0) -> tuple[EchoTinyForConditionalGeneration, EchoTinyProcessor]:
    tok = train_tokenizer([*CORPUS, "How many beeps are there between 1.0 and 2.0 seconds?"], 320)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_end|>")}
    cfg = EchoTinyConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True},
        audio_hidden_size=32, audio_layers=1, audio_heads=2, audio_tokens=audio_tokens,
        audio_time_tokens=time_tokens,
        audio_token_id=ids["<|AUDIO|>"], audio_bos_token_id=ids["<|audio_bos|>"],
        audio_eos_token_id=ids["<|audio_eos|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EchoTinyForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"]]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, EchoTinyProcessor(EchoTinyFeatureExtractor(), tok, audio_tokens=audio_tokens)


@pytest.mark.parametrize("seconds", [0.2, 1.0, 10.0, 60.0, 300.0])
def test_every_audio_input_costs_the_same_tokens(seconds: float) -> None:
    model, processor = tiny()
    wave = np.random.default_rng(0).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1
    enc = encode_audio_placeholder(processor, wave)
    assert enc.input_ids.count(processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")) == 16
    emb = model.audio_embeddings(enc.features.unsqueeze(0), enc.feature_mask.unsqueeze(0))
    assert emb.shape == (1, 16, model.config.text_config.hidden_size)


def test_fine_and_coarse_views_differ_and_padding_is_ignored() -> None:
    model, processor = tiny()
    rng = np.random.default_rng(1)
    short = rng.standard_normal(16000).astype(np.float32) * 0.1
    long = rng.standard_normal(16000 * 40).astype(np.float32) * 0.1
    both = processor.feature_extractor([short, long])
    alone = processor.feature_extractor([short])
    a = model.audio_embeddings(both["input_features"], both["attention_mask"])[0]
    b = model.audio_embeddings(alone["input_features"], alone["attention_mask"])[0]
    assert torch.allclose(a, b, atol=1e-5)  # batching with a longer clip changes nothing


def test_save_and_load_through_auto_classes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoProcessor

    model, processor = tiny()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    p2 = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(m2, EchoTinyForConditionalGeneration) and isinstance(p2, EchoTinyProcessor)
    wave = np.zeros(16000, dtype=np.float32)
    x1 = processor(text="hi <|audio_bos|><|AUDIO|><|audio_eos|>", audio=[wave])
    x2 = p2(text="hi <|audio_bos|><|AUDIO|><|audio_eos|>", audio=[wave])
    assert torch.equal(x1["input_ids"], x2["input_ids"])
    assert torch.allclose(model(**x1).logits, m2(**x2).logits, atol=1e-6)


async def test_runs_through_the_transformers_backend_and_graph(tmp_path: Path) -> None:
    model, processor = tiny()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    backend = TransformersBackend.from_pretrained(tmp_path / "m")
    assert backend.family == "echo_tiny"
    wav = write_beeps(tmp_path / "c.wav", 12.0, [(1.0, 0.2)])
    agent = EchoAgent(backend, config=AgentConfig(sampling=SamplingParams(max_new_tokens=6), max_retries=0))
    result = await agent.ask(wav, "How many beeps are there between 1.0 and 2.0 seconds?", ["1", "2"])
    assert result.status in ("answered", "no_answer")
    assert backend.last_prompt is not None and len(backend.last_prompt.audios) == 1


def test_placeholder_count_mismatch_is_an_error() -> None:
    _, processor = tiny()
    with pytest.raises(ValueError, match="placeholders"):
        processor(text="<|AUDIO|> <|AUDIO|>", audio=[np.zeros(1600, dtype=np.float32)])


def test_time_bin_tokens_fill_part_of_the_budget_and_survive_save_load(tmp_path: Path) -> None:
    """`audio_time_tokens` of the budget are time bins; the total per input stays `audio_tokens`, padding a
    row next to a longer one changes nothing, and the bins' parameters round-trip through save/load."""
    model, processor = tiny(audio_tokens=24, time_tokens=8)
    assert model.audio_encoder.queries.shape[0] == 16 and model.audio_encoder.bin_embed.shape[0] == 8
    rng = np.random.default_rng(3)
    short = rng.standard_normal(8000).astype(np.float32) * 0.1  # 0.5 s: 13 encoder frames over 8 bins
    tiny_clip = rng.standard_normal(800).astype(np.float32) * 0.1  # 50 ms: 2 encoder frames for 8 bins
    long = rng.standard_normal(16000 * 12).astype(np.float32) * 0.1
    both = processor.feature_extractor([short, tiny_clip, long])
    emb = model.audio_embeddings(both["input_features"], both["attention_mask"])
    assert emb.shape == (3, 24, model.config.text_config.hidden_size) and torch.isfinite(emb).all()
    for i, clip in enumerate((short, tiny_clip)):
        alone = processor.feature_extractor([clip])
        torch.testing.assert_close(emb[i], model.audio_embeddings(alone["input_features"], alone["attention_mask"])[0])
    # The bins are not copies of one another: a long clip's first and last bins hear different audio.
    assert not torch.allclose(emb[2, 16], emb[2, 23], atol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = EchoTinyForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.audio_time_tokens == 8
    torch.testing.assert_close(reloaded.audio_embeddings(both["input_features"], both["attention_mask"]), emb)


def test_time_tokens_must_leave_room_for_queries() -> None:
    with pytest.raises(ValueError, match="audio_time_tokens"):
        EchoTinyConfig(audio_tokens=8, audio_time_tokens=8)
