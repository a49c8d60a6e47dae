"""The limiter rules (jobyard.job_engine.flow.limiter) on a simulated clock, property-tested:
never more than `calls` starts per window per key, never more than `limit` live leases per key,
no key starved, one run per debounced burst with the last payload."""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from jobyard.job_engine.flow.limiter import (
    CONCURRENCY,
    DEBOUNCE,
    PARK_TURNS,
    RATE,
    DebounceState,
    LeaseState,
    Limit,
    admit,
    debounce_claim,
    debounce_dispatch,
    due_waiters,
    lease_release,
    lease_renew,
    lease_try_acquire,
    next_key,
    rate_try_start,
)

KEYS = ["a", "b", "c"]

# --- rate limit ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    calls=st.integers(1, 5),
    period=st.integers(1, 50),
    arrivals=st.lists(st.tuples(st.integers(0, 200), st.sampled_from(KEYS)), max_size=60),
)
def test_rate_never_more_than_calls_per_window_and_a_refused_start_waits_no_longer_than_needed(
    calls: int, period: int, arrivals: list[tuple[int, str]]
) -> None:
    # Each job asks at its arrival and, refused, again exactly when it was told to.
    events = [(t, i, key) for i, (t, key) in enumerate(arrivals)]
    heapq.heapify(events)
    state: dict[str, list[int]] = defaultdict(list)
    grants: dict[str, list[int]] = defaultdict(list)
    while events:
        now, job, key = heapq.heappop(events)
        before = list(state[key])
        decision = rate_try_start(state[key], now, calls, period)
        state[key] = decision.starts
        if decision.granted:
            grants[key].append(now)
            continue
        # Refused only when the window really is full ...
        assert sum(1 for s in before if now - period < s <= now) == calls
        # ... and told the first instant the starts so far leave room for one more.
        retry = now + decision.retry_in_ms
        assert sum(1 for s in before if retry - period < s <= retry) < calls
        assert sum(1 for s in before if retry - 1 - period < s <= retry - 1) == calls
        heapq.heappush(events, (retry, job, key))
    for starts in grants.values():
        # Any window [t, t + period) holding calls + 1 starts would have two of them, `calls`
        # apart in start order, less than `period` apart in time.
        assert all(b - a >= period for a, b in zip(starts, starts[calls:], strict=False))
    assert sum(len(s) for s in grants.values()) == len(arrivals)  # every job started


def test_rate_counts_a_sliding_window_not_a_fixed_one() -> None:
    # Two starts at 9 and 10 of a 2-per-10 limit: a fixed window [10, 20) would allow two more
    # at 10..11; the sliding one allows the next at 19.
    starts: list[int] = []
    for now in (9, 10):
        starts = rate_try_start(starts, now, 2, 10).starts
    refused = rate_try_start(starts, 11, 2, 10)
    assert not refused.granted and refused.retry_in_ms == 8
    assert rate_try_start(refused.starts, 19, 2, 10).granted


def test_rate_a_clock_that_steps_back_does_not_let_a_start_in_early() -> None:
    starts = rate_try_start([], 100, 1, 10).starts
    assert not rate_try_start(starts, 95, 1, 10).granted
    assert not rate_try_start(starts, 109, 1, 10).granted
    assert rate_try_start(starts, 110, 1, 10).granted


# --- concurrency -----------------------------------------------------------------------------

