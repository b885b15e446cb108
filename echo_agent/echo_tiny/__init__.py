"""echo-tiny: the small audio LLM that echo-agent trains and ships as its default model, and echo-tiny 2 (the same
classes with `audio_encoder="whisper-tiny.en"`: the frozen Whisper tiny.en encoder and a trained projector).

Importing this package registers it with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` load it.
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoProcessor

from .audio import encoder_asset_sha256
from .configuration import EchoTinyConfig
from .factory import ECHO_TINY2_SIZES, EchoTinySizes, new_echo_tiny
from .modeling import EchoTinyForConditionalGeneration
from .processing import EchoTinyFeatureExtractor, EchoTinyProcessor, train_tokenizer

AutoConfig.register("echo_tiny", EchoTinyConfig, exist_ok=True)
AutoModel.register(EchoTinyConfig, EchoTinyForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(EchoTinyConfig, EchoTinyForConditionalGeneration, exist_ok=True)
# The feature extractor is found by name (`feature_extractor_type`, written by save_pretrained) or, for directories
# saved before it had one (the shipped echo-tiny), through config.json's model type.
AutoFeatureExtractor.register(EchoTinyConfig, EchoTinyFeatureExtractor, exist_ok=True)
AutoProcessor.register(EchoTinyConfig, EchoTinyProcessor, exist_ok=True)

__all__ = [
    "ECHO_TINY2_SIZES",
    "EchoTinyConfig",
    "EchoTinyFeatureExtractor",
    "EchoTinyForConditionalGeneration",
    "EchoTinyProcessor",
    "EchoTinySizes",
    "encoder_asset_sha256",
    "new_echo_tiny",
    "train_tokenizer",
]
