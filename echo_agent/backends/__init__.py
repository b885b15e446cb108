"""Model backends. `TransformersBackend` runs audio LLMs locally with transformers."""

from .base import AudioResolver, Generation, GenerationRequest, ModelBackend

__all__ = ["AudioResolver", "Generation", "GenerationRequest", "ModelBackend"]
