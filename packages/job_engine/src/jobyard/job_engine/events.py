"""Events from outside for jobs that wait for them: `ctx.wait_for_event(name, match, timeout)`
in a handler, `send_event(name, data)` (jobyard.dispatcher) or `POST /events/{name}` outside.

The rules, in one place (tests/test_event_matching.py checks them on randomized histories):

* An event is a name and a JSON object, kept in table `sent_events` with its id (the order they
  were stored in) and the time it was sent. Sending delivers to no one in particular: waiting
  jobs look for it, so an event sent before a wait began, or while the waiting job's worker was
  dead, is still found.
* A wait that began at `began` with `timeout` takes, of the events of its name sent between
  `began - JOBYARD_EVENT_LOOKBACK` and `began + timeout` whose `match` fields all equal the
  event's (`matches`), the first stored that this job has not taken in an earlier wait
  (`choose`); with none by `began + timeout` it ends with None.
* The wait records what it took as its step: a resumed, retried or replayed job gets the same
  event (or None) back, so each event reaches a wait once, and a job never takes one twice. One
  event resumes every job waiting for it (each has its own record).

Looks are spaced as a child's wait's (waits.next_look), and a wait with a timeout looks one last
time at it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from jobyard.job_engine import env, strictjson

#: Event names: as job ids, 1-200 characters (`payment.confirmed`, `approval:order-42`).
EVENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}")


def check_event_name(name: Any) -> str:
    if not isinstance(name, str) or not EVENT_NAME.fullmatch(name):
        raise ValueError(
            f"invalid event name {name!r}: 1-200 characters of letters, digits and ._:@/- "
            "starting with a letter or digit"
        )
    return name


def check_event_data(data: Any, what: str = "event data") -> dict[str, Any]:
    """`data` if it is a JSON object (strict: finite numbers, str keys), else ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, not {type(data).__name__}")
    try:
        strictjson.check(data)
    except strictjson.StrictJSONError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from exc
    return data


def same_json(left: Any, right: Any) -> bool:
    """JSON equality: a bool is no number (Python's `True == 1` is not JSON's), 1 and 1.0 are
    one number, objects and arrays compare member by member."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same_json(v, right[k]) for k, v in left.items())
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(same_json, left, right))
    return type(left) is type(right) and left == right


def matches(match: dict[str, Any], data: dict[str, Any]) -> bool:
    """Whether every field of `match` is in `data` with an equal value (`{}` matches all)."""
    return all(key in data and same_json(data[key], value) for key, value in match.items())


@dataclass(frozen=True)
class SentEvent:
    id: int
    name: str
    data: dict[str, Any]
    sent_at: float  # unix seconds, the sender's clock

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def window(began: float, timeout: float | None, lookback: float) -> tuple[float, float]:
    """The send times a wait that began at `began` accepts: [began - lookback, began + timeout]."""
    return began - lookback, began + timeout if timeout is not None else math.inf


def choose(
    sent: Iterable[SentEvent],
    match: dict[str, Any],
    began: float,
    timeout: float | None,
    lookback: float,
    taken: Iterable[int] = (),
) -> SentEvent | None:
    """The event a wait takes of those `sent` (of its name): see the module's rules."""
    low, high = window(began, timeout, lookback)
    excluded = set(taken)
    candidates = (
        event
        for event in sent
        if low <= event.sent_at <= high and event.id not in excluded and matches(match, event.data)
    )
    return min(candidates, key=lambda event: event.id, default=None)


def lookback() -> float:
    return env.get_float(env.EVENT_LOOKBACK)


def look_for_event(wait: dict[str, Any], began: float) -> dict[str, Any] | None:
    """One look for the event a wait ({"name", "match", "timeout", "taken"}) that began at
    `began` takes: the event as a dict, or None (for now). Reads the database."""
    from jobyard.job_engine.db.sent_events import sent_between

    back = lookback()
    low, high = window(began, wait["timeout"], back)
    chosen = choose(
        sent_between(wait["name"], low, high), wait["match"], began, wait["timeout"], back,
        wait["taken"],
    )  # fmt: skip
    return None if chosen is None else chosen.as_dict()
