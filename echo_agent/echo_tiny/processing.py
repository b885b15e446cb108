"""`EchoTinyProcessor`: log-mel features, a byte-level BPE tokenizer and a ChatML template.

Each `<|AUDIO|>` in the text becomes exactly `audio_tokens` placeholder tokens, whatever the
clip's length: that fixed budget is the model's defining property (see `EchoTinyConfig`).
The processor speaks the same call convention as transformers' Qwen audio processors
(`processor(text=..., audio=[...], sampling_rate=..., return_tensors="pt")` returning
`input_ids`, `input_features`, `feature_attention_mask`), so `TransformersBackend` runs it unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import BatchFeature, PreTrainedTokenizerFast

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


class EchoTinyFeatureExtractor:
    """Log-mel features at 100 frames/s (25 ms window, 10 ms hop), standardised on a fixed scale."""

    def __init__(self, sampling_rate: int = 16000, n_mels: int = 64, n_fft: int = 400, hop_length: int = 160) -> None:
        self.sampling_rate, self.n_mels, self.n_fft, self.hop_length = sampling_rate, n_mels, n_fft, hop_length
        self._mel: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"sampling_rate": self.sampling_rate, "n_mels": self.n_mels, "n_fft": self.n_fft,
                "hop_length": self.hop_length}  # fmt: skip

    def frames(self, n_samples: int) -> int:
        return n_samples // self.hop_length + 1

    def log_mel(self, waveform: np.ndarray) -> torch.Tensor:
        if self._mel is None:
            import torchaudio

            self._mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=self.sampling_rate, n_fft=self.n_fft, hop_length=self.hop_length, n_mels=self.n_mels
            )
        x = torch.from_numpy(np.array(waveform, dtype=np.float32))  # a copy: store arrays are read-only
        with torch.no_grad():
            mel = self._mel(x)  # (n_mels, frames)
        return (torch.log10(mel.clamp(min=1e-8)) - LOG_MEL_MEAN) / LOG_MEL_STD

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


class EchoTinyProcessor:
    def __init__(
        self,
        feature_extractor: EchoTinyFeatureExtractor,
        tokenizer: PreTrainedTokenizerFast,
        audio_tokens: int = 16,
        chat_template: str = CHAT_TEMPLATE,
    ) -> None:
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.audio_tokens = audio_tokens
        self.chat_template = chat_template
        self._template = ImmutableSandboxedEnvironment(trim_blocks=False).from_string(chat_template)

    def apply_chat_template(
        self, conversation: list[dict[str, Any]], add_generation_prompt: bool = False, tokenize: bool = False, **_: Any
    ) -> str:
        if tokenize:
            raise ValueError("EchoTinyProcessor.apply_chat_template renders text; call the processor to tokenize")
        return str(self._template.render(messages=conversation, add_generation_prompt=add_generation_prompt))

    def __call__(
        self,
        text: str | list[str],
        audio: Sequence[np.ndarray] | None = None,
        sampling_rate: int | None = None,
        return_tensors: str = "pt",
        **_: Any,
    ) -> BatchFeature:
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

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        config = {"processor_class": "EchoTinyProcessor", "audio_tokens": self.audio_tokens,
                  "feature_extractor": self.feature_extractor.to_dict(), "template": self.chat_template}  # fmt: skip
        (path / "processor_config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, **_: Any) -> EchoTinyProcessor:
        path = Path(path)
        config = json.loads((path / "processor_config.json").read_text())
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return cls(
            EchoTinyFeatureExtractor(**config["feature_extractor"]),
            tokenizer,
            audio_tokens=config["audio_tokens"],
            chat_template=config["template"],
        )


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
