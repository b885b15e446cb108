"""`EchoTinyForConditionalGeneration`: a fixed-budget audio encoder in front of a Qwen2 decoder."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import EchoTinyConfig

FRAME_RATE = 25.0  # encoder frames per second after the two stride-2 convolutions (10 ms mel hop)
_AUDIO_CACHE_SIZE = 512  # encoded inputs kept at inference (~25 KB each at the shipped size)


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
        # The time embedding starts small so it does not drown the convolutions' output.
        self.time_scale = nn.Parameter(torch.tensor(0.1))
        # Time bins count where queries cannot: a softmax-pooled query averages the frames it attends
        # to, so it reads "beeps are here" but loses how many; a bin's mean keeps each beep local.
        self.time_tokens = getattr(config, "audio_time_tokens", 0)
        self.queries = nn.Parameter(torch.randn(config.audio_tokens - self.time_tokens, d) * 0.02)
        if self.time_tokens:
            self.bin_embed = nn.Parameter(torch.randn(self.time_tokens, d) * 0.02)
        self.pool = nn.MultiheadAttention(d, config.audio_heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
        """features (n, mels, T), feature_mask (n, T) -> (n, audio_tokens, hidden)."""
        # Inputs longer than the position budget are average-pooled over time *before* the
        # convolutions (4 mel frames per encoder frame): the coarse whole-clip view, at a fixed cost.
        budget = 4 * self.max_positions
        lengths = feature_mask.sum(-1).clamp(min=1).tolist()
        rows, steps = [], []
        for i, n in enumerate(lengths):
            xi = features[i, :, : int(n)]
            step = 4 / (FRAME_RATE * 4)  # seconds per encoder frame at full resolution (40 ms)
            if xi.shape[-1] > budget:
                step = xi.shape[-1] / (FRAME_RATE * 4) / self.max_positions
                xi = F.adaptive_avg_pool1d(xi.unsqueeze(0), budget).squeeze(0)
            rows.append(xi)
            steps.append(step)
        width = max(r.shape[-1] for r in rows)
        x = features.new_zeros(len(rows), features.shape[1], width)
        for i, r in enumerate(rows):
            x[i, :, : r.shape[-1]] = r
        x = F.gelu(self.conv1(x))
        # Zero conv1's outputs past each row's end, as a row encoded alone sees (conv2's zero padding):
        # otherwise a padded row's last frame would depend on what it was batched with.
        half = torch.tensor([(r.shape[-1] - 1) // 2 + 1 for r in rows], device=x.device)
        x = x * (torch.arange(x.shape[-1], device=x.device).unsqueeze(0) < half.unsqueeze(1)).unsqueeze(1)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (n, frames, d)
        frames = torch.tensor([(r.shape[-1] - 1) // 4 + 1 for r in rows], device=x.device)
        index = torch.arange(x.shape[1], device=x.device)
        pad = index.unsqueeze(0) >= frames.unsqueeze(1)
        times = (index.unsqueeze(0) + 0.5) * torch.tensor(steps, device=x.device, dtype=x.dtype).unsqueeze(1)
        h = x + self.time_scale * time_embedding(times, x.shape[-1]).to(x.dtype)  # bf16/fp16 models too
        h = self.layers(h, src_key_padding_mask=pad)
        q = self.queries.unsqueeze(0).expand(h.shape[0], -1, -1)
        pooled, _ = self.pool(q, h, h, key_padding_mask=pad, need_weights=False)
        tokens = pooled + q
        if self.time_tokens:
            valid = [h[i, : int(f)].T.unsqueeze(0) for i, f in enumerate(frames)]
            bins = torch.stack([F.adaptive_avg_pool1d(v, self.time_tokens)[0].T for v in valid])
            tokens = torch.cat([tokens, bins + self.bin_embed], dim=1)
        out: torch.Tensor = self.proj(self.norm(tokens))
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

    def _inference_audio(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`audio_embeddings` with a cache keyed by each input's features: at inference a clip is encoded once,
        not again at every model call of every rollout that hears it (the encoder dominated batched decoding).
        The key includes the encoder weights' version counters, so a training step invalidates it; training
        (grad enabled) never uses it. A row's embedding does not depend on its batch (the encoder sees each row
        at its own length), so cached and fresh rows agree up to floating-point effects of batch shape."""
        versions = sum(p._version for p in self.audio_encoder.parameters())
        cache: OrderedDict[bytes, torch.Tensor] = self.__dict__.setdefault("_audio_cache", OrderedDict())
        lengths = [int(n) for n in mask.sum(-1).tolist()]
        keys = []
        for i, n in enumerate(lengths):
            h = hashlib.blake2b(features[i, :, :n].detach().float().cpu().numpy().tobytes(), digest_size=16)
            h.update(f"{versions}:{features.dtype}:{features.device}".encode())
            keys.append(h.digest())
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            width = max(lengths[i] for i in missing)
            fresh = self.audio_embeddings(features[missing, :, :width], mask[missing, :width])
            for j, i in enumerate(missing):
                cache[keys[i]] = fresh[j]
        out = torch.stack([cache[k] for k in keys])
        for k in keys:
            cache.move_to_end(k)
        while len(cache) > _AUDIO_CACHE_SIZE:
            cache.popitem(last=False)
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
