"""`EchoTinyConfig`: the embedded default model's configuration."""

from __future__ import annotations

from typing import Any, Literal, get_args

from transformers import PretrainedConfig, Qwen2Config

AudioEncoderKind = Literal["conv", "whisper-tiny.en"]
WHISPER_N_MELS = 80  # Whisper tiny.en's log-mel bins


class EchoTinyConfig(PretrainedConfig):
    """A small audio LLM that hears every audio input through a fixed budget of `audio_tokens` tokens.

    The audio encoder turns log-mel frames into `audio_tokens` embeddings whatever the input's
    duration: strided convolutions to 25 frames/s, average-pooled to at most `max_audio_positions`
    frames (so a 60 s clip is heard at ~4 frames/s while a 1 s slice keeps all 25), a small
    transformer over those frames with sinusoidal embeddings of each frame's time in seconds, and
    `audio_tokens` output tokens: learned queries that cross-attend to them, and, when
    `audio_time_tokens` > 0, that many of the budget as time bins instead (the mean of the frames
    over equal fractions of the input's duration). The whole clip is therefore heard
    coarsely and a short re-listened slice finely: the information bottleneck re-listening breaks.
    The text side is a Qwen2 decoder (`text_config`).

    `audio_encoder` picks what hears the frames (echo-tiny 2, issue 16):
    - "conv" (echo-tiny, the shipped model): 64-bin log-mel, two stride-2 convolutions trained from scratch;
    - "whisper-tiny.en": Whisper's 80-bin log-mel on the input's own frames, the frozen Whisper tiny.en encoder
      (50 frames/s, 384-d; 30 s windows for longer inputs), then a trained Linear 384 -> `audio_hidden_size`
      and the same pooling, transformer, queries and time bins. The encoder's weights are not part of the model's
      own weights: they come from the package asset, whose sha256 `audio_encoder_sha256` records.
    """

    model_type = "echo_tiny"
    sub_configs = {"text_config": Qwen2Config}

    def __init__(
        self,
        text_config: dict[str, Any] | Qwen2Config | None = None,
        n_mels: int = 64,
        sampling_rate: int = 16000,
        audio_hidden_size: int = 128,
        audio_layers: int = 2,
        audio_heads: int = 4,
        audio_tokens: int = 16,
        audio_time_tokens: int = 0,
        max_audio_positions: int = 256,
        audio_token_id: int = 0,
        audio_bos_token_id: int = 0,
        audio_eos_token_id: int = 0,
        audio_encoder: AudioEncoderKind = "conv",
        audio_encoder_sha256: str | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(text_config, dict):
            text_config = Qwen2Config(**text_config)
        self.text_config = text_config or Qwen2Config()
        self.n_mels = n_mels
        self.sampling_rate = sampling_rate
        self.audio_hidden_size = audio_hidden_size
        self.audio_layers = audio_layers
        self.audio_heads = audio_heads
        if not 0 <= audio_time_tokens < audio_tokens:
            raise ValueError(f"audio_time_tokens must be in [0, audio_tokens), got {audio_time_tokens}")
        self.audio_tokens = audio_tokens
        self.audio_time_tokens = audio_time_tokens
        self.max_audio_positions = max_audio_positions
        self.audio_token_id = audio_token_id
        self.audio_bos_token_id = audio_bos_token_id
        self.audio_eos_token_id = audio_eos_token_id
        if audio_encoder not in get_args(AudioEncoderKind):
            raise ValueError(f"audio_encoder must be one of {get_args(AudioEncoderKind)}, got {audio_encoder!r}")
        if audio_encoder != "conv" and n_mels != WHISPER_N_MELS:
            raise ValueError(f"audio_encoder {audio_encoder!r} hears {WHISPER_N_MELS} mel bins, got n_mels={n_mels}")
        self.audio_encoder = audio_encoder
        self.audio_encoder_sha256 = audio_encoder_sha256
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)

    def get_text_config(self, *args: Any, **kwargs: Any) -> Qwen2Config:
        return self.text_config
