"""`echo-agent serve`: an OpenAI-compatible HTTP server for the local model and the Echo agent, plus a web
chat page. See `app.py` for the wire format."""

from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
