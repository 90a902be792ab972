"""The HTTP API: `create_app(settings)` (FastAPI), thin routes, one error type on the wire."""

from server.api.app import create_app

__all__ = ["create_app"]
