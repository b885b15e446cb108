"""Audio tools the agent can call. `listen(start, end)` re-listens to a slice of a loaded clip."""

from .listen import LISTEN_TOOL_SCHEMA, ListenCall, ListenOutcome, ListenRequest, ListenTool

__all__ = ["LISTEN_TOOL_SCHEMA", "ListenCall", "ListenOutcome", "ListenRequest", "ListenTool"]
