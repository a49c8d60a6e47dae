"""Serving the API on its own: `jobyard api --host H --port P` calls serve()."""

from __future__ import annotations

import uvicorn

from jobyard.api.app import create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the API with uvicorn until interrupted (SIGINT/SIGTERM stop it gracefully)."""
    uvicorn.run(create_app(), host=host, port=port)