TTL, PARK = 30, 100
#: The rescue's flow-control sweep (dispatcher.flow.WaiterSweep, every rescue pass): it wakes
#: the waiters due a slot that came back by a lease's expiry (a dead holder), which no release
#: wakes. Less than a park time, as in a deployment (5 s against 60 s by default).
SWEEP = 50


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 3),
    jobs=st.lists(
        st.tuples(
            st.integers(0, 100),  # arrival
            st.sampled_from(KEYS),
            st.integers(1, 80),  # run time
            st.booleans(),  # its worker dies while running (never renews nor releases)
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_leases_never_exceed_the_limit_and_every_job_runs(
    limit: int, jobs: list[tuple[int, str, int, bool]]
) -> None:
    states: dict[str, LeaseState] = defaultdict(LeaseState)
    # (time, order, kind, job): kinds ask (acquire), renew, end (release or die).
    events: list[tuple[int, int, str, int]] = []
    order = 0

    def push(at: int, kind: str, job: int) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, job))

    for job, (arrival, _key, _run, _dies) in enumerate(jobs):
        push(arrival, "ask", job)
    push(SWEEP, "sweep", -1)
    held: dict[int, list[int]] = {}  # job -> [granted at, held until (lease end)]
    started: dict[int, int] = {}
    first_asked: dict[int, int] = {}
    horizon = 100_000
    while events:
        now, _, kind, job = heapq.heappop(events)
        assert now < horizon, "a job never got a slot"
        if kind == "sweep":
            for state in states.values():
                state.prune(now)
                for woken in due_waiters(state, limit):
                    push(now, "ask", int(woken))
            if len(started) < len(jobs):
                push(now + SWEEP, "sweep", -1)
            continue
        arrival, key, run, dies = jobs[job]
        state = states[key]
        if kind == "ask":
            if job in started:
                continue  # woken twice: already running
            first_asked.setdefault(job, now)
            decision = lease_try_acquire(state, str(job), now, limit, TTL, PARK)
            if decision.granted:
                started[job] = now
                held[job] = [now, now + TTL]
                if dies:
                    continue  # its lease simply runs out
                for beat in range(now + TTL // 3, now + run, TTL // 3):
                    push(beat, "renew", job)
                push(now + run, "end", job)
            else:
                push(now + decision.retry_in_ms, "ask", job)
        elif kind == "renew":
            assert lease_renew(state, str(job), now, limit, TTL)  # a live worker keeps its slot
            held[job][1] = now + TTL
        else:
            for woken in lease_release(state, str(job), now, limit, claim_ms=TTL):
                push(now, "ask", int(woken))
            held[job][1] = now
    assert set(started) == set(range(len(jobs)))  # nobody starved
    by_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for job, (granted, until) in held.items():
        by_key[jobs[job][1]].append((granted, until))
    for intervals in by_key.values():
        # at no instant more than `limit` leases of one key are live
        points = sorted({t for iv in intervals for t in iv})
        for t in points:
            assert sum(1 for g, u in intervals if g <= t < u) <= limit
    # Within a key, waiting jobs start in the order they first asked while they kept asking
    # (FIFO), unless a slot freed before the earlier one asked again (no job waits on a
    # free slot): checked as "a job never starts before an earlier asker of its key that was
    # refused and was still waiting by more than the park time". A waiter far back sleeps
    # longer than that (turns x PARK), woken by a release, or by the sweep when a dead holder's
    # lease runs out: without the sweep a newcomer could take such a slot 150 ms ahead of it
    # (hypothesis found limit 2: two holders dead, an earlier waiter parked one turn back).
    for key in KEYS:
        mine = sorted((first_asked[j], started[j], j) for j in started if jobs[j][1] == key)
        for (asked_a, start_a, _), (asked_b, start_b, _) in itertools.pairwise(mine):
            if asked_a < asked_b:
                assert start_b >= start_a or start_a - start_b <= PARK + TTL


def test_a_dead_holders_slot_comes_back_at_its_lease_expiry() -> None:
    state = LeaseState()
    assert lease_try_acquire(state, "dead", 0, 1, TTL, PARK).granted
    waiting = lease_try_acquire(state, "next", 5, 1, TTL, PARK)
    assert not waiting.granted and waiting.retry_in_ms == TTL - 5  # asks at the expiry
    assert not lease_try_acquire(state, "next", TTL - 1, 1, TTL, PARK).granted
    assert lease_try_acquire(state, "next", TTL, 1, TTL, PARK).granted


def test_waiters_take_free_slots_in_arrival_order() -> None:
    state = LeaseState()
    assert lease_try_acquire(state, "run", 0, 1, TTL, PARK).granted
    assert not lease_try_acquire(state, "first", 1, 1, TTL, PARK).granted
    second = lease_try_acquire(state, "second", 2, 1, TTL, PARK)
    assert not second.granted and second.position == 1
    assert lease_release(state, "run", 3, 1) == ["first"]
    assert not lease_try_acquire(state, "second", 4, 1, TTL, PARK).granted  # first is due
    assert lease_try_acquire(state, "first", 5, 1, TTL, PARK).granted


def test_a_waiter_that_stops_asking_is_forgotten() -> None:
    state = LeaseState()
    assert lease_try_acquire(state, "run", 0, 1, TTL, PARK).granted
    gone = lease_try_acquire(state, "gone", 1, 1, TTL, PARK)
    lease_release(state, "run", 2, 1)
    # "gone" never asks again: past its promise, the slot goes to the next asker.
    later = 1 + gone.retry_in_ms + TTL
    assert not lease_try_acquire(state, "other", later - 1, 1, TTL, PARK).granted
    assert lease_try_acquire(state, "other", later, 1, TTL, PARK).granted


def test_a_deep_backlog_asks_again_rarely() -> None:
    # One key's 1,000 waiting jobs: the 2 due a slot ask at the earliest expiry; the others
    # are woken by releases in their turn, and ask by themselves only after as many park
    # times as they are turns from a slot, spread by holder: not 1,000 asks per park time.
    state = LeaseState()
    for run in ("r1", "r2"):
        assert lease_try_acquire(state, run, 0, 2, TTL, PARK).granted
    retries = [lease_try_acquire(state, f"w{n}", 1, 2, TTL, PARK).retry_in_ms for n in range(1000)]
    assert retries[:2] == [TTL - 1, TTL - 1]
    for position, retry in enumerate(retries[2:], start=2):
        turns = min(position // 2, PARK_TURNS)
        assert PARK * turns <= retry < 2 * PARK * turns
    assert sum(1 for r in retries if r < 10 * PARK) <= 20  # the 2 due and 18 within 9 turns
    deep = retries[2 * PARK_TURNS :]
    assert max(deep) - min(deep) > PARK * PARK_TURNS / 2  # spread, not all at one instant


def test_a_woken_waiter_that_never_asks_gives_up_its_turn_after_the_claim() -> None:
    state = LeaseState()
    assert lease_try_acquire(state, "run", 0, 1, TTL, PARK).granted
    assert not lease_try_acquire(state, "gone", 1, 1, TTL, PARK).granted
    behind = lease_try_acquire(state, "next", 2, 1, TTL, PARK)
    assert not behind.granted and behind.retry_in_ms >= PARK  # far back: asks late by itself
    assert lease_release(state, "run", 3, 1, claim_ms=10) == ["gone"]
    assert not lease_try_acquire(state, "next", 12, 1, TTL, PARK).granted  # gone's claim runs
    assert lease_try_acquire(state, "next", 13, 1, TTL, PARK).granted  # gone never asked


# --- fairness across keys --------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    backlog=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(1, 40), min_size=1),
    picks=st.integers(1, 200),
)
def test_round_robin_serves_every_waiting_key_within_one_turn(
    backlog: dict[str, int], picks: int
) -> None:
    waiting = dict(backlog)
    last: str | None = None
    since_served = dict.fromkeys(waiting, 0)
    for _ in range(picks):
        key = next_key([k for k, n in waiting.items() if n], last)
        if key is None:
            break
        waiting[key] -= 1
        last = key
        for other in since_served:
            since_served[other] = 0 if other == key else since_served[other] + 1
            if waiting[other]:  # a key still waiting is never passed over for a whole turn
                assert since_served[other] < len(backlog)


def test_one_flooding_key_does_not_hold_back_the_others() -> None:
    # One key with 10,000 waiting jobs, 20 keys with 5 each, served one job per turn: every
    # small key's jobs are all served within its 5 turns of 21 keys.
    waiting = {"flood": 10_000} | {f"k{i:02d}": 5 for i in range(20)}
    served_at: dict[str, list[int]] = defaultdict(list)
    last: str | None = None
    for turn in range(10_100):
        key = next_key([k for k, n in waiting.items() if n], last)
        assert key is not None
        waiting[key] -= 1
        served_at[key].append(turn)
        last = key
    assert max(max(v) for k, v in served_at.items() if k != "flood") < 5 * 21


# --- debounce --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    period=st.integers(1, 20),
    max_wait=st.one_of(st.none(), st.integers(1, 60)),
    gaps=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(KEYS)), min_size=1, max_size=50),
    lateness=st.lists(st.integers(0, 15), min_size=1, max_size=10),
)
def test_debounce_runs_once_per_burst_with_the_last_payload(
    period: int,
    max_wait: int | None,
    gaps: list[tuple[int, str]],
    lateness: list[int],
) -> None:
    if max_wait is not None:
        max_wait = max(max_wait, period)
    states: dict[str, DebounceState] = defaultdict(DebounceState)
    events: list[tuple[int, int, str, str, int]] = []  # (time, order, kind, key, job)
    now = 0
    for job, (gap, key) in enumerate(gaps):
        now += gap
        events.append((now, job, "dispatch", key, job))
    heapq.heapify(events)
    order = len(gaps)
    dispatched_at: dict[int, int] = {}
    served_by: dict[int, str] = {}
    runs: dict[str, tuple[int, tuple[str, ...], object]] = {}  # run id -> start, members, payload
    claims = 0
    while events:
        now, _, kind, key, job = heapq.heappop(events)
        state = states[key]
        if kind == "dispatch":
            dispatched_at[job] = now
            ticket = debounce_dispatch(state, str(job), {"n": job}, now, period, max_wait)
            # the same dispatch again (a retried call): the same answer, nothing collapses twice
            assert debounce_dispatch(state, str(job), {"n": job}, now, period, max_wait) == ticket
            served_by[job] = ticket.run_id
            if not ticket.joined:  # a new run: it asks to start at its due time (or later)
                order += 1
                heapq.heappush(events, (ticket.due, order, "claim", key, job))
            continue
        claim = debounce_claim(state, str(job), now)
        assert claim.status in ("start", "wait")
        if claim.status == "wait":
            claims += 1
            late = lateness[claims % len(lateness)]
            order += 1
            heapq.heappush(events, (now + claim.retry_in_ms + late, order, "claim", key, job))
            continue
        runs[str(job)] = (now, claim.members, claim.payload)
        assert debounce_claim(state, str(job), now + 1) == claim  # a rerun: the same burst
    # every dispatch is served by exactly one run, the one its ticket named
    served = [int(m) for _, members, _ in runs.values() for m in members]
    assert sorted(served) == sorted(dispatched_at)
    for run_id, (start, members, payload) in runs.items():
        times = [dispatched_at[int(m)] for m in members]
        assert all(served_by[int(m)] == run_id for m in members)
        assert members[0] == run_id and times == sorted(times)
        assert payload == {"n": int(members[-1])}  # the last dispatch's payload
        # a burst: each dispatch within `period` of the previous, all before first + max_wait
        assert all(b - a <= period for a, b in itertools.pairwise(times))
        if max_wait is not None:
            assert times[-1] <= times[0] + max_wait
        # started no earlier than `period` after the last dispatch or max_wait after the first
        due = times[-1] + period
        if max_wait is not None:
            due = min(due, times[0] + max_wait)
        assert start >= due
    for key in KEYS:  # consecutive bursts of a key really are separate bursts
        mine = sorted(
            (dispatched_at[int(m[0])], [dispatched_at[int(x)] for x in m], runs[r][0])
            for r, (_, m, _) in runs.items()
            if gaps[int(r)][1] == key
        )
        for (first_a, times_a, start_a), (first_b, _, _) in itertools.pairwise(mine):
            quiet = first_b - times_a[-1] > period
            capped = max_wait is not None and first_b > first_a + max_wait
            assert quiet or capped or first_b >= start_a


