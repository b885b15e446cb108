"""A fresh, untrained echo-tiny: a tokenizer trained on a corpus, then the model and its processor.

`EchoTinySizes` holds the knobs; the trainers' configs subclass it, so a run's saved config says how
big its model was. `new_echo_tiny(..., audio_encoder="whisper-tiny.en")` builds echo-tiny 2 (the frozen Whisper
tiny.en encoder and a trained projector; `ECHO_TINY2_SIZES` are its default sizes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, Field, model_validator

from .audio import encoder_asset_sha256
from .configuration import WHISPER_N_MELS, AudioEncoderKind, EchoTinyConfig
from .modeling import EchoTinyForConditionalGeneration
from .processing import SPECIAL_TOKENS, EchoTinyFeatureExtractor, EchoTinyProcessor, train_tokenizer

# The byte alphabet and the special tokens come first: a smaller vocabulary would leave no room for one merge.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1
_AUDIO_HEADS = 4  # EchoTinyConfig's default audio_heads, which new_echo_tiny keeps


class EchoTinySizes(BaseModel):
    """echo-tiny's size (see `EchoTinyConfig`). A plain BaseModel so trainer configs can subclass it."""

    vocab_size: int = Field(512, ge=_MIN_VOCAB, description="BPE vocabulary trained on the corpus")
    hidden_size: int = Field(192, ge=2, description="decoder width; heads x an even head size")
    layers: int = Field(4, ge=1, description="decoder layers")
    heads: int = Field(4, ge=1, description="decoder attention heads; key/value heads are half (at least 1)")
    intermediate_size: int = Field(512, ge=1, description="decoder MLP width")
    audio_hidden_size: int = Field(128, ge=_AUDIO_HEADS, description="audio encoder width; a multiple of its 4 heads")
    audio_layers: int = Field(2, ge=1, description="audio encoder layers")
    audio_tokens: int = Field(16, ge=1, description="tokens every audio input costs, whatever its length")
    audio_time_tokens: int = Field(0, ge=0, description="how many of audio_tokens are time bins (see EchoTinyConfig)")

    @model_validator(mode="after")
    def _shapes_fit(self) -> EchoTinySizes:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        if (self.hidden_size // self.heads) % 2:  # rotary position embeddings rotate pairs of dimensions
            raise ValueError(f"hidden_size / heads = {self.hidden_size // self.heads} must be even")
        if self.heads % max(1, self.heads // 2):  # grouped-query attention shares each key/value head evenly
            raise ValueError(f"heads {self.heads} must be 1, 3 or even (key/value heads are half of them)")
        if self.audio_hidden_size % _AUDIO_HEADS:
            raise ValueError(
                f"audio_hidden_size {self.audio_hidden_size} is not divisible by {_AUDIO_HEADS} audio heads"
            )
        if self.audio_time_tokens >= self.audio_tokens:
            raise ValueError(
                f"audio_time_tokens ({self.audio_time_tokens}) must be less than audio_tokens ({self.audio_tokens})"
            )
        return self


# echo-tiny 2's default sizes. The decoder is wider than echo-tiny's (256 vs 128, 4 layers vs 3; ~3.2 M parameters):
# real speech, music and sound, a phrasing bank and threads ask more of it than synthetic tones did.
# The audio budget stays echo-tiny's 32 tokens of which 16 are time bins: the bins are what made counting work,
# and 16 bins over a re-listened 2 s slice are 125 ms each (two per beat at 240 bpm), over a 30 s clip ~2 s each
# (coarse on purpose: the bottleneck re-listening breaks). 8 bins would halve that detail for 8 prompt tokens per
# input: three inputs (the clip, two re-listens) cost 96 prompt tokens instead of 72, a small share of a prompt.
# The projector is 256 wide, 2 layers, 4 heads (~2 M parameters).
ECHO_TINY2_SIZES = EchoTinySizes(
    vocab_size=1024, hidden_size=256, layers=4, heads=4, intermediate_size=768,
    audio_hidden_size=256, audio_layers=2, audio_tokens=32, audio_time_tokens=16,
)  # fmt: skip


def new_echo_tiny(
    sizes: EchoTinySizes, corpus: Sequence[str], seed: int = 0, audio_encoder: AudioEncoderKind = "conv"
) -> tuple[EchoTinyForConditionalGeneration, EchoTinyProcessor]:
    """A fresh echo-tiny: a tokenizer trained on the corpus, then the model (initialised under `seed`) and processor.

    `audio_encoder="whisper-tiny.en"` gives echo-tiny 2: Whisper's log-mel, the frozen encoder from the package asset
    (its sha256 recorded in the config) and a trained projector of `sizes.audio_*`. Same sizes, corpus, seed and
    encoder give the same tokenizer and the same weights."""
    tok = train_tokenizer(corpus, sizes.vocab_size)
    names = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_end|>")
    ids: dict[str, int] = {}
    for name in names:
        token_id = tok.convert_tokens_to_ids(name)
        if not isinstance(token_id, int):  # one token in, one id out; the check is for the type checker
            raise TypeError(f"{name}: expected one token id, got {token_id!r}")
        ids[name] = token_id
    whisper = audio_encoder != "conv"
    default_mels = EchoTinyConfig().n_mels
    config = EchoTinyConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": sizes.hidden_size, "intermediate_size": sizes.intermediate_size,
            "num_hidden_layers": sizes.layers, "num_attention_heads": sizes.heads,
            "num_key_value_heads": max(1, sizes.heads // 2), "max_position_embeddings": 4096,
            "tie_word_embeddings": True, "eos_token_id": ids["<|im_end|>"], "pad_token_id": tok.pad_token_id,
        },
        audio_hidden_size=sizes.audio_hidden_size, audio_layers=sizes.audio_layers, audio_tokens=sizes.audio_tokens,
        audio_time_tokens=sizes.audio_time_tokens, audio_token_id=ids["<|AUDIO|>"],
        audio_bos_token_id=ids["<|audio_bos|>"], audio_eos_token_id=ids["<|audio_eos|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id, audio_encoder=audio_encoder,
        n_mels=WHISPER_N_MELS if whisper else default_mels,
        audio_encoder_sha256=encoder_asset_sha256() if whisper else None,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = EchoTinyForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"]]
    model.generation_config.pad_token_id = tok.pad_token_id
    features = EchoTinyFeatureExtractor.whisper() if whisper else EchoTinyFeatureExtractor(n_mels=config.n_mels)
    processor = EchoTinyProcessor(features, tok, audio_tokens=sizes.audio_tokens)
    return model, processor
