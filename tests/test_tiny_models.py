"""Tiny Qwen2-Audio / Qwen2.5-Omni thinker with real processors, built offline (echo_agent.tiny_models)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoProcessor

from echo_agent.backends.transformers import (
    EncodedAudio,
    collate_audio_features,
    encode_audio_placeholder,
    processor_family,
)
from echo_agent.tiny_models import (
    AUDIO_PLACEHOLDER,
    PROTOCOL_TOKENS,
    QWEN_SPECIAL_TOKENS,
    QWEN_TOKEN_IDS,
    QWEN_VOCAB_SIZE,
    USER_TOKEN_ID,
    QwenFamily,
    build_qwen2_5_omni_processor,
    build_qwen2_audio_processor,
    build_qwen_tokenizer,
    build_tiny_qwen2_5_omni_thinker,
    build_tiny_qwen2_audio,
    tiny_qwen2_5_omni_thinker_config,
    tiny_qwen2_audio_config,
)

FAMILIES: list[QwenFamily] = ["qwen2_audio", "qwen2_5_omni"]
BUILDERS: dict[QwenFamily, Callable[..., tuple[Any, Any]]] = {
    "qwen2_audio": build_tiny_qwen2_audio,
    "qwen2_5_omni": build_tiny_qwen2_5_omni_thinker,
}
SR = 16000


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; several threads on a busy 2-core box are ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@cache
def tokenizer_for(family: QwenFamily) -> Any:
    return build_qwen_tokenizer(family)


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@dataclass
class Setup:
    family: QwenFamily
    model: Any
    processor: Any
    text: str
    clips: list[np.ndarray]
    joint: dict[str, torch.Tensor]
    pieces: list[EncodedAudio]
    ids: list[int]


def render_prompt(processor: Any) -> str:
    """The Echo shape: the clip in the user turn, then a partial assistant turn with an inline re-listen."""
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio": "clip.wav"}, {"type": "text", "text": "How many?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return str(prompt) + "<think>Listen again <seg>1.0, 2.0</seg>" + AUDIO_PLACEHOLDER + " three beeps"


def piecewise_ids(tokenizer: Any, text: str, pieces: list[EncodedAudio]) -> list[int]:
    parts = text.split(AUDIO_PLACEHOLDER)
    assert len(parts) == len(pieces) + 1
    ids: list[int] = tokenizer.encode(parts[0], add_special_tokens=False)
    for piece, part in zip(pieces, parts[1:], strict=True):
        ids += piece.input_ids + tokenizer.encode(part, add_special_tokens=False)
    return ids


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request: pytest.FixtureRequest) -> Setup:
    family = request.param
    model, processor = BUILDERS[family]()
    text = render_prompt(processor)
    clips = [clip(1.0, 1), clip(2.5, 2)]
    joint = dict(processor(text=text, audio=clips, sampling_rate=SR, return_tensors="pt"))
    pieces = [encode_audio_placeholder(processor, c, SR) for c in clips]
    ids = piecewise_ids(processor.tokenizer, text, pieces)
    return Setup(family, model, processor, text, clips, joint, pieces, ids)


def model_inputs(joint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "input_features", "feature_attention_mask")
    return {k: joint[k] for k in keys}


# --- tokenizer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=150, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=80),
        st.lists(st.one_of(st.text(max_size=8), st.sampled_from(QWEN_SPECIAL_TOKENS + PROTOCOL_TOKENS))).map("".join),
    )
)
def test_tokenizer_round_trips_any_text(family: QwenFamily, text: str) -> None:
    tok = tokenizer_for(family)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_protocol_tokens_are_single_and_survive_skip_special(family: QwenFamily) -> None:
    tok = tokenizer_for(family)
    for t in PROTOCOL_TOKENS:
        assert tok.encode(t, add_special_tokens=False) == [QWEN_TOKEN_IDS[t]]
    for t in QWEN_SPECIAL_TOKENS:
        assert tok.encode(t, add_special_tokens=False) == [QWEN_TOKEN_IDS[t]]
    text = "<|im_start|>assistant\n<think>at <seg>1.0, 2.0</seg>" + AUDIO_PLACEHOLDER + "</think><answer>B</answer>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert (
        tok.decode(ids, skip_special_tokens=True)
        == "assistant\n<think>at <seg>1.0, 2.0</seg></think><answer>B</answer>"
    )
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) == QWEN_VOCAB_SIZE
    assert tok.encode("user", add_special_tokens=False) == [USER_TOKEN_ID]


def test_config_token_ids_match_the_tokenizer() -> None:
    tok = tokenizer_for("qwen2_5_omni")
    ids = tok.convert_tokens_to_ids
    qa = tiny_qwen2_audio_config(len(tok))
    assert qa.audio_token_id == ids("<|AUDIO|>")
    assert qa.text_config.vocab_size >= len(tok)
    assert (qa.text_config.eos_token_id, qa.text_config.pad_token_id) == (ids("<|im_end|>"), ids("<|endoftext|>"))
    om = tiny_qwen2_5_omni_thinker_config(len(tok))
    assert om.audio_token_id == ids("<|AUDIO|>")
    assert (om.audio_start_token_id, om.audio_end_token_id) == (ids("<|audio_bos|>"), ids("<|audio_eos|>"))
    assert (om.image_token_id, om.video_token_id) == (ids("<|IMAGE|>"), ids("<|VIDEO|>"))
    assert (om.vision_start_token_id, om.vision_end_token_id) == (ids("<|vision_bos|>"), ids("<|vision_eos|>"))
    assert om.user_token_id == tok.encode("user", add_special_tokens=False)[0]
    assert om.text_config.vocab_size >= len(tok)
    assert tok.audio_token == "<|AUDIO|>" and tok.audio_token_id == ids("<|AUDIO|>")
    with pytest.raises(ValueError):
        tiny_qwen2_audio_config(QWEN_VOCAB_SIZE - 1)


# --- chat templates ---------------------------------------------------------------------------------------


def test_qwen2_audio_template_numbers_audio_items() -> None:
    processor = build_qwen2_audio_processor()
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": [{"type": "audio", "audio": "b.wav"}]},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nHi<|im_end|>\n"
        "<|im_start|>assistant\nOk.<|im_end|>\n"
        "<|im_start|>user\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert processor.tokenizer.chat_template == processor.chat_template


def test_omni_template_default_system_and_placeholders() -> None:
    processor = build_qwen2_5_omni_processor()
    messages = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Hi"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own = [{"role": "system", "content": "Be brief."}, *messages]
    rendered = processor.apply_chat_template(own, tokenize=False, add_audio_id=True)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAudio 1: <|audio_bos|>")
    assert processor.tokenizer.chat_template == processor.chat_template


# --- several clips in one sequence -------------------------------------------------------------------------


def test_piecewise_encoding_equals_the_processors_joint_encoding(setup: Setup) -> None:
    audio_id = QWEN_TOKEN_IDS["<|AUDIO|>"]
    counts = [p.num_audio_tokens for p in setup.pieces]
    assert counts == [25, 62]  # 25 tokens per second
    for p in setup.pieces:
        assert p.input_ids == [
            QWEN_TOKEN_IDS["<|audio_bos|>"],
            *[audio_id] * p.num_audio_tokens,
            QWEN_TOKEN_IDS["<|audio_eos|>"],
        ]
    joint_ids = setup.joint["input_ids"][0].tolist()
    assert joint_ids.count(audio_id) == sum(counts)
    assert setup.ids == joint_ids

    kwargs = collate_audio_features(setup.family, setup.pieces)
    ids = torch.tensor([setup.ids])
    with torch.no_grad():
        reference = setup.model(**model_inputs(setup.joint)).logits
        piecewise = setup.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits
    assert torch.allclose(piecewise, reference, atol=1e-5)


def test_feature_shapes(setup: Setup) -> None:
    kwargs = collate_audio_features(setup.family, setup.pieces)
    frames = [int(p.feature_mask.sum()) for p in setup.pieces]
    assert frames == [100, 250]
    if setup.family == "qwen2_audio":
        assert setup.joint["input_features"].shape == (2, 128, 3000)
        assert all(p.features.shape == (128, 3000) for p in setup.pieces)
        assert kwargs["input_features"].shape == (2, 128, 3000)
        assert torch.equal(kwargs["input_features"], setup.joint["input_features"])
        assert torch.equal(kwargs["feature_attention_mask"], setup.joint["feature_attention_mask"])
    else:
        assert setup.joint["input_features"].shape == (2, 128, 30000)  # hub chunk_length = 300 s
        assert [p.features.shape for p in setup.pieces] == [(128, 100), (128, 250)]
        assert kwargs["input_features"].shape == (2, 128, 250)
        assert torch.equal(kwargs["input_features"][1], setup.joint["input_features"][1, :, :250])
    assert kwargs["feature_attention_mask"].sum(-1).tolist() == frames


def test_encode_rejects_bad_waveforms() -> None:
    processor = build_qwen2_audio_processor()
    with pytest.raises(ValueError):
        encode_audio_placeholder(processor, np.zeros((2, 16000), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_audio_placeholder(processor, np.zeros(0, dtype=np.float32))


def test_collate_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        collate_audio_features("qwen2_audio", [])
    with pytest.raises(ValueError):
        collate_audio_features("gemma", [EncodedAudio([1], torch.zeros(128, 3), torch.ones(3))])
    too_long = EncodedAudio([1], torch.zeros(128, 3001), torch.ones(3001))
    with pytest.raises(ValueError):
        collate_audio_features("qwen2_audio", [too_long])


def test_generate_with_two_clips(setup: Setup) -> None:
    kwargs = collate_audio_features(setup.family, setup.pieces)
    ids = torch.tensor([setup.ids])
    with torch.no_grad():
        out = setup.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs, max_new_tokens=5, do_sample=False
        )
    assert out.shape[0] == 1 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 5
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert isinstance(setup.processor.tokenizer.decode(out[0, ids.shape[1] :]), str)


def test_cache_continuation_takes_only_the_new_clip(setup: Setup) -> None:
    """Prefix (clip 1) with a cache, then the rest (clip 2) with clip 2's features only == full forward."""
    split = setup.ids.index(QWEN_TOKEN_IDS["<|audio_bos|>"], setup.ids.index(QWEN_TOKEN_IDS["<|audio_eos|>"]))
    ids = torch.tensor([setup.ids])
    total = ids.shape[1]
    full_kwargs = collate_audio_features(setup.family, setup.pieces)
    with torch.no_grad():
        full = setup.model(input_ids=ids, attention_mask=torch.ones_like(ids), **full_kwargs).logits
        prefix = setup.model(
            input_ids=ids[:, :split],
            attention_mask=torch.ones(1, split, dtype=torch.long),
            **collate_audio_features(setup.family, setup.pieces[:1]),
            use_cache=True,
        )
        positions = torch.arange(split, total).view(1, 1, -1)
        pos = positions.expand(3, 1, -1) if setup.family == "qwen2_5_omni" else positions[0]
        rest = setup.model(
            input_ids=ids[:, split:],
            attention_mask=torch.ones(1, total, dtype=torch.long),
            **collate_audio_features(setup.family, setup.pieces[1:]),
            cache=copy.deepcopy(prefix.cache),
            position_ids=pos,
        ).logits
    assert torch.allclose(rest, full[:, split:], atol=1e-5)


