"""`EchoTinyForConditionalGeneration`: a fixed-budget audio encoder in front of a Qwen2 decoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .audio import FRAME_RATE, EchoTinyAudioEncoder, EchoTinyWhisperAudio, TensorCache, features_key, time_embedding
from .configuration import EchoTinyConfig

__all__ = ["FRAME_RATE", "EchoTinyAudioEncoder", "EchoTinyForConditionalGeneration", "time_embedding"]

# Encoded inputs kept at inference (audio_tokens x decoder width floats: 16 KB each for the shipped echo-tiny, 32 KB
# for echo-tiny 2's default), bounded by bytes too so a wider decoder cannot make the cache large.
_AUDIO_CACHE_SIZE = 512
_AUDIO_CACHE_BYTES = 32 << 20


class EchoTinyPreTrainedModel(PreTrainedModel):
    config_class = EchoTinyConfig
    config: EchoTinyConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["Qwen2DecoderLayer"]


class EchoTinyForConditionalGeneration(EchoTinyPreTrainedModel, GenerationMixin):
    def __init__(self, config: EchoTinyConfig) -> None:
        super().__init__(config)
        # "conv": echo-tiny's own encoder; "whisper-tiny.en": echo-tiny 2's projector over the frozen Whisper encoder.
        audio: nn.Module = (
            EchoTinyAudioEncoder(config) if config.audio_encoder == "conv" else EchoTinyWhisperAudio(config)
        )
        self.audio_encoder = audio
        self.language_model = Qwen2ForCausalLM(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        head: nn.Module = self.language_model.get_output_embeddings()
        return head

    def audio_embeddings(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.audio_encoder(input_features, feature_attention_mask)
        return out

    def _inference_audio(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`audio_embeddings` with a cache keyed by each input's features: at inference a clip is encoded once,
        not again at every model call of every rollout that hears it (the encoder dominated batched decoding).
        The key includes the encoder weights' version counters, so a training step invalidates it; training
        (grad enabled) never uses it. A row's embedding does not depend on its batch (the encoder sees each row
        at its own length), so cached and fresh rows agree up to floating-point effects of batch shape."""
        versions = sum(p._version for p in self.audio_encoder.parameters())
        cache: TensorCache = self.__dict__.setdefault("audio_cache", TensorCache(_AUDIO_CACHE_SIZE, _AUDIO_CACHE_BYTES))
        lengths = [int(n) for n in mask.sum(-1).tolist()]
        # The Whisper path's frames depend on the dtype it runs in, which may differ from the weights'.
        encoder_dtype = getattr(self.audio_encoder, "encoder_dtype", None)
        tag = f"{versions}:{features.dtype}:{features.device}:{encoder_dtype}"
        keys = [features_key(features[i, :, :n], tag) for i, n in enumerate(lengths)]
        found = {k: v for k in dict.fromkeys(keys) if (v := cache.get(k)) is not None}
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            width = max(lengths[i] for i in missing)
            fresh = self.audio_embeddings(features[missing, :, :width], mask[missing, :width])
            for j, i in enumerate(missing):
                found.setdefault(keys[i], fresh[j].clone())  # its own storage, not a view of the batch
        out = torch.stack([found[k] for k in keys])
        for k in dict.fromkeys(keys):
            cache.put(k, found[k])
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.get_input_embeddings()(input_ids)
            audio_positions = input_ids == self.config.audio_token_id
            # Audio is merged only when its placeholders are in this chunk (prefill), not at decode steps.
            if input_features is not None and bool(audio_positions.any()):
                assert feature_attention_mask is not None
                encode = self.audio_embeddings if torch.is_grad_enabled() or self.training else self._inference_audio
                audio = encode(input_features, feature_attention_mask).to(inputs_embeds.dtype)
                n_slots = int(audio_positions.sum())
                if n_slots != audio.shape[0] * audio.shape[1]:
                    raise ValueError(
                        f"{n_slots} audio placeholder tokens for {audio.shape[0]} audio inputs "
                        f"x {audio.shape[1]} tokens each"
                    )
                mask = audio_positions.unsqueeze(-1).expand_as(inputs_embeds)
                inputs_embeds = inputs_embeds.masked_scatter(mask, audio.reshape(-1))
        out: CausalLMOutputWithPast = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return out