def test_debounce_on_time_starts_exactly_at_the_quiet_end_or_the_cap() -> None:
    state = DebounceState()
    for at in (0, 3, 6):
        ticket = debounce_dispatch(state, f"j{at}", {"at": at}, at, 5, 8)
    assert ticket.run_id == "j0" and ticket.due == 8  # 6 + 5 = 11, capped at 0 + 8
    assert debounce_claim(state, "j0", 7).status == "wait"
    claim = debounce_claim(state, "j0", 8)
    assert (claim.status, claim.payload, claim.members) == ("start", {"at": 6}, ("j0", "j3", "j6"))
    assert debounce_claim(state, "j0", 9) == claim  # a rerun of the run: the same burst
    fresh = debounce_dispatch(state, "j9", {"at": 9}, 9, 5, 8)
    assert not fresh.joined and fresh.due == 14
    state.prune(8 + 3600, keep_started_ms=3600)  # the started burst is forgotten in time
    assert debounce_claim(state, "j0", 8 + 3600).status == "gone"


# --- a run's limits together ---------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    calls=st.integers(1, 4),
    period=st.integers(5, 60),
    limit=st.integers(1, 3),
    runs=st.lists(st.tuples(st.integers(0, 100), st.integers(1, 50)), min_size=1, max_size=30),
)
def test_admit_takes_every_limit_or_none(
    calls: int, period: int, limit: int, runs: list[tuple[int, int]]
) -> None:
    # One job under a rate limit and a concurrency limit at once; each run asks at its arrival,
    # runs for its time, and, refused, asks again when told or when a release wakes it.
    limits = [Limit(RATE, calls=calls, period_ms=period),
              Limit(CONCURRENCY, limit=limit, ttl_ms=10_000, park_ms=200)]  # fmt: skip
    states: list[object] = [None, None]
    events: list[tuple[int, int, str, int]] = []
    order = 0

    def push(at: int, kind: str, run: int) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, run))

    for run, (arrival, _) in enumerate(runs):
        push(arrival, "ask", run)
    started: dict[int, int] = {}
    ended: dict[int, int] = {}
    while events:
        now, _, kind, run = heapq.heappop(events)
        assert now < 1_000_000, "a run never started"
        if kind == "end":
            lease = LeaseState.from_json(states[1])  # type: ignore[arg-type]
            for woken in lease_release(lease, str(run), now, limit):
                push(now, "ask", int(woken))
            states[1] = None if lease.empty() else lease.to_json()
            ended[run] = now
            continue
        if run in started:
            continue
        before = list(states)
        decision = admit(str(run), limits, states, now, grace_ms=0, keep_started_ms=0)
        for index, (state, _expires) in decision.changes.items():
            states[index] = state
        if decision.granted:
            started[run] = now
            push(now + runs[run][1], "end", run)
            continue
        assert states[0] == before[0]  # a refused run counts no start ...
        lease = LeaseState.from_json(states[1])  # type: ignore[arg-type]
        assert str(run) not in lease.leases  # ... and holds no slot
        push(now + decision.retry_in_ms, "ask", run)
    assert set(started) == set(range(len(runs)))
    times = sorted(started.values())
    assert all(
        later - earlier >= period for earlier, later in zip(times, times[calls:], strict=False)
    )
    edges = sorted([(t, 1) for t in started.values()] + [(t, -1) for t in ended.values()],
                   key=lambda e: (e[0], e[1]))  # fmt: skip
    running = 0
    for _, step in edges:
        running += step
        assert running <= limit


