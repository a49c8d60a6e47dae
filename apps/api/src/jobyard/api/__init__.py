"""jobyard.api: the HTTP API and dashboard, an ASGI app (FastAPI) that web code can mount.

uvicorn jobyard.api:app              # or: jobyard api --host 0.0.0.0 --port 8000
web_app.mount("/jobyard", create_app())
"""

from jobyard.api.app import create_app
from jobyard.api.server import serve

app = create_app()

__all__ = ["app", "create_app", "serve"]
