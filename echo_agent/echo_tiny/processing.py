"""`EchoTinyProcessor`: log-mel features, a byte-level BPE tokenizer and a ChatML template.

Each `<|AUDIO|>` in the text becomes exactly `audio_tokens` placeholder tokens, whatever the
clip's length: that fixed budget is the model's defining property (see `EchoTinyConfig`).
The processor speaks the same call convention as transformers' Qwen audio processors
(`processor(text=..., audio=[...], sampling_rate=..., return_tensors="pt")` returning
`input_ids`, `input_features`, `feature_attention_mask`), so `TransformersBackend` runs it unchanged.

Both classes are real transformers processors (`ProcessorMixin`, `SequenceFeatureExtractor`): saving,
loading through `AutoProcessor`/`AutoFeatureExtractor` and `apply_chat_template` are transformers' own.
Model directories written before that (a `processor_config.json` with the template under `template` and
the feature extractor's settings without `feature_extractor_type`, as the shipped echo-tiny has) still load:
the template is read from there, the feature extractor found through config.json's model type.

echo-tiny 2 (`audio_encoder="whisper-tiny.en"`) uses the same classes with `EchoTinyFeatureExtractor(mel="whisper")`:
Whisper's own 80-bin log-mel, computed on the input's real length (never padded to 30 s), per 30 s window.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
from transformers import BatchFeature, PreTrainedTokenizerBase, PreTrainedTokenizerFast, ProcessorMixin
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor

from ..whisper_encoder import DEFAULT_ENCODER_PATH, HOP, MIN_SAMPLES, WINDOW_SAMPLES

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS]
PROTOCOL_TOKENS = ["<seg>", "</seg>", "<think>", "</think>", "<answer>", "</answer>"]

# ChatML, as in the Qwen family, without a default system prompt (it would only cost tokens here).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# log10 mel power of the suite's peak-normalised clips has mean ~ -0.1 and std ~ 0.75: features are
# standardised with these fixed constants (not per input, which would erase absolute loudness).
LOG_MEL_MEAN, LOG_MEL_STD = -0.1, 0.75


@functools.lru_cache(maxsize=8)
def _mel_transform(sampling_rate: int, n_fft: int, hop_length: int, n_mels: int) -> Any:
    # Built once per setting and kept off the instance, so `to_dict`/deepcopy never meet a torch module.
    import torchaudio

    # center=False: `log_mel` reflect-pads the whole input once (as center=True would) and transforms it in
    # blocks of frames, so a long input's STFT is never whole in memory (10 min would take ~280 MB).
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sampling_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, center=False
    )


_BLOCK_FRAMES = 6000  # 60 s at 100 frames/s: ~10 MB of STFT per block


@functools.lru_cache(maxsize=1)
def _whisper_features() -> Any:
    # The encoder asset's own settings, so these are exactly the features `WhisperAudioEncoder.log_mel` computes.
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor.from_pretrained(DEFAULT_ENCODER_PATH)


MelKind = Literal["echo", "whisper"]
_WHISPER_SETTINGS = {"sampling_rate": 16000, "n_mels": 80, "n_fft": 400, "hop_length": HOP}


def _windows(n_samples: int) -> list[tuple[int, int]]:
    """The 30 s windows (start, end) that Whisper hears an input of `n_samples` in."""
    return [(s, min(s + WINDOW_SAMPLES, n_samples)) for s in range(0, max(n_samples, 1), WINDOW_SAMPLES)]


class EchoTinyFeatureExtractor(SequenceFeatureExtractor):
    """Log-mel features at 100 frames/s (25 ms window, 10 ms hop).

    `mel="echo"` (echo-tiny): 64-bin log10 mel power standardised on a fixed scale, len // hop + 1 frames.
    `mel="whisper"` (echo-tiny 2): Whisper's 80-bin log-mel of each 30 s window of the input on its own (len // 160
    frames, a full window 3000), concatenated; inputs under 20 ms are zero-padded to 20 ms (Whisper's STFT needs it).
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(
        self,
        sampling_rate: int = 16000,
        n_mels: int = 64,
        n_fft: int = 400,
        hop_length: int = 160,
        mel: MelKind = "echo",
        **kwargs: Any,
    ) -> None:
        # `feature_size` is n_mels and padding is zeros; saved copies of both are ignored so they cannot disagree.
        kwargs.pop("feature_size", None)
        kwargs.pop("padding_value", None)
        if mel not in get_args(MelKind):
            raise ValueError(f"mel must be one of {get_args(MelKind)}, got {mel!r}")
        given = {"sampling_rate": sampling_rate, "n_mels": n_mels, "n_fft": n_fft, "hop_length": hop_length}
        if mel == "whisper" and given != _WHISPER_SETTINGS:
            raise ValueError(f"Whisper's log-mel has fixed settings {_WHISPER_SETTINGS}, got {given}")
        super().__init__(feature_size=n_mels, sampling_rate=sampling_rate, padding_value=0.0, **kwargs)
        self.n_mels, self.n_fft, self.hop_length, self.mel = n_mels, n_fft, hop_length, mel

    @classmethod
    def whisper(cls) -> EchoTinyFeatureExtractor:
        """echo-tiny 2's feature extractor."""
        return cls(**_WHISPER_SETTINGS, mel="whisper")

    def frames(self, n_samples: int) -> int:
        if self.mel == "whisper":
            return sum(max(end - start, MIN_SAMPLES) // HOP for start, end in _windows(n_samples))
        return int(n_samples // self.hop_length + 1)

    def log_mel(self, waveform: np.ndarray) -> torch.Tensor:
        if self.mel == "whisper":
            return self._whisper_log_mel(waveform)
        mel_transform = _mel_transform(int(self.sampling_rate), self.n_fft, self.hop_length, self.n_mels)
        x = np.asarray(waveform, dtype=np.float32).reshape(-1)
        half = self.n_fft // 2
        # reflect (as center=True pads) needs more samples than the pad
        mode: Literal["reflect", "constant"] = "reflect" if x.shape[0] > half else "constant"
        n_frames = self.frames(x.shape[0])
        out = torch.empty(self.n_mels, n_frames)
        padded = torch.from_numpy(np.pad(x, half, mode=mode))  # a new, writable array (store arrays are read-only)
        with torch.no_grad():
            for f0 in range(0, n_frames, _BLOCK_FRAMES):
                f1 = min(f0 + _BLOCK_FRAMES, n_frames)
                span = padded[f0 * self.hop_length : (f1 - 1) * self.hop_length + self.n_fft]
                mel = mel_transform(span)  # (n_mels, f1 - f0)
                out[:, f0:f1] = (torch.log10(mel.clamp(min=1e-8)) - LOG_MEL_MEAN) / LOG_MEL_STD
        return out

    def _whisper_log_mel(self, waveform: np.ndarray) -> torch.Tensor:
        # Each window is normalised on its own (Whisper clamps to its max - 8 dB): what the encoder saw in training.
        x = np.asarray(waveform, dtype=np.float32).reshape(-1)
        fe = _whisper_features()
        parts = []
        for start, end in _windows(len(x)):
            w = x[start:end]
            if len(w) < MIN_SAMPLES:
                w = np.pad(w, (0, MIN_SAMPLES - len(w)))
            feats = fe(w, sampling_rate=self.sampling_rate, padding="longest", max_length=WINDOW_SAMPLES,
                       return_tensors="np")["input_features"][0]  # fmt: skip
            parts.append(torch.from_numpy(np.ascontiguousarray(feats)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def __call__(
        self, audio: Sequence[np.ndarray], sampling_rate: int | None = None, return_tensors: str = "pt", **_: Any
    ) -> BatchFeature:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"expected audio at {self.sampling_rate} Hz, got {sampling_rate} Hz")
        mels = [self.log_mel(a) for a in audio]
        width = max(m.shape[-1] for m in mels)
        feats = torch.zeros(len(mels), self.n_mels, width)
        mask = torch.zeros(len(mels), width, dtype=torch.long)
        for i, m in enumerate(mels):
            feats[i, :, : m.shape[-1]] = m
            mask[i, : m.shape[-1]] = 1
        return BatchFeature({"input_features": feats, "attention_mask": mask})


class EchoTinyProcessor(ProcessorMixin):
    """The feature extractor and tokenizer of echo-tiny, with its fixed per-clip `audio_tokens` budget."""

    audio_family: ClassVar[str] = "echo_tiny"
    """Read by `echo_agent.backends.transformers.processor_family`: how the backend lays out audio features."""

    feature_extractor: EchoTinyFeatureExtractor
    tokenizer: PreTrainedTokenizerBase
    chat_template: str

    def __init__(
        self,
        feature_extractor: EchoTinyFeatureExtractor,
        tokenizer: PreTrainedTokenizerBase,
        audio_tokens: int = 16,
        chat_template: str | None = None,
    ) -> None:
        # ProcessorMixin finds the sub-processors by these parameter names and checks their base classes.
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        self.audio_tokens = audio_tokens

    @classmethod
    def get_processor_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        processor_dict, kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        # The pre-ProcessorMixin format kept the chat template in processor_config.json under `template`.
        legacy_template = processor_dict.pop("template", None)
        if legacy_template is not None:
            processor_dict.setdefault("chat_template", legacy_template)
        return processor_dict, kwargs

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio: Sequence[np.ndarray] | None = None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        images: Any = None,
        videos: Any = None,
        **_: Any,
    ) -> BatchFeature:
        """Always PyTorch tensors; `images`/`videos` exist only so ProcessorMixin's generic callers can pass None."""
        if text is None:
            raise ValueError("EchoTinyProcessor needs text (with one <|AUDIO|> per audio input)")
        if images is not None or videos is not None:
            raise ValueError("echo-tiny takes text and audio only")
        texts = [text] if isinstance(text, str) else list(text)
        audios = list(audio or [])
        n_placeholders = sum(t.count(AUDIO_TOKEN) for t in texts)
        if n_placeholders != len(audios):
            raise ValueError(f"{n_placeholders} {AUDIO_TOKEN} placeholders but {len(audios)} audio inputs")
        expanded = [t.replace(AUDIO_TOKEN, AUDIO_TOKEN * self.audio_tokens) for t in texts]
        enc = self.tokenizer(expanded, add_special_tokens=False, padding=True, return_tensors="pt")
        data: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if audios:
            feats = self.feature_extractor(audios, sampling_rate=sampling_rate)
            data["input_features"] = feats["input_features"]
            data["feature_attention_mask"] = feats["attention_mask"]
        return BatchFeature(data)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "feature_attention_mask"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text round-trips) with digits kept as single tokens, so numbers
    are copied digit by digit, and the special and protocol tokens as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.add_tokens(PROTOCOL_TOKENS)  # not special: they survive decode(skip_special_tokens=True)
    return fast
