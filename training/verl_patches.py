"""The worker-side patches verl 0.9.1 needs to train Qwen2.5-Omni or Qwen2-Audio on our agent loop's output.

Install them in every Ray worker of a verl job with Ray's process setup hook:

    python -m verl.trainer.main_ppo ... \\
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=echo_agent.training.verl_patches.install

`install()` is idempotent and imports only verl modules. What each patch fixes (found on verl 0.9.1 with
transformers 5.24; see ../shared/research/rl_engines.md and docs/verl.md):

1. **Processor whitelist** (`verl.utils.tokenizer.hf_processor`). verl binds a model's `get_rope_index` to its
   processor through a `match` on the processor's class name and raises `ValueError` for every other class; the
   error is caught and the processor silently becomes `None`. For `Qwen2AudioProcessor` and `Qwen2_5OmniProcessor`
   the agent loop then has no processor and verl computes no audio features at all. The patch returns these two
   processors as loaded (audio-only Qwen positions are plain 1-D, so no `get_rope_index` is bound: verl then
   computes `cumsum(attention_mask) - 1`, which is what both models compute themselves).
2. **`validate_inputs`** (on those processors). verl's worker re-extracts the audio features for training by
   decoding the ids with `skip_special_tokens=True`, which deletes every `<|AUDIO|>`, then calling the processor on
   that text and the clips; the processor's placeholder-count check then raises ("Found 0 <|AUDIO|> token(s) ...
   but received 2 audios"). With the check off the processor extracts each clip's features in order, and verl
   keeps only the features (it drops the processor's ids), which is what training needs. verl does the same for
   Gemma 4.
3. **Model class** (`verl.utils.model.get_hf_auto_model_class`). verl falls back to `AutoModel`, which gives the
   head-less `Qwen2AudioModel` for `qwen2_audio` (no logits to train on) and cannot load `qwen2_5_omni` at all.
   The patch returns `Qwen2AudioForConditionalGeneration`, and for Qwen2.5-Omni `OmniThinkerActor` (4).
4. **Talker off** (`OmniThinkerActor`). Qwen2.5-Omni-7B's checkpoint holds the thinker (text out) and the talker
   plus token2wav (speech out); RL trains the thinker only. The loader builds the full model class with
   `enable_audio_output=False`, so the talker and token2wav are never built (their weights are skipped), and
   routes `forward` to the thinker (the speaker table `spk_dict.pt`, which only the talker reads, is not loaded:
   copy it next to a trained checkpoint to speak with it again). Parameter names keep their `thinker.` prefix, as
   the checkpoint has them, so saved checkpoints load back as Qwen2.5-Omni and vLLM's Omni weight loader maps the
   synced weights. (Echo's fork and verl-tool do the same: the full class, `disable_talker()`,
   `forward = thinker.forward`.)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["AUDIO_PROCESSORS", "OmniThinkerActor", "audio_model_class", "install", "installed"]

AUDIO_PROCESSORS = ("Qwen2AudioProcessor", "Qwen2_5OmniProcessor")
_AUDIO_MODEL_TYPES = ("qwen2_audio", "qwen2_5_omni", "qwen2_5_omni_thinker")
_state: dict[str, Any] = {}


class OmniThinkerActor:
    """Loads Qwen2.5-Omni for RL: the full model class without talker and token2wav, `forward` = the thinker's."""

    @staticmethod
    def _thinker_only(model: Any) -> Any:
        if getattr(model, "has_talker", False):
            model.disable_talker()
        model.forward = model.thinker.forward
        model.get_input_embeddings = model.thinker.get_input_embeddings
        model.get_output_embeddings = model.thinker.get_output_embeddings
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any = None, *args: Any, **kwargs: Any) -> Any:
        import transformers

        config = kwargs.pop("config", None)
        if config is None:
            config = transformers.AutoConfig.from_pretrained(pretrained_model_name_or_path)
        config.enable_audio_output = False  # the talker and token2wav are not built
        # PreTrainedModel's loader, not the Omni class's own: that one then loads the talker's speaker table
        # (spk_dict.pt), which a thinker-only model neither needs nor has once verl saves it.
        omni = transformers.Qwen2_5OmniForConditionalGeneration
        model = super(omni, omni).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        return cls._thinker_only(model)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> Any:
        import transformers

        config.enable_audio_output = False
        return cls._thinker_only(transformers.Qwen2_5OmniForConditionalGeneration._from_config(config, **kwargs))


def audio_model_class(hf_config: Any) -> Any | None:
    """The class verl should load for an audio-LLM config (patch 3), or None for any other model."""
    import transformers

    model_type = getattr(hf_config, "model_type", None)
    if model_type == "qwen2_audio":
        return transformers.Qwen2AudioForConditionalGeneration
    if model_type == "qwen2_5_omni":
        return OmniThinkerActor
    if model_type == "qwen2_5_omni_thinker":
        return transformers.Qwen2_5OmniThinkerForConditionalGeneration
    return None


def _no_validation(*args: Any, **kwargs: Any) -> None:
    return None


def _audio_processor(name_or_path: Any, **kwargs: Any) -> Any | None:
    """Patches 1 and 2: the Qwen audio processor of a model directory, or None when it is another model."""
    from transformers import AutoConfig, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    except Exception:  # not a model directory verl can read either; let verl's own loader decide
        return None
    if getattr(config, "model_type", None) not in _AUDIO_MODEL_TYPES:
        return None
    processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    if type(processor).__name__ not in AUDIO_PROCESSORS:
        return None
    processor.config = config  # as verl's loader does for the processors it knows
    processor.validate_inputs = _no_validation
    return processor


def _rebind(original: Any, patched: Any, name: str) -> None:
    """Point every loaded module's `name` that is `original` at `patched` (verl imports these by name)."""
    for module in list(sys.modules.values()):
        if isinstance(module, types.ModuleType) and module.__dict__.get(name) is original:
            setattr(module, name, patched)


def install() -> None:
    """Install the patches in this process (Ray's `worker_process_setup_hook`). Idempotent."""
    if _state:
        return
    tokenizer_mod = importlib.import_module("verl.utils.tokenizer.tokenizer")
    importlib.import_module("verl.utils")  # so its re-exports are loaded, and rebound below
    model_mod = importlib.import_module("verl.utils.model")
    original_processor = tokenizer_mod.hf_processor
    original_model_class = model_mod.get_hf_auto_model_class

    def hf_processor(name_or_path: Any, **kwargs: Any) -> Any:
        processor = _audio_processor(name_or_path, **kwargs)
        return processor if processor is not None else original_processor(name_or_path, **kwargs)

    def get_hf_auto_model_class(hf_config: Any) -> Any:
        cls = audio_model_class(hf_config)
        return cls if cls is not None else original_model_class(hf_config)

    hf_processor.__doc__ = f"{original_processor.__doc__}\n\n(echo-agent: Qwen2-Audio and Qwen2.5-Omni processors too)"
    get_hf_auto_model_class.__doc__ = "verl's model-class picker, with Qwen2-Audio and Qwen2.5-Omni (echo-agent)"
    _rebind(original_processor, hf_processor, "hf_processor")
    _rebind(original_model_class, get_hf_auto_model_class, "get_hf_auto_model_class")
    _state.update(hf_processor=(original_processor, hf_processor))
    _state.update(get_hf_auto_model_class=(original_model_class, get_hf_auto_model_class))


def installed() -> bool:
    return bool(_state)
