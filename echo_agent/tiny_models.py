"""Tiny, randomly initialised audio LLMs with their real transformers processors, built offline.

Two families are covered (research notes §1.1-1.3, design §9 "Real processors offline"):

- **Qwen2-Audio**: `Qwen2AudioForConditionalGeneration` + `Qwen2AudioProcessor`.
- **Qwen2.5-Omni thinker**: `Qwen2_5OmniThinkerForConditionalGeneration` + `Qwen2_5OmniProcessor`.

Nothing touches the Hugging Face hub. The processors are the real transformers classes, assembled from
a `WhisperFeatureExtractor` configured as on the hub, a byte-level `tokenizers` tokenizer that carries the
family's special tokens, and the family's real chat template. The models have hidden size 32 and 2 layers.
They are used by the tests and as the CLI's placeholder default model.

Putting several clips into **one** sequence, including a clip inserted inline in a partly generated
assistant turn (design §2), lives in `echo_agent.backends.transformers`: `encode_audio_placeholder` runs
the real processor on one clip, and `collate_audio_features` builds the model kwargs for all clips in
order. Piecewise encoding gives exactly the processor's joint encoding; tests/test_tiny_models.py checks
that the logits agree. The facts below, found while building these models, explain that code.

Per-family facts (transformers 5.24):

- Both processors expand each `<|AUDIO|>` to `((F - 1) // 2 + 1 - 2) // 2 + 1` tokens, where F is the
  clip's valid mel frames (100 per second): 25 tokens per second, 1.0 s -> 25, 2.5 s -> 62.
- Qwen2-Audio: the feature extractor pads every clip to 30 s (3000 frames); the encoder rejects any other
  length. `input_features` is `(N, 128, 3000)` and `feature_attention_mask` is `(N, 3000)`. Longer clips
  are truncated to 30 s (750 tokens).
- Qwen2.5-Omni: the hub feature extractor has `chunk_length=300`, so the processor pads every clip to
  300 s (30000 frames). The thinker drops padded frames through `feature_attention_mask` before its
  encoder, so the padded length is free: `EncodedAudio` keeps only the valid frames and
  `collate_audio_features` pads to the longest clip. Longer clips are truncated to 300 s (7500 tokens).
- Qwen2-Audio takes a "legacy" merge path when no two `<|AUDIO|>` tokens are adjacent anywhere in the
  batch (only clips under 0.08 s give a single token); the 0.2 s minimum slice (5 tokens) avoids it.
- Qwen2.5-Omni positions: with audio only (no image/video grid) `get_rope_index` takes its text branch,
  so position ids are plain `cumsum(attention_mask) - 1` on all three M-RoPE axes and `rope_deltas` is 0.
  An audio block inserted mid-assistant-turn needs no position handling: pass `input_ids`,
  `attention_mask`, `input_features` and `feature_attention_mask` to `generate`.
- KV-cache continuation (either family): the features passed with a new chunk must be those of the clips
  **in that chunk** only. Passing every clip again makes Qwen2-Audio raise (token/feature count
  mismatch) and makes the Omni thinker silently scatter the first clip's features into the new slot.
  `generate(input_ids=<all ids>, cache=<prefix cache>, <new clips' features>)` then matches a full
  recompute. A manual Omni thinker forward over a cache also needs explicit `position_ids` of shape
  `(3, B, new_len)` (= `arange(past_len, past_len + new_len)` on each axis); without them it fails on a
  shape mismatch. Qwen2-Audio infers them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

QwenFamily = Literal["qwen2_audio", "qwen2_5_omni"]
QWEN_FAMILIES: tuple[QwenFamily, ...] = ("qwen2_audio", "qwen2_5_omni")

QWEN_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_bos|>",
    "<|AUDIO|>",
    "<|audio_eos|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
]
"""Special tokens shared by both families. `decode(skip_special_tokens=True)` drops them."""

PROTOCOL_TOKENS: list[str] = ["<seg>", "</seg>", "<think>", "</think>", "<answer>", "</answer>"]
"""The Echo protocol's tags: single, non-special added tokens, so a skip-special decode keeps them."""

AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
"""What the runtime inserts for one clip (before the processor expands `<|AUDIO|>`)."""

SAMPLING_RATE = 16000
QWEN2_AUDIO_MEL_FRAMES = 3000
"""Qwen2-Audio's encoder takes exactly `max_source_positions * 2` = 3000 mel frames per clip (30 s)."""

