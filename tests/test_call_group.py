"""CallGroup: a worker process's concurrent script calls share round trips (real Redis)."""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from jobyard.queue.client import ConnectFailed, make_client
from jobyard.queue.direct import CallGroup, DirectJobStore


def _group(url: str, timeout: float = 5.0) -> CallGroup:
    pool = make_client(url, timeout=timeout).connection_pool
    return CallGroup(lambda: pool.connection_class(**pool.connection_kwargs))


def _in_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Runs target(0..count-1) in as many threads; returns each one's result or error."""
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            results[index] = target(index)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def _queued(group: CallGroup, count: int) -> None:
    """Waits until `count` calls wait behind the round trip under way."""
    deadline = time.monotonic() + 10
    while len(group._waiting) < count:
        assert time.monotonic() < deadline, "the calls never queued"
        time.sleep(0.005)


def _reads(client: redis.Redis) -> int:
    return int(client.info("stats")["total_reads_processed"])


def test_every_thread_gets_its_own_reply(redis_server) -> None:
    group = _group(redis_server.url)
    results = _in_threads(16, lambda t: [group.call(("ECHO", f"{t}:{i}")) for i in range(300)])
    for thread, replies in enumerate(results):
        assert replies == [f"{thread}:{i}".encode() for i in range(300)]


def test_calls_made_during_a_round_trip_go_together_in_the_next(redis_server) -> None:
    """Redis paused: the first call's round trip stays open while seven more are made; once it
    answers, the seven go in one write, which Redis reads at once."""
    group = _group(redis_server.url)
    group.call(("PING",))  # connected
    client = redis_server.client()
    reads_before = _reads(client)
    redis_server.pause()
    first = _in_threads_later(1, lambda _: group.call(("INCR", "n")))
    _queued(group, 0)
    time.sleep(0.05)
    rest = _in_threads_later(7, lambda _: group.call(("INCR", "n")))
    _queued(group, 7)
    redis_server.resume()
    replies = first() + rest()
    assert sorted(replies) == list(range(1, 9))
    # Two reads for eight calls (this client's INFO is one more); alone, each call is a read.
    assert _reads(client) - reads_before <= 3


def _in_threads_later(count: int, target: Callable[[int], Any]) -> Callable[[], list[Any]]:
    """Starts `_in_threads` in the background; the returned function waits for its results."""
    box: list[list[Any]] = []
    runner = threading.Thread(target=lambda: box.append(_in_threads(count, target)))
    runner.start()

    def results() -> list[Any]:
        runner.join(30)
        return box[0]

    return results


def test_an_error_reply_is_its_own_calls_only(redis_server) -> None:
    group = _group(redis_server.url)
    fail = "return redis.error_reply('refused ' .. ARGV[1])"

    def calls(thread: int) -> list[Any]:
        out: list[Any] = []
        for i in range(100):
            if (thread + i) % 3 == 0:
                with pytest.raises(redis.ResponseError, match=f"refused {thread}:{i}$"):
                    group.call(("EVAL", fail, 0, f"{thread}:{i}"))
                out.append("refused")
            else:
                out.append(group.call(("ECHO", f"{thread}:{i}")))
        return out

    for thread, replies in enumerate(_in_threads(8, calls)):
        assert replies == [
            "refused" if (thread + i) % 3 == 0 else f"{thread}:{i}".encode() for i in range(100)
        ]


def test_a_lost_server_fails_the_call_in_flight_and_the_waiting_ones_are_not_sent(
    redis_server,
) -> None:
    group = _group(redis_server.url)
    group.call(("PING",))
    redis_server.pause()
    first = _in_threads_later(1, lambda _: group.call(("INCR", "n")))
    time.sleep(0.05)
    rest = _in_threads_later(4, lambda _: group.call(("INCR", "n")))
    _queued(group, 4)
    redis_server.kill_paused()
    (in_flight,) = first()
    assert isinstance(in_flight, redis.ConnectionError)
    # The next round trip's connect fails: nothing was sent, so the outcome is known.
    assert all(isinstance(error, ConnectFailed) for error in rest())


