"""echo-tiny: the small audio LLM that echo-agent trains and ships as its default model.

Importing this package registers it with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` load it.
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration import EchoTinyConfig
from .factory import EchoTinySizes, new_echo_tiny
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
    "EchoTinyConfig",
    "EchoTinyFeatureExtractor",
    "EchoTinyForConditionalGeneration",
    "EchoTinyProcessor",
    "EchoTinySizes",
    "new_echo_tiny",
    "train_tokenizer",
]
