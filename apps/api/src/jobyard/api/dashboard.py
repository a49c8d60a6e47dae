"""The dashboard: one static page, served with a CSP that allows only its own inline script and
style. The page holds no data; everything it shows comes from token-checked calls."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@cache
def dashboard_html() -> str:
    return files("jobyard.api").joinpath("dashboard.html").read_text(encoding="utf-8")


@cache
def dashboard_csp() -> str:
    """Only the page's own inline script and style (by hash) and calls to this origin."""
    html = dashboard_html()

    def hashes(tag: str) -> str:
        # the elements themselves, each opening a line (not a mention inside a comment)
        blocks = re.findall(rf"^<{tag}>(.*?)</{tag}>", html, flags=re.S | re.M)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in blocks
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    )


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    # The page holds no data; everything it shows comes from token-checked calls.
    return HTMLResponse(dashboard_html(), headers={"Content-Security-Policy": dashboard_csp()})
