"""echo-tiny's audio side: frames in, a fixed budget of `audio_tokens` decoder embeddings out.

Two front ends share one back half (`AudioTokenHead`: time embeddings, a small transformer, learned queries and
time bins, a projection to the decoder width):
- `EchoTinyAudioEncoder` (`audio_encoder="conv"`, echo-tiny): two stride-2 convolutions over 64-bin log-mel,
  trained from scratch, 25 frames/s;
- `EchoTinyWhisperAudio` (`audio_encoder="whisper-tiny.en"`, echo-tiny 2): the frozen Whisper tiny.en encoder on
  each input's own frames (50 frames/s, 384-d), then a trained Linear 384 -> `audio_hidden_size`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..whisper_encoder import DEFAULT_ENCODER_PATH, FRAMES_PER_SECOND, WEIGHTS_NAME, WhisperAudioEncoder
from .configuration import EchoTinyConfig

FRAME_RATE = 25.0  # encoder frames per second after the two stride-2 convolutions (10 ms mel hop)
WHISPER_WINDOW_MELS = 3000  # log-mel frames in one 30 s Whisper window
WHISPER_HIDDEN = 384  # Whisper tiny.en's d_model
# Whisper's per-input frames kept for reuse (fp32: 2.3 MB per 30 s). The encoder is frozen, so its output for the
# same features never changes: training steps (grad on, where the token cache is off) reuse it too.
WHISPER_FRAME_CACHE_BYTES = 64 << 20
_MAX_BATCH_FRAMES = 6000  # padded Whisper output frames per encoder call (four 30 s windows)


class TensorCache:
    """An LRU of tensors bounded by count and by bytes (the newest entry always stays)."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._items[key] = value
        self.nbytes += value.nbytes
        while len(self._items) > 1 and (len(self._items) > self.max_items or self.nbytes > self.max_bytes):
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


def features_key(features: torch.Tensor, tag: str) -> bytes:
    """A digest of one input's valid (mels, T) features and `tag` (dtype, device, weights' version)."""
    h = hashlib.blake2b(features.detach().float().cpu().numpy().tobytes(), digest_size=16)
    h.update(tag.encode())
    return h.digest()


