"""Which transformers class runs a given audio-LLM config. Only families whose processors expand
`<|audio_bos|><|AUDIO|><|audio_eos|>` per clip are listed; others need their own adapter."""

from __future__ import annotations

from typing import Any

from .errors import BackendError

SUPPORTED = ("echo_tiny", "qwen2_audio", "qwen2_5_omni_thinker", "qwen2_5_omni")


def model_class(config: Any) -> Any:
    import transformers

    model_type = getattr(config, "model_type", None)
    if model_type == "echo_tiny":
        from .echo_tiny import EchoTinyForConditionalGeneration

        return EchoTinyForConditionalGeneration
    if model_type == "qwen2_audio":
        return transformers.Qwen2AudioForConditionalGeneration
    if model_type == "qwen2_5_omni_thinker":
        return transformers.Qwen2_5OmniThinkerForConditionalGeneration
    if model_type == "qwen2_5_omni":
        # The full Omni model's text path is its thinker; load the thinker alone (no talker).
        return _OmniThinkerLoader
    raise BackendError(f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED)}")


class _OmniThinkerLoader:
    @staticmethod
    def from_pretrained(path: Any, **kwargs: Any) -> Any:
        import transformers

        full = transformers.Qwen2_5OmniForConditionalGeneration.from_pretrained(path, **kwargs)
        return full.thinker
