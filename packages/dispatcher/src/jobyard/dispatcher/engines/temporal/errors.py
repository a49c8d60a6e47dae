"""temporalio errors -> the dispatcher's own, in one place (as httpx maps httpcore's).

What a caller is told rests on one question: may the request have reached the server? A
connection that could not be made (refused, unreachable, no such host) proves it did not: "not
started", and the dispatcher may say so at once. Anything after a connection was made (a reset,
a deadline, an internal error) may come after the server acted: "unknown". This holds only for
a request sent once: the dispatcher's client makes no retries of its own (engine.py,
SEND_ONCE), else a refused retry would hide a first try that got through."""

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
#: How the client's transport (tonic, in temporalio's core) words an UNAVAILABLE whose
#: connection was never made, so nothing was sent: "tcp connect error" (refused, unreachable,
#: timed out connecting), "dns error" (no such host), hyper's "error trying to connect".
NOT_CONNECTED = ("tcp connect error", "dns error", "error trying to connect")


def never_sent(exc: RPCError) -> bool:
    """Whether the request failed before a connection to the server existed."""
    if exc.status != RPCStatusCode.UNAVAILABLE:
        return False
    message = exc.message.lower()
    return any(words in message for words in NOT_CONNECTED)


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
        if never_sent(exc):
            raise EngineUnavailable(ENGINE, f"cannot connect: {exc.message}") from exc
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
