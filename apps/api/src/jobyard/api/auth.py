"""Who may call the API: bearer tokens, two kinds, closed by default.

* `JOBYARD_ADMIN_TOKEN` — may do everything (cancel, replay, queues, workers, and all below).
* `JOBYARD_API_TOKEN` — may dispatch jobs and read them; 403 on admin routes.

Each holds one or more comma-separated values, so a token is rotated by adding the new value,
moving clients over, then removing the old one. Tokens are read from the environment on every
request: rotation needs no restart, and tests set them per test. With neither set, every route
but GET /health answers 401: nothing is open until an operator opens it.
"""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jobyard.job_engine import env

Role = Literal["admin", "api"]

# auto_error=False: a missing header must answer 401 with our message, not FastAPI's 403.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="BearerToken",
    description=f"A value of {env.ADMIN_TOKEN} (everything) or of {env.API_TOKEN} (dispatch and "
    "read; 403 on admin routes) on the API server.",
)

NO_TOKENS = f"no token is configured on the server: set {env.API_TOKEN} or {env.ADMIN_TOKEN}"
BAD_TOKEN = "missing or wrong token: send Authorization: Bearer <token>"
ADMIN_ONLY = f"this route needs an admin token ({env.ADMIN_TOKEN})"


def configured_tokens(name: str) -> list[bytes]:
    """The comma-separated values of `name`, blanks dropped."""
    return [t.strip().encode() for t in os.environ.get(name, "").split(",") if t.strip()]


def _matches(given: bytes, tokens: list[bytes]) -> bool:
    # Every value is compared (no early exit) in constant time per value; on bytes, because
    # compare_digest refuses non-ASCII str and the client chooses this string.
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given, token)
    return found


def role_of(token: str | None) -> Role | None:
    """The role a presented token grants, or None."""
    if not token:
        return None
    given = token.encode("utf-8", "surrogateescape")
    if _matches(given, configured_tokens(env.ADMIN_TOKEN)):
        return "admin"
    if _matches(given, configured_tokens(env.API_TOKEN)):
        return "api"
    return None


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


def require_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Role:
    """Any valid token (admin or API); 401 otherwise."""
    role = role_of(credentials.credentials if credentials is not None else None)
    if role is None:
        if not configured_tokens(env.ADMIN_TOKEN) and not configured_tokens(env.API_TOKEN):
            raise _unauthorized(NO_TOKENS)
        raise _unauthorized(BAD_TOKEN)
    return role


def require_admin(role: Annotated[Role, Depends(require_token)]) -> Role:
    """An admin token; 401 without a valid token, 403 with an API token."""
    if role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, ADMIN_ONLY)
    return role


#: The `dependencies=` of a route any valid token may call, and of an admin-only route.
TOKEN = [Depends(require_token)]
ADMIN = [Depends(require_admin)]
