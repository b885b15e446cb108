"""LangGraph state machines. `build_echo_graph` is the Echo agent: model -> listen -> model ... -> verifier."""

from .echo import build_echo_graph, response_text
from .state import EchoInput, EchoOutput, EchoState, new_question

__all__ = ["EchoInput", "EchoOutput", "EchoState", "build_echo_graph", "new_question", "response_text"]
