"""temporalio errors -> the dispatcher's own, in one place (as httpx maps httpcore's)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from jobyard.dispatcher.engines.base import AlreadyClosed, AlreadyOnEngine, NotOnEngine
from jobyard.dispatcher.errors import EngineUnavailable

ENGINE = "temporal"
#: Statuses after which the request may still have taken effect on the server.
AMBIGUOUS = frozenset(
    {RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED, RPCStatusCode.UNKNOWN,
     RPCStatusCode.UNAVAILABLE, RPCStatusCode.INTERNAL, RPCStatusCode.ABORTED}
)  # fmt: skip


@contextlib.contextmanager
def map_temporal_errors() -> Iterator[None]:
    """Errors of one request to a connected client."""
    try:
        yield
    except WorkflowAlreadyStartedError as exc:
        raise AlreadyOnEngine(str(exc)) from exc
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise NotOnEngine(exc.message) from exc
        if exc.status == RPCStatusCode.ALREADY_EXISTS:
            raise AlreadyOnEngine(exc.message) from exc
        if exc.status == RPCStatusCode.FAILED_PRECONDITION:
            raise AlreadyClosed(exc.message) from exc
        raise EngineUnavailable(
            ENGINE, f"{exc.status.name}: {exc.message}", ambiguous=exc.status in AMBIGUOUS
        ) from exc


@contextlib.contextmanager
def map_connect_errors(address: str) -> Iterator[None]:
    """Errors of connecting: nothing was asked of the server yet."""
    try:
        yield
    except (RuntimeError, OSError, TimeoutError, RPCError) as exc:
        raise EngineUnavailable(ENGINE, f"cannot connect to {address}: {exc}") from exc
