"""LangGraph state machines. `build_echo_graph` is the Echo agent: model -> listen -> model ... -> verifier; its node
logic is in `steps`, and `runner` drives many runs of it (eval, collect, GRPO, validation)."""

from .echo import build_echo_graph, response_text
from .state import EchoContext, EchoInput, EchoOutput, EchoState, new_question

__all__ = [
    "EchoContext",
    "EchoInput",
    "EchoOutput",
    "EchoState",
    "build_echo_graph",
    "new_question",
    "response_text",
]
