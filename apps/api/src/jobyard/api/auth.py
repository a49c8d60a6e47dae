"""The admin routes' guard: a bearer token equal to JOBYARD_ADMIN_TOKEN.

The token is read from the environment on every request, so an operator can rotate it (or
switch the admin API off) without rebuilding the app, and tests can set it per test.
"""

from __future__ import annotations

import hmac
import os
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jobyard.job_engine import env

# auto_error=False: a missing header must answer 401 with our message, not FastAPI's 403.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description=f"The value of {env.ADMIN_TOKEN} on the API server.",
)

ADMIN_DISABLED = f"admin API disabled: set {env.ADMIN_TOKEN}"


def require_admin(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """403 when no admin token is configured (nobody can be admin), 401 for a wrong token."""
    expected = os.environ.get(env.ADMIN_TOKEN, "")
    if not expected:
        raise HTTPException(status.HTTP_403_FORBIDDEN, ADMIN_DISABLED)
    given = credentials.credentials if credentials is not None else ""
    # compare_digest on bytes: on str it refuses non-ASCII text, which a client controls.
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong admin token: send Authorization: Bearer <JOBYARD_ADMIN_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )
