"""echo-agent: audio-interleaved reasoning. An audio LLM re-listens to slices of a clip mid-reasoning, inside a
LangGraph state machine (model -> listen -> model ... -> verifier), with the SFT and GRPO stack that trains it.

    from echo_agent import EchoAgent, load_backend
    result = await EchoAgent(load_backend()).ask("clip.wav", "How many beeps?", ["2", "3", "4"])

Imports are lazy, so `import echo_agent` stays cheap and the CLI starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import EchoAgent, Result, load_backend
    from .audio import AudioRef, AudioStore
    from .config import AgentConfig, SamplingParams
    from .graphs import EchoContext, build_echo_graph
    from .training.trajectory import Trajectory

_EXPORTS = {
    "EchoAgent": "agent",
    "Result": "agent",
    "load_backend": "agent",
    "AudioRef": "audio",
    "AudioStore": "audio",
    "AgentConfig": "config",
    "SamplingParams": "config",
    "EchoContext": "graphs",
    "build_echo_graph": "graphs",
    "Trajectory": "training.trajectory",
}
__all__ = [
    "AgentConfig",
    "AudioRef",
    "AudioStore",
    "EchoAgent",
    "EchoContext",
    "Result",
    "SamplingParams",
    "Trajectory",
    "build_echo_graph",
    "load_backend",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'echo_agent' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