def test_an_interrupted_leader_raises_in_its_own_thread_only(redis_server) -> None:
    pool = make_client(redis_server.url, timeout=5.0).connection_pool
    connects: list[str] = []

    def connect() -> Any:
        connects.append("connect")
        if len(connects) == 1:  # the first round trip: interrupted once three calls wait
            _queued(group, 3)
            raise KeyboardInterrupt
        return pool.connection_class(**pool.connection_kwargs)

    group = CallGroup(connect)
    first = _in_threads_later(1, lambda _: group.call(("ECHO", "first")))
    _queued(group, 0)
    time.sleep(0.05)
    rest = _in_threads(3, lambda t: group.call(("ECHO", f"later {t}")))
    assert isinstance(first()[0], KeyboardInterrupt)
    assert rest == [b"later 0", b"later 1", b"later 2"]


def test_a_worker_store_groups_its_calls_and_keeps_its_replies(redis_server) -> None:
    store = DirectJobStore(make_client(redis_server.url, timeout=2.0), group_calls=True)
    store.heartbeat("w1", "b1", ["default"])
    redis_server.client().script_flush()  # NOSCRIPT goes to its call, which loads and retries
    leases = _in_threads(8, lambda t: store.take_lease("lease", f"holder {t}", 10_000))
    assert sorted(leases) == [False] * 7 + [True]
    assert store.live_workers("default", 60_000) == 1
    with pytest.raises(redis.DataError):  # a value hiredis cannot pack: redis-py says why
        store.take_lease("lease", True, 10_000)  # type: ignore[arg-type]
    assert store.live_workers("default", 60_000) == 1


def _incr_in_thread(
    group: CallGroup, name: str, outcomes: dict[str, object], tracer: Any = None
) -> threading.Thread:
    """Starts a thread whose INCR call's reply or exception goes in `outcomes[name]`; `tracer`:
    its trace function (sys.settrace) for the call."""

    def run() -> None:
        sys.settrace(tracer)
        try:
            outcomes[name] = group.call(("INCR", "n"))
        except BaseException as exc:
            outcomes[name] = exc
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


class _TimeLimit(BaseException):
    """Stands for Dramatiq's TimeLimitExceeded, which its TimeLimit middleware raises in a job's
    thread from another thread (PyThreadState_SetAsyncExc), wherever that thread is."""


def _raise_in(thread: threading.Thread, exc: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))


def test_a_call_interrupted_once_handed_the_lead_leaves_it_to_the_calls_behind_it(
    redis_server,
) -> None:
    """The next leader's thread is interrupted while it waits (the exception lands when it
    wakes, handed the lead): its call is withdrawn unsent and it raises, and the call queued
    behind it leads the next round trip, so later calls do not wait forever."""
    group = _group(redis_server.url)
    group.call(("PING",))
    redis_server.pause()
    outcomes: dict[str, object] = {}

    def calling(name: str) -> threading.Thread:
        return _incr_in_thread(group, name, outcomes)

    leader = calling("leader")
    _queued(group, 0)
    time.sleep(0.05)
    next_leader = calling("next leader")
    _queued(group, 1)
    behind = calling("behind")
    _queued(group, 2)
    _raise_in(next_leader, _TimeLimit)  # lands when it wakes, handed the lead
    redis_server.resume()
    for thread in (leader, next_leader, behind):
        thread.join(10)
    assert not any(t.is_alive() for t in (leader, next_leader, behind)), outcomes
    assert isinstance(outcomes["next leader"], _TimeLimit)
    assert outcomes["leader"] == 1 and outcomes["behind"] == 2  # the interrupted one was not sent
    assert group.call(("INCR", "n")) == 3


def _check_points(module: object) -> dict[object, set[int]]:
    """Where CPython 3.11 lets an exception raised from another thread land in `module`'s
    functions, by code object: the instruction after each call, and each loop's jump back
    (a function's entry is the tracer's "call" event)."""
    import dis
    import itertools
    import types

    points: dict[object, set[int]] = {}
    codes = [v.__code__ for v in vars(module).values() if isinstance(v, types.FunctionType)]
    for cls in (v for v in vars(module).values() if isinstance(v, type)):
        for attr in vars(cls).values():
            function = getattr(attr, "__func__", attr)
            if isinstance(function, types.FunctionType):
                codes.append(function.__code__)
    for code in codes:
        instructions = list(dis.get_instructions(code))
        offsets = {b.offset for a, b in itertools.pairwise(instructions) if a.opname == "CALL"}
        offsets |= {i.offset for i in instructions if i.opname == "JUMP_BACKWARD"}
        points[code] = offsets
    return points


def _interrupting(points: dict[object, set[int]], at: int, passed: list[int]) -> Any:
    """A trace function that raises _TimeLimit at the `at`-th check point (0: never) this
    thread passes in the traced functions, counting them in `passed`."""

    def reached(frame: Any) -> None:
        passed[0] += 1
        if passed[0] == at:
            raise _TimeLimit

    def local(frame: Any, event: str, _arg: Any) -> Any:
        if event == "opcode" and frame.f_lasti in points[frame.f_code]:
            reached(frame)
        return local

    def tracer(frame: Any, event: str, _arg: Any) -> Any:
        if frame.f_code not in points:
            return None
        frame.f_trace_opcodes = True
        reached(frame)  # the function's entry
        return local

    return tracer


def _round_with_one_interrupted(server: Any, victim: str, at: int, passed: list[int]) -> None:
    """A leader's round trip under way (Redis paused), two calls waiting behind it, and one of
    the three interrupted at its `at`-th check point: every call must end (with its reply or its
    exception), the replies must be distinct, and the group must still answer."""
    from jobyard.queue import direct

    points = _check_points(direct)
    server_group = _group(server.url)
    server_group.call(("PING",))
    server.pause()
    outcomes: dict[str, object] = {}

    def calling(name: str) -> threading.Thread:
        tracer = _interrupting(points, at, passed) if name == victim else None
        return _incr_in_thread(server_group, name, outcomes, tracer)

    def queued(count: int) -> None:
        deadline = time.monotonic() + 0.2  # less when the victim left early
        while len(server_group._waiting) < count and time.monotonic() < deadline:
            time.sleep(0.002)

    threads = [calling("leader")]
    queued(0)
    time.sleep(0.01)
    threads.append(calling("next"))
    queued(1)
    threads.append(calling("behind"))
    queued(2)
    server.resume()
    for thread in threads:
        thread.join(5)
    stuck = [
        name for name, t in zip(("leader", "next", "behind"), threads, strict=True) if t.is_alive()
    ]
    assert not stuck, f"{victim} interrupted at check point {at}: {stuck} never returned"
    replies = [v for v in outcomes.values() if isinstance(v, int)]
    assert len(set(replies)) == len(replies), outcomes
    after = _in_threads(1, lambda _: server_group.call(("INCR", "n")))[0]
    assert isinstance(after, int) and after > max(replies, default=0), (victim, at, outcomes)


def test_an_interruption_anywhere_leaves_no_call_waiting_forever(redis_server) -> None:
    """Dramatiq's time limit lands in a job's thread at any check point of the interpreter: in
    the leader's round trip or its hand-over, in a waiting call, as it is handed the lead. Each
    point of each role is tried in turn (a tracer raises there); no other call may be left
    waiting. (The lead handed to a thread then interrupted before it woke anyone left three job
    threads waiting for good once, in a benchmark.)"""
    for victim in ("leader", "next", "behind"):
        passed = [0]
        _round_with_one_interrupted(redis_server, victim, 0, passed)  # counts the points
        total = passed[0]
        assert total > 5, (victim, total)
        for at in range(1, total + 1):
            _round_with_one_interrupted(redis_server, victim, at, [0])


def test_a_lead_lost_for_any_reason_is_taken_over_after_the_stall(redis_server) -> None:
    """The leading thread stops making progress and never hands the lead on (here: its connect
    hangs; the cause of the one seen in a benchmark was never pinned down): after `stall`
    seconds without a reply, a waiting call takes the lead on a new connection, and the calls
    behind it are answered. The lost leader, when it comes back, answers its own call and hands
    nothing on."""
    pool = make_client(redis_server.url, timeout=5.0).connection_pool
    hung = threading.Event()
    connects: list[str] = []

    def connect() -> Any:
        connects.append("connect")
        if len(connects) == 1:
            hung.wait(30)
        return pool.connection_class(**pool.connection_kwargs)

    group = CallGroup(connect, stall=0.5)
    outcomes: dict[str, object] = {}
    lost = _incr_in_thread(group, "lost leader", outcomes)
    _queued(group, 0)
    time.sleep(0.05)
    began = time.monotonic()
    waiting = [_incr_in_thread(group, f"waiting {i}", outcomes) for i in range(3)]
    for thread in waiting:
        thread.join(10)
    assert sorted(v for k, v in outcomes.items() if k != "lost leader") == [1, 2, 3], outcomes
    assert 0.5 <= time.monotonic() - began < 5
    hung.set()
    lost.join(10)
    assert outcomes["lost leader"] == 4
    assert group.call(("INCR", "n")) == 5 and len(connects) == 2  # on the new lead's
