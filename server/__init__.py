"""`safesteer serve`: saved policy versions behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os

from .api import ServeSettings, create_app
from .resolver import PolicyResolver, UnknownModel

__all__ = ["PolicyResolver", "ServeSettings", "UnknownModel", "api_keys_from_env", "create_app", "run"]


def api_keys_from_env() -> tuple[str, ...]:
    """`SAFESTEER_API_KEYS`: keys separated by commas (empty or unset: no authentication)."""
    return tuple(k.strip() for k in os.environ.get("SAFESTEER_API_KEYS", "").split(",") if k.strip())


def run(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted; on SIGTERM/SIGINT uvicorn stops taking requests and the batcher drains."""
    import uvicorn  # the server's own dependency, loaded only to serve

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
