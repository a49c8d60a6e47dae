"""The limiter rules as pure functions of a state and a clock (integer milliseconds).

The permit store (`flow.store`) reads a bucket's state under a row lock, applies one of these,
and writes the result back, so what the property tests prove on a simulated clock is what the
database does. Every state is plain JSON (`to_json` / `from_json`).

- Rate: a sliding log of the starts of the last `period`. A start is granted when fewer than
  `calls` starts lie in (now - period, now]; then no window of length `period` anywhere holds
  more than `calls` (a fixed window, as Redis INCR per window does, lets 2 x calls through
  around a window boundary).
- Concurrency: leases that expire unless renewed (a dead worker's slot comes back at its
  lease's expiry), and a FIFO of waiters per key: a free slot goes to the longest-waiting job
  of the key, not to whichever parked job wakes first.
- Fairness across keys: `next_key` serves keys with waiters round-robin.
- Debounce: bursts of dispatches, each run once, with its last payload.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# --- rate limit ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateDecision:
    granted: bool
    starts: list[int]  # the bucket's new state: its starts in the current window, ascending
    retry_in_ms: int  # refused: the wait until the window allows one more start


def rate_try_start(starts: Sequence[int], now: int, calls: int, period_ms: int) -> RateDecision:
    """Grant a start at `now` unless `calls` starts already lie in (now - period, now]."""
    # A clock that stepped back must not let a start in early: never before the last one.
    now = max(now, starts[-1]) if starts else now
    live = list(starts[bisect.bisect_right(starts, now - period_ms) :])
    if len(live) < calls:
        live.append(now)
        return RateDecision(True, live, 0)
    # One more start fits once the start `calls` places back has left the window.
    return RateDecision(False, live, max(1, live[len(live) - calls] + period_ms - now))


def rate_expires_at(starts: Sequence[int], period_ms: int) -> int:
    """When the bucket holds nothing any more (its row may then be deleted)."""
    return (starts[-1] + period_ms) if starts else 0


# --- concurrency -----------------------------------------------------------------------------


class Waiters(Protocol):
    """A bucket's waiting jobs in arrival order. Each has `until`: past it the waiter is
    forgotten (it stopped asking: its job went away). `prune(now)` sets the instant the others
    answer for; `position` and `count` stop counting at `bound` (the rules only compare them
    with the limit), so a store can answer them without reading a long queue."""

    def prune(self, now: int) -> None: ...
    def position(self, holder: str, bound: int) -> int | None: ...
    def count(self, bound: int) -> int: ...
    def join(self, holder: str, now: int, until: int) -> None: ...
    def remove(self, holder: str) -> None: ...
    def first(self, n: int) -> list[str]: ...
    def hasten(self, holders: Sequence[str], until: int) -> None: ...


@dataclass
class ListWaiters:
    """Waiters in memory, (holder, since, until) in arrival order: the model the property
    tests run, kept in a bucket's JSON when no store keeps them in a table."""

    items: list[tuple[str, int, int]] = field(default_factory=list)

    def prune(self, now: int) -> None:
        self.items = [w for w in self.items if w[2] > now]

    def position(self, holder: str, bound: int) -> int | None:
        for index, (waiting, _, _) in enumerate(self.items):
            if waiting == holder:
                return min(index, bound)
        return None

    def count(self, bound: int) -> int:
        return min(len(self.items), bound)

    def join(self, holder: str, now: int, until: int) -> None:
        for index, (waiting, since, _) in enumerate(self.items):
            if waiting == holder:
                self.items[index] = (holder, since, until)
                return
        self.items.append((holder, now, until))

    def remove(self, holder: str) -> None:
        self.items = [w for w in self.items if w[0] != holder]

    def first(self, n: int) -> list[str]:
        return [w[0] for w in self.items[:n]]

    def hasten(self, holders: Sequence[str], until: int) -> None:
        self.items = [(h, s, min(u, until)) if h in holders else (h, s, u)
                      for h, s, u in self.items]  # fmt: skip