def test_admit_claims_a_burst_only_when_the_rate_lets_the_run_start() -> None:
    bursts = DebounceState()
    debounce_dispatch(bursts, "run", {"v": 1}, 0, 10, None)
    debounce_dispatch(bursts, "other", {"v": 2}, 5, 10, None)
    limits = [Limit(DEBOUNCE), Limit(RATE, calls=1, period_ms=100)]
    states: list[object] = [bursts.to_json(), [10]]  # the rate's one start is used at 10
    refused = admit("run", limits, states, 20, grace_ms=0, keep_started_ms=1000)
    assert not refused.granted and refused.refused == 1 and refused.retry_in_ms == 90
    assert refused.changes == {}  # the burst stays open for later
    granted = admit("run", limits, states, 110, grace_ms=0, keep_started_ms=1000)
    assert granted.granted and granted.claim is not None
    assert granted.claim.payload == {"v": 2} and granted.claim.members == ("run", "other")
    assert granted.changes[1] == ([110], 210)
    kept, kept_until = granted.changes[0]  # the started burst, kept for a rerun until 1110
    assert kept_until == 1110
    rerun = admit("run", limits, [kept, [110]], 300, grace_ms=0, keep_started_ms=1000)
    assert rerun.granted and rerun.claim == granted.claim