# The byte-level vocabulary: ids 0-255 are the 256 bytes (in byte order), then a few BPE merges so that
# "user" is one token as in the real Qwen vocabulary (`user_token_id`), then the added tokens in order.
_USER_MERGES: list[tuple[str, str]] = [("u", "s"), ("us", "e"), ("use", "r")]
_FIRST_ADDED_ID = 256 + len(_USER_MERGES)
QWEN_TOKEN_IDS: dict[str, int] = {
    tok: _FIRST_ADDED_ID + i for i, tok in enumerate([*QWEN_SPECIAL_TOKENS, *PROTOCOL_TOKENS])
}
"""Id of every special and protocol token in the tiny tokenizer (identical for both families)."""
USER_TOKEN_ID = 256 + len(_USER_MERGES) - 1
QWEN_VOCAB_SIZE = _FIRST_ADDED_ID + len(QWEN_SPECIAL_TOKENS) + len(PROTOCOL_TOKENS)
"""`len(tokenizer)` of the tiny tokenizer; the tiny models' vocab size."""

# Qwen2-Audio's chat template: the default kept in transformers' `Qwen2AudioProcessor`, identical to the
# hub's `chat_template.json` for Qwen/Qwen2-Audio-7B-Instruct. Audio items render as
# "Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\n", with k counted across the conversation.
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or message['type'] == 'audio' "
    "or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Qwen2.5-Omni's chat template (hub Qwen/Qwen2.5-Omni-7B, also used by transformers' processor tests).
# A conversation without a system message gets "You are a helpful assistant."; audio items render as
# "<|audio_bos|><|AUDIO|><|audio_eos|>" (prefixed "Audio k: " only with add_audio_id=True).
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

_CHAT_TEMPLATES: dict[QwenFamily, str] = {
    "qwen2_audio": QWEN2_AUDIO_CHAT_TEMPLATE,
    "qwen2_5_omni": QWEN2_5_OMNI_CHAT_TEMPLATE,
}

# The named tokens Qwen2_5OmniProcessor reads from its tokenizer (tokenizer.audio_token, ...).
_OMNI_NAMED_TOKENS: dict[str, str] = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _check_family(family: str) -> QwenFamily:
    if family not in QWEN_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(QWEN_FAMILIES)}")
    return family