@dataclass
class LeaseState:
    """A bucket's running jobs (holder -> lease expiry) and its waiters (in the state's JSON
    as a ListWaiters, or a store's own, e.g. a table: then only the leases are JSON)."""

    leases: dict[str, int] = field(default_factory=dict)
    waiters: Waiters = field(default_factory=ListWaiters)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"leases": self.leases}
        if isinstance(self.waiters, ListWaiters) and self.waiters.items:
            data["waiters"] = [list(w) for w in self.waiters.items]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, waiters: Waiters | None = None) -> LeaseState:
        data = data or {}
        if waiters is None:
            waiters = ListWaiters([(str(h), int(s), int(u)) for h, s, u in data.get("waiters", [])])
        return cls(dict(data.get("leases", {})), waiters)

    def prune(self, now: int) -> None:
        self.leases = {h: e for h, e in self.leases.items() if e > now}
        self.waiters.prune(now)

    def expires_at(self) -> int:
        listed = self.waiters.items if isinstance(self.waiters, ListWaiters) else []
        return max([*self.leases.values(), *(u for _, _, u in listed), 0])

    def empty(self) -> bool:
        listed = self.waiters.items if isinstance(self.waiters, ListWaiters) else []
        return not self.leases and not listed


@dataclass(frozen=True)
class LeaseDecision:
    granted: bool
    position: int = 0  # refused: waiters ahead of this one (counted up to the limit)
    retry_in_ms: int = 0  # refused: when to ask again if no wake-up comes first


#: A waiter `turns` turns from a slot (a turn: `limit` waiters ahead) asks again by itself
#: after `turns` to 2 x `turns` park times, counted up to this many turns (its position is
#: counted no further, so an ask costs the same whatever the backlog): one key's 10,000 waiters
#: ask about 1/48 as often as they would once per park time (see `lease_try_acquire`).
PARK_TURNS = 32


