"""`EchoTinyForConditionalGeneration`: a fixed-budget audio encoder in front of a Qwen2 decoder."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import EchoTinyConfig

FRAME_RATE = 25.0  # encoder frames per second after the two stride-2 convolutions (10 ms mel hop)


def time_embedding(seconds: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of absolute time in seconds (periods from 40 ms to ~2 min)."""
    half = dim // 2
    periods = torch.logspace(math.log10(0.04), math.log10(128.0), half, device=seconds.device)
    angles = 2 * math.pi * seconds.unsqueeze(-1) / periods
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class EchoTinyAudioEncoder(nn.Module):
    def __init__(self, config: EchoTinyConfig) -> None:
        super().__init__()
        d = config.audio_hidden_size
        self.max_positions = config.max_audio_positions
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        layer = nn.TransformerEncoderLayer(
            d, config.audio_heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, config.audio_layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(config.audio_tokens, d) * 0.02)
        self.pool = nn.MultiheadAttention(d, config.audio_heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
        """features (n, mels, T), feature_mask (n, T) -> (n, audio_tokens, hidden)."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(features))))  # (n, d, ~T/4)
        lengths = ((feature_mask.sum(-1) - 1) // 4 + 1).clamp(min=1, max=x.shape[-1])
        # Long inputs are average-pooled to at most `max_positions` frames: the coarse whole-clip view.
        rows, times = [], []
        for i in range(x.shape[0]):
            n = int(lengths[i])
            xi = x[i, :, :n]
            step = 1.0 / FRAME_RATE
            if n > self.max_positions:
                xi = F.adaptive_avg_pool1d(xi.unsqueeze(0), self.max_positions).squeeze(0)
                step = n / FRAME_RATE / self.max_positions
            m = xi.shape[-1]
            rows.append(xi.transpose(0, 1))
            times.append((torch.arange(m, device=x.device, dtype=x.dtype) + 0.5) * step)
        width = max(r.shape[0] for r in rows)
        h = x.new_zeros(len(rows), width, x.shape[1])
        t = x.new_zeros(len(rows), width)
        pad = torch.ones(len(rows), width, dtype=torch.bool, device=x.device)
        for i, (r, ti) in enumerate(zip(rows, times, strict=True)):
            h[i, : r.shape[0]] = r
            t[i, : r.shape[0]] = ti
            pad[i, : r.shape[0]] = False
        h = h + time_embedding(t, h.shape[-1])
        h = self.layers(h, src_key_padding_mask=pad)
        q = self.queries.unsqueeze(0).expand(h.shape[0], -1, -1)
        pooled, _ = self.pool(q, h, h, key_padding_mask=pad, need_weights=False)
        out: torch.Tensor = self.proj(self.norm(pooled + q))
        return out


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
        self.audio_encoder = EchoTinyAudioEncoder(config)
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
                audio = self.audio_embeddings(input_features, feature_attention_mask).to(inputs_embeds.dtype)
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