# --- determinism and save/load -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_determines_the_weights(family: QwenFamily) -> None:
    a, processor = BUILDERS[family](seed=3)
    b, _ = BUILDERS[family](seed=3)
    c, _ = BUILDERS[family](seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training
    assert a.generation_config.pad_token_id == QWEN_TOKEN_IDS["<|endoftext|>"]
    assert QWEN_TOKEN_IDS["<|im_end|>"] in a.generation_config.eos_token_id
    assert processor_family(processor) == family


def test_save_and_load_round_trip(setup: Setup, tmp_path: Path) -> None:
    setup.processor.save_pretrained(tmp_path)
    setup.model.save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(processor) is type(setup.processor)
    assert processor.chat_template == setup.processor.chat_template
    assert processor.tokenizer.chat_template == setup.processor.tokenizer.chat_template
    reloaded = dict(processor(text=setup.text, audio=setup.clips, sampling_rate=SR, return_tensors="pt"))
    assert all(torch.equal(reloaded[k], setup.joint[k]) for k in model_inputs(setup.joint))

    model = type(setup.model).from_pretrained(tmp_path, local_files_only=True).eval()
    assert model.config.audio_token_id == setup.model.config.audio_token_id
    assert model.generation_config.eos_token_id == setup.model.generation_config.eos_token_id
    with torch.no_grad():
        before = setup.model(**model_inputs(setup.joint)).logits
        after = model(**model_inputs(reloaded)).logits
    assert torch.allclose(before, after, atol=1e-6)