def lease_try_acquire(
    state: LeaseState, holder: str, now: int, limit: int, ttl_ms: int, park_ms: int
) -> LeaseDecision:
    """Take a slot for `holder` (renew it if held), in FIFO order of the bucket's waiters.

    Refused, the holder is (or stays) a waiter: the first `free` waiters are due a slot, so they
    ask again at the earliest lease expiry (a dead holder's slot); the others are normally
    woken by a release (`lease_release`) when their turn comes, and ask again by themselves
    only after `park_ms` times their turns from a slot (`PARK_TURNS` at most), spread by
    `holder` over one more such wait: a key with 10,000 waiting jobs would otherwise have all
    of them ask once per `park_ms` (the asks, and the fetches that carry them, grow with the
    backlog and queue ahead of other keys' jobs). A waiter is kept `ttl_ms` past its next ask,
    then forgotten (its job went away)."""
    state.prune(now)
    if holder in state.leases:
        state.leases[holder] = now + ttl_ms
        return LeaseDecision(True)
    free = limit - len(state.leases)
    bound = limit * (PARK_TURNS + 1)
    position = state.waiters.position(holder, bound)
    if position is None:
        position = state.waiters.count(bound)
    if position < free:
        state.waiters.remove(holder)
        state.leases[holder] = now + ttl_ms
        return LeaseDecision(True)
    earliest = min(state.leases.values(), default=now + 1)
    if position < limit:  # among the next to get a slot
        retry_in = max(1, min(earliest - now, park_ms))
    else:
        retry_in = _parked_for(holder, min(position // limit, PARK_TURNS), park_ms)
    state.waiters.join(holder, now, now + retry_in + ttl_ms)
    return LeaseDecision(False, position - max(free, 0), retry_in)


def _parked_for(holder: str, turns: int, park_ms: int) -> int:
    """`turns` park times and a share of one more, fixed by the holder: a backlog dispatched
    at once does not ask again all at once."""
    wait = max(1, park_ms * turns)
    return wait + zlib.crc32(holder.encode()) % wait


def lease_renew(state: LeaseState, holder: str, now: int, limit: int, ttl_ms: int) -> bool:
    """Extend a running job's lease. One that expired (its worker stalled past the ttl) is
    taken again if a slot is free; False when it is not (the run has lost its slot)."""
    state.prune(now)
    if holder in state.leases or len(state.leases) < limit:
        state.leases[holder] = now + ttl_ms
        return True
    return False


def lease_release(
    state: LeaseState, holder: str, now: int, limit: int, claim_ms: int | None = None
) -> list[str]:
    """End a run's lease (and forget it as a waiter); the waiters now due a slot, to wake.
    With `claim_ms`, each of them is forgotten unless it asks within `claim_ms` (its job went
    away while it waited far back): the slot then goes to the next one instead of waiting
    for the long ask a waiter far back was told."""
    state.prune(now)
    state.leases.pop(holder, None)
    state.waiters.remove(holder)
    due = due_waiters(state, limit)
    if due and claim_ms is not None:
        state.waiters.hasten(due, now + claim_ms)
    return due


def due_waiters(state: LeaseState, limit: int) -> list[str]:
    free = max(0, limit - len(state.leases))
    return state.waiters.first(free) if free else []


def next_key(waiting: Sequence[str], last: str | None) -> str | None:
    """Round-robin over the keys that have waiters: the first after `last` in key order,
    wrapping around. A key with waiters is served within len(waiting) turns, however many
    jobs another key has."""
    if not waiting:
        return None
    ordered = sorted(waiting)
    if last is None:
        return ordered[0]
    index = bisect.bisect_right(ordered, last)
    return ordered[index % len(ordered)]


# --- debounce --------------------------------------------------------------------------------


@dataclass
class Burst:
    """Dispatches collapsed into one run: `run_id` is the job that runs it (the first
    dispatch's id); `members` every job id it serves, in dispatch order. `started`: when its run
    claimed it (0: not yet); a started burst takes no more dispatches and is kept a while so
    that a rerun of its run (a retry, a claim whose reply was lost) gets the same payload."""

    run_id: str
    first: int
    last: int
    due: int
    payload: Any
    members: list[str]
    started: int = 0

    def to_json(self) -> list[Any]:
        return [
            self.run_id, self.first, self.last, self.due, self.payload, self.members,
            self.started,
        ]  # fmt: skip

    @classmethod
    def from_json(cls, data: Sequence[Any]) -> Burst:
        run_id, first, last, due, payload, members, started = data
        return cls(
            str(run_id), int(first), int(last), int(due), payload, list(members), int(started)
        )


@dataclass
class DebounceState:
    """The bucket's bursts, oldest first: started ones (kept for reruns), then those waiting;
    only the last may take more dispatches."""

    bursts: list[Burst] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"bursts": [b.to_json() for b in self.bursts]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> DebounceState:
        return cls([Burst.from_json(b) for b in (data or {}).get("bursts", [])])

    def prune(self, now: int, keep_started_ms: int) -> None:
        """Forget bursts whose run started more than `keep_started_ms` ago."""
        self.bursts = [b for b in self.bursts if not b.started or b.started + keep_started_ms > now]

    def expires_at(self, keep_started_ms: int, grace_ms: int) -> int:
        """When nothing of the bucket is needed any more: a started burst `keep_started_ms`
        after its start, a waiting one `grace_ms` after it was due (its run never came)."""
        ends = [b.started + keep_started_ms if b.started else b.due + grace_ms for b in self.bursts]
        return max(ends or [0])

    def empty(self) -> bool:
        return not self.bursts

    def waiting(self) -> int:
        return sum(1 for b in self.bursts if not b.started)


@dataclass(frozen=True)
class DebounceTicket:
    run_id: str  # the job whose run serves this dispatch
    due: int  # when that run may start
    joined: bool  # True: collapsed into an earlier dispatch's run (dispatch nothing new)


def debounce_dispatch(
    state: DebounceState,
    job_id: str,
    payload: Any,
    now: int,
    period_ms: int,
    max_wait_ms: int | None,
) -> DebounceTicket:
    """Collapse a dispatch into the open burst when it comes within `period` of that burst's
    last dispatch (and, with a max_wait, before the burst's first + max_wait); else open a
    burst whose run is this job. The same job id dispatched again (a retried call) gets its
    first answer."""
    for burst in state.bursts:
        if job_id in burst.members:
            return DebounceTicket(burst.run_id, burst.due, joined=burst.run_id != job_id)
    if state.bursts and not state.bursts[-1].started:
        open_burst = state.bursts[-1]
        in_period = now - open_burst.last <= period_ms
        in_max_wait = max_wait_ms is None or now <= open_burst.first + max_wait_ms
        if in_period and in_max_wait:
            open_burst.last = max(open_burst.last, now)
            open_burst.payload = payload
            open_burst.members.append(job_id)
            open_burst.due = _due(open_burst.first, open_burst.last, period_ms, max_wait_ms)
            return DebounceTicket(open_burst.run_id, open_burst.due, joined=True)
    burst = Burst(job_id, now, now, _due(now, now, period_ms, max_wait_ms), payload, [job_id])
    state.bursts.append(burst)
    return DebounceTicket(job_id, burst.due, joined=False)


def _due(first: int, last: int, period_ms: int, max_wait_ms: int | None) -> int:
    due = last + period_ms
    return due if max_wait_ms is None else min(due, first + max_wait_ms)


@dataclass(frozen=True)
class DebounceClaim:
    """`start`: run now with `payload`, serving `members` (again, for a rerun of a started
    burst); `wait`: ask again in `retry_in_ms` (the burst took a later dispatch); `gone`: no
    burst has this run (it started long ago: the run has recorded its payload)."""

    status: str
    payload: Any = None
    members: tuple[str, ...] = ()
    retry_in_ms: int = 0


def debounce_claim(state: DebounceState, run_id: str, now: int) -> DebounceClaim:
    """The run of a burst asks to start: at its due time the burst closes (a later dispatch
    opens a new one) and the run gets the burst's last payload, now and on any rerun."""
    for burst in state.bursts:
        if burst.run_id != run_id:
            continue
        if not burst.started:
            if now < burst.due:
                return DebounceClaim("wait", retry_in_ms=burst.due - now)
            burst.started = now
        return DebounceClaim("start", burst.payload, tuple(burst.members))
    return DebounceClaim("gone")


# --- a run's limits together -----------------------------------------------------------------

RATE, CONCURRENCY, DEBOUNCE = "rate", "concurrency", "debounce"


@dataclass(frozen=True)
class Limit:
    """One limit of a run, in milliseconds: RATE (`calls` per `period_ms`), CONCURRENCY
    (`limit` leases of `ttl_ms`, waiters park at most `park_ms`) or DEBOUNCE (the run claims
    its burst)."""

    kind: str
    calls: int = 0
    period_ms: int = 0
    limit: int = 0
    ttl_ms: int = 0
    park_ms: int = 0


@dataclass(frozen=True)
class Admit:
    """`admit`'s decision. `changes`: the buckets (by index) whose state changes, each to its
    new JSON state (None: empty, delete it) and when that state runs out (ms)."""

    granted: bool
    changes: dict[int, tuple[Any, int]]
    refused: int | None = None  # the first limit that said no
    retry_in_ms: int = 0
    position: int = 0
    claim: DebounceClaim | None = None  # granted: the burst claimed (None: none to claim)


def admit(
    holder: str,
    limits: Sequence[Limit],
    states: Sequence[Any],
    now: int,
    grace_ms: int,
    keep_started_ms: int,
    waiters: Callable[[int], Waiters] | None = None,
) -> Admit:
    """A run through all its limits at once: every one takes it (a burst is claimed, a start
    counted, a lease taken), or none does. Refused, it spends nothing: a concurrency wait burns
    no rate permit, a rate wait holds no slot and closes no burst; it only keeps (or takes) its
    place among a refusing concurrency limit's waiters. It asks again when the last of the
    refusing limits allows it (a release may wake it sooner). `grace_ms`: how long a waiting
    debounce burst outlives its due time; `keep_started_ms`: a started one its start.
    `waiters(index)`: a concurrency limit's waiters when a store keeps them apart from the
    state (its changes are the store's to apply or drop, by `changes`)."""
    granted: dict[int, tuple[Any, int]] = {}
    waiting: dict[int, tuple[Any, int]] = {}
    refusals: list[tuple[int, int, int]] = []  # (limit index, retry_in ms, position)
    claim: DebounceClaim | None = None
    for index, (limit, state) in enumerate(zip(limits, states, strict=True)):
        if limit.kind == RATE:
            rate = rate_try_start(state or [], now, limit.calls, limit.period_ms)
            if rate.granted:
                granted[index] = (rate.starts, rate_expires_at(rate.starts, limit.period_ms))
            else:
                refusals.append((index, rate.retry_in_ms, 0))
        elif limit.kind == CONCURRENCY:
            leases = LeaseState.from_json(state, waiters(index) if waiters else None)
            lease = lease_try_acquire(leases, holder, now, limit.limit, limit.ttl_ms, limit.park_ms)
            change = (None if leases.empty() else leases.to_json(), leases.expires_at())
            if lease.granted:
                granted[index] = change
            else:
                waiting[index] = change
                refusals.append((index, lease.retry_in_ms, lease.position))
        elif limit.kind == DEBOUNCE:
            bursts = DebounceState.from_json(state)
            bursts.prune(now, keep_started_ms)
            claimed = debounce_claim(bursts, holder, now)
            if claimed.status == "wait":
                refusals.append((index, claimed.retry_in_ms, 0))
            elif claimed.status == "start":
                claim = claimed
                kept = None if bursts.empty() else bursts.to_json()
                granted[index] = (kept, bursts.expires_at(keep_started_ms, grace_ms))
        else:
            raise ValueError(f"unknown limit kind {limit.kind!r}")
    if not refusals:
        return Admit(True, granted, claim=claim)
    first, _, position = refusals[0]
    retry_in = max(r[1] for r in refusals)
    return Admit(False, waiting, first, retry_in, position)