def build_qwen_tokenizer(family: Literal["qwen2_audio", "qwen2_5_omni"]) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with the family's special tokens, the protocol tokens and chat template.

    Any text round-trips exactly (`decode(encode(s)) == s`). eos is `<|im_end|>`, pad `<|endoftext|>`,
    and there is no bos, as in the real Qwen tokenizers. The ids are `QWEN_TOKEN_IDS`.
    """
    fam = _check_family(family)
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for left, right in _USER_MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(_USER_MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in PROTOCOL_TOKENS])

    named = dict(_OMNI_NAMED_TOKENS) if fam == "qwen2_5_omni" else None
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        extra_special_tokens=named,
    )
    tokenizer.chat_template = _CHAT_TEMPLATES[fam]
    for tok, expected in QWEN_TOKEN_IDS.items():
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != expected:  # pragma: no cover - guards the id layout the configs rely on
            raise RuntimeError(f"tiny tokenizer put {tok} at id {got}, expected {expected}")
    return tokenizer


def _whisper_feature_extractor(chunk_length: int) -> WhisperFeatureExtractor:
    """WhisperFeatureExtractor as in the hub `preprocessor_config.json` of both families."""
    return WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=SAMPLING_RATE,
        hop_length=160,
        n_fft=400,
        chunk_length=chunk_length,
        padding_value=0.0,
        return_attention_mask=True,
    )


def build_qwen2_audio_processor() -> Qwen2AudioProcessor:
    """The real `Qwen2AudioProcessor`: 128-mel Whisper features padded to 30 s, tiny tokenizer, hub template."""
    return Qwen2AudioProcessor(
        feature_extractor=_whisper_feature_extractor(chunk_length=30),
        tokenizer=build_qwen_tokenizer("qwen2_audio"),
        chat_template=QWEN2_AUDIO_CHAT_TEMPLATE,
    )


def build_qwen2_5_omni_processor() -> Qwen2_5OmniProcessor:
    """The real `Qwen2_5OmniProcessor`: Whisper features (`chunk_length=300` as on the hub), Qwen2-VL
    image and video processors, tiny tokenizer, hub template."""
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=_whisper_feature_extractor(chunk_length=300),
        tokenizer=build_qwen_tokenizer("qwen2_5_omni"),
        chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE,
    )


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < QWEN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} does not cover the tiny tokenizer ({QWEN_VOCAB_SIZE} tokens)")


def _text_token_ids() -> dict[str, int]:
    return {
        "bos_token_id": QWEN_TOKEN_IDS["<|endoftext|>"],
        "eos_token_id": QWEN_TOKEN_IDS["<|im_end|>"],
        "pad_token_id": QWEN_TOKEN_IDS["<|endoftext|>"],
    }


def tiny_qwen2_audio_config(vocab_size: int) -> Qwen2AudioConfig:
    """Qwen2-Audio config with hidden size 32 and 2 layers; token ids match `build_qwen_tokenizer`."""
    _check_vocab_size(vocab_size)
    return Qwen2AudioConfig(
        text_config={
            "model_type": "qwen2",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            **_text_token_ids(),
        },
        audio_config={
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "num_mel_bins": 128,
            # Keep 1500: the encoder insists on 2 * max_source_positions = 3000 input frames.
            "max_source_positions": 1500,
        },
        audio_token_index=QWEN_TOKEN_IDS["<|AUDIO|>"],
    )


def tiny_qwen2_5_omni_thinker_config(vocab_size: int) -> Qwen2_5OmniThinkerConfig:
    """Qwen2.5-Omni thinker config with hidden size 32 and 2 layers; token ids match `build_qwen_tokenizer`."""
    _check_vocab_size(vocab_size)
    # Not declared config fields, but get_rope_index reads them: forward fails without.
    vision_ids: dict[str, Any] = {
        "vision_start_token_id": QWEN_TOKEN_IDS["<|vision_bos|>"],
        "vision_end_token_id": QWEN_TOKEN_IDS["<|vision_eos|>"],
    }
    return Qwen2_5OmniThinkerConfig(
        audio_config={
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 32,
            "num_mel_bins": 128,
            "n_window": 100,
            "output_dim": 32,
        },
        # The vision tower is always built, so it must be tiny too.
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 4,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
        },
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            # head_dim 8 -> 4 rotary frequencies, split over the three M-RoPE axes.
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            **_text_token_ids(),
        },
        audio_token_index=QWEN_TOKEN_IDS["<|AUDIO|>"],
        image_token_index=QWEN_TOKEN_IDS["<|IMAGE|>"],
        video_token_index=QWEN_TOKEN_IDS["<|VIDEO|>"],
        audio_start_token_id=QWEN_TOKEN_IDS["<|audio_bos|>"],
        audio_end_token_id=QWEN_TOKEN_IDS["<|audio_eos|>"],
        user_token_id=USER_TOKEN_ID,
        **vision_ids,
    )


def _finish(model: PreTrainedModel) -> None:
    """eval mode and chat-model generation ids (hub generation_config: eos [im_end, endoftext])."""
    model.eval()
    gen: GenerationConfig = model.generation_config
    gen.eos_token_id = [QWEN_TOKEN_IDS["<|im_end|>"], QWEN_TOKEN_IDS["<|endoftext|>"]]
    gen.pad_token_id = QWEN_TOKEN_IDS["<|endoftext|>"]
    gen.bos_token_id = QWEN_TOKEN_IDS["<|endoftext|>"]


def build_tiny_qwen2_audio(seed: int = 0) -> tuple[Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor]:
    """A tiny random Qwen2-Audio and its processor. Same seed, same weights."""
    processor = build_qwen2_audio_processor()
    config = tiny_qwen2_audio_config(len(processor.tokenizer))
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    _finish(model)
    return model, processor


def build_tiny_qwen2_5_omni_thinker(
    seed: int = 0,
) -> tuple[Qwen2_5OmniThinkerForConditionalGeneration, Qwen2_5OmniProcessor]:
    """A tiny random Qwen2.5-Omni thinker (text output only) and its processor. Same seed, same weights."""
    processor = build_qwen2_5_omni_processor()
    config = tiny_qwen2_5_omni_thinker_config(len(processor.tokenizer))
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    _finish(model)
    return model, processor
