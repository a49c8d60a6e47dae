"""Run the example with one command, from this directory:

    uv run python serve.py        # or: python serve.py, in a virtualenv with jobyard[api]

It starts `jobyard dev` for the workers (and a Temporal dev server if none answers), then the
chat app on http://127.0.0.1:8001. Ctrl-C stops both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import uvicorn

HERE = Path(__file__).resolve().parent
PORT = int(os.environ.get("CHAT_PORT", "8001"))


def main() -> int:
    os.chdir(HERE)
    os.environ.setdefault("WEBHOOK_SECRET", "example-only-secret")
    # Webhooks may not reach loopback addresses unless allowed; this example receives its own.
    os.environ.setdefault("JOBYARD_WEBHOOK_ALLOW", "127.0.0.1")
    os.environ.setdefault("CHAT_PUBLIC_URL", f"http://127.0.0.1:{PORT}")
    os.environ["JOBYARD_JOB_MODULES"] = ",".join(
        m for m in (os.environ.get("JOBYARD_JOB_MODULES", ""), "chat_jobs") if m
    )
    sys.path.insert(0, str(HERE))
    dev = subprocess.Popen([sys.executable, "-m", "jobyard.cli", "dev", "--api-port", "0"])
    try:
        uvicorn.run("app:app", host="127.0.0.1", port=PORT)
    finally:
        dev.send_signal(signal.SIGINT)
        dev.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