def time_embedding(seconds: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of absolute time in seconds (periods from 40 ms to ~2 min)."""
    half = dim // 2
    periods = torch.logspace(math.log10(0.04), math.log10(128.0), half, device=seconds.device)
    angles = 2 * math.pi * seconds.unsqueeze(-1) / periods
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class AudioTokenHead(nn.Module):
    """Frames of width d (with their times) -> `audio_tokens` embeddings of the decoder's width."""

    max_positions: int
    time_tokens: int

    def _build_head(self, config: EchoTinyConfig, d: int) -> None:
        # Called after the front end's own layers: the creation order fixes a seed's initial weights.
        self.max_positions = config.max_audio_positions
        layer = nn.TransformerEncoderLayer(
            d, config.audio_heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, config.audio_layers, enable_nested_tensor=False)
        # The time embedding starts small so it does not drown the front end's output.
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

    def tokens(self, x: torch.Tensor, frames: torch.Tensor, steps: list[float]) -> torch.Tensor:
        """x (n, F, d) right-padded frames, frames (n,) valid counts, steps: seconds per frame of each row ->
        (n, audio_tokens, hidden)."""
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


class EchoTinyAudioEncoder(AudioTokenHead):
    """echo-tiny's own encoder: strided convolutions trained from scratch (`audio_encoder="conv"`)."""

    def __init__(self, config: EchoTinyConfig) -> None:
        super().__init__()
        d = config.audio_hidden_size
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self._build_head(config, d)

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
        return self.tokens(x, frames, steps)


@functools.lru_cache(maxsize=4)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too, so a replaced file is hashed again.
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encoder_asset_sha256(path: Path = DEFAULT_ENCODER_PATH) -> str:
    """sha256 of the Whisper encoder asset's weights file (what `audio_encoder_sha256` records)."""
    weights = path / WEIGHTS_NAME
    stat = weights.stat()
    return _file_sha256(weights, stat.st_size, stat.st_mtime_ns)


class EchoTinyWhisperAudio(AudioTokenHead):
    """echo-tiny 2's audio side: the frozen Whisper tiny.en encoder, then a trained projector to the token budget.

    The encoder is held outside the module tree: it is not in `parameters()` or `state_dict()` (so neither in the
    optimizer nor in the model's saved weights; it loads from the package asset), `.train()` never reaches it, and
    it follows the projector's device and dtype (or `encoder_dtype`), reloaded from the asset when the dtype changes,
    so `.to()` just works. Its frames are cached by features (`frame_cache`, bounded by bytes): it never changes.
    """

    frame_cache: TensorCache
    encoder_dtype: torch.dtype | None
    """The dtype Whisper runs in; None (the default): the projector's. bfloat16 halves the encoder's CPU time where
    the CPU has bf16 instructions (AVX512-BF16, AMX) at ~1.6% relative error in its frames (min cosine 0.999)."""
    _whisper: WhisperAudioEncoder | None  # set through __dict__: assigned as an attribute it would become a submodule

    def __init__(self, config: EchoTinyConfig, encoder_path: Path = DEFAULT_ENCODER_PATH) -> None:
        super().__init__()
        self.encoder_path = encoder_path
        found = encoder_asset_sha256(encoder_path)
        if config.audio_encoder_sha256 is None:
            config.audio_encoder_sha256 = found  # a fresh model: record the encoder it hears through
        elif config.audio_encoder_sha256 != found:
            raise ValueError(
                f"this echo-tiny 2 was trained on the Whisper tiny.en encoder with sha256 "
                f"{config.audio_encoder_sha256}, but {encoder_path / WEIGHTS_NAME} has sha256 {found}: reinstall "
                "echo-agent (the asset ships with it) or reconvert it (python -m echo_agent.training.convert_whisper)"
            )
        d = config.audio_hidden_size
        self.in_proj = nn.Linear(WHISPER_HIDDEN, d)
        self._build_head(config, d)
        self.frame_cache = TensorCache(1 << 16, WHISPER_FRAME_CACHE_BYTES)  # frames of inputs already encoded
        self.encoder_dtype = None
        self.__dict__["_whisper"] = None

    @property
    def whisper(self) -> WhisperAudioEncoder:
        """The frozen encoder on the projector's device, in `encoder_dtype` or the projector's (loaded on first use)."""
        ref = self.in_proj.weight
        dtype = self.encoder_dtype or ref.dtype
        w = self._whisper
        if w is None or w.dtype != dtype:
            w = WhisperAudioEncoder.from_pretrained(self.encoder_path, dtype=dtype)
            self.frame_cache.clear()
        if w.device != ref.device:
            w = w.to(ref.device)
            self.frame_cache.clear()
        self.__dict__["_whisper"] = w
        return w

    def encode_frames(self, features: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        """Whisper frames (T_i, 384) of each row's first `lengths[i]` log-mel frames, 30 s windows encoded on their own
        and concatenated. Rows already encoded come from the frame cache; the rest are encoded together, windows of
        similar length (within 25%) in one encoder call each."""
        whisper = self.whisper
        cache: TensorCache = self.frame_cache
        tag = f"{whisper.dtype}:{whisper.device}"
        keys = [features_key(features[i, :, :n], tag) for i, n in enumerate(lengths)]
        found = {k: v for k in dict.fromkeys(keys) if (v := cache.get(k)) is not None}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            first = {k: keys.index(k) for k in missing}
            windows = [(k, features[first[k], :, s : min(s + WHISPER_WINDOW_MELS, lengths[first[k]])])
                       for k in missing for s in range(0, max(lengths[first[k]], 1), WHISPER_WINDOW_MELS)]  # fmt: skip
            outs = _encode_windows(whisper, [w for _, w in windows])
            parts: dict[bytes, list[torch.Tensor]] = {k: [] for k in missing}
            for (k, _), out in zip(windows, outs, strict=True):
                parts[k].append(out)
            for k in missing:
                found[k] = parts[k][0] if len(parts[k]) == 1 else torch.cat(parts[k])
                cache.put(k, found[k])
        for k, frames in found.items():
            if frames.is_inference() and not torch.is_inference_mode_enabled():
                found[k] = frames.clone()  # encoded while generating, now feeding a backward pass
                cache.put(k, found[k])
        return [found[k] for k in keys]

    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
        """features (n, 80, T) Whisper log-mel, feature_mask (n, T) -> (n, audio_tokens, hidden)."""
        lengths = [int(n) for n in feature_mask.sum(-1).clamp(min=1).tolist()]
        rows, steps = [], []
        for h in self.encode_frames(features, lengths):
            step = 1 / FRAMES_PER_SECOND  # 20 ms per Whisper frame
            if h.shape[0] > self.max_positions:
                # Long inputs are heard coarsely: frames averaged down to the position budget, so a 30 s clip costs
                # the projector what a 5 s slice does.
                step = h.shape[0] / FRAMES_PER_SECOND / self.max_positions
                h = F.adaptive_avg_pool1d(h.T.unsqueeze(0), self.max_positions)[0].T
            rows.append(h)
            steps.append(step)
        x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(self.in_proj.weight.dtype)
        frames = torch.tensor([r.shape[0] for r in rows], device=x.device)
        return self.tokens(self.in_proj(x), frames, steps)


def _encode_windows(whisper: WhisperAudioEncoder, mels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each (80, m) log-mel window (m <= 3000) through the encoder: (ceil(m / 2), 384) frames, batched by length."""
    order = sorted(range(len(mels)), key=lambda j: mels[j].shape[-1])
    batches: list[list[int]] = []
    for j in order:
        m = mels[j].shape[-1]
        if batches:
            b = batches[-1]
            if m <= 1.25 * mels[b[0]].shape[-1] and (m + 1) // 2 * (len(b) + 1) <= _MAX_BATCH_FRAMES:
                b.append(j)
                continue
        batches.append([j])
    outputs: list[torch.Tensor] = [mels[0]] * len(mels)
    with torch.no_grad():
        for batch in batches:
            lengths = torch.tensor([mels[j].shape[-1] for j in batch])
            feats = mels[batch[0]].new_zeros(len(batch), mels[batch[0]].shape[0], int(lengths.max()))
            for row, j in enumerate(batch):
                feats[row, :, : mels[j].shape[-1]] = mels[j]
            hidden = whisper(feats, lengths if len(batch) > 1 else None)
            for row, j in enumerate(batch):
                outputs[j] = hidden[row, : (int(lengths[row]) + 1) // 2].clone()  # not a view of the batch
    return outputs
