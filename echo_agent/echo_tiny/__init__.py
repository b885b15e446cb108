"""echo-tiny: the small audio LLM that echo-agent trains and ships as its default model.

Importing this package registers it with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` load it.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration import EchoTinyConfig
from .modeling import EchoTinyForConditionalGeneration
from .processing import EchoTinyFeatureExtractor, EchoTinyProcessor, train_tokenizer

AutoConfig.register("echo_tiny", EchoTinyConfig, exist_ok=True)
AutoModel.register(EchoTinyConfig, EchoTinyForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(EchoTinyConfig, EchoTinyForConditionalGeneration, exist_ok=True)
AutoProcessor.register(EchoTinyConfig, EchoTinyProcessor, exist_ok=True)

__all__ = [
    "EchoTinyConfig",
    "EchoTinyFeatureExtractor",
    "EchoTinyForConditionalGeneration",
    "EchoTinyProcessor",
    "train_tokenizer",
]
