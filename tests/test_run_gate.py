"""RunGate: a process's runs go side by side; a suspect's runs alone (jobyard.queue.reclaim)."""

from __future__ import annotations

import threading
import time

from jobyard.queue.worker import ALONE, RunGate


class Entry:
    """`gate.enter(alone, stop.is_set)` called in a thread of its own."""

    def __init__(self, gate: RunGate, alone: bool, stop: threading.Event) -> None:
        self.token: object | None = None
        self.thread = threading.Thread(target=self._enter, args=(gate, alone, stop), daemon=True)
        self.thread.start()

    def _enter(self, gate: RunGate, alone: bool, stop: threading.Event) -> None:
        self.token = gate.enter(alone, stop.is_set)

    def done(self, timeout: float = 0.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def test_runs_go_side_by_side() -> None:
    gate, never = RunGate(), threading.Event()
    first, second = gate.enter(False, never.is_set), gate.enter(False, never.is_set)
    assert first is not None and second is not None  # no wait while no suspect is about
    gate.leave(first)
    gate.leave(second)


def test_a_suspect_waits_for_the_runs_under_way_and_holds_back_new_ones() -> None:
    gate, never = RunGate(), threading.Event()
    running = gate.enter(False, never.is_set)
    suspect = Entry(gate, True, never)
    assert not suspect.done(0.5)  # a run is under way
    newcomer = Entry(gate, False, never)
    assert not newcomer.done(0.5)  # a suspect waits: no new run starts
    gate.leave(running)
    assert suspect.done(2) and suspect.token is ALONE
    assert not newcomer.done(0.5)  # the suspect runs alone
    gate.leave(ALONE)
    assert newcomer.done(2) and newcomer.token is not None
    gate.leave(newcomer.token)


def test_suspects_run_one_at_a_time() -> None:
    gate, never = RunGate(), threading.Event()
    assert gate.enter(True, never.is_set) is ALONE
    second = Entry(gate, True, never)
    assert not second.done(0.5)
    gate.leave(ALONE)
    assert second.done(2) and second.token is ALONE
    gate.leave(ALONE)


def test_a_waiter_gives_up_when_its_thread_stops() -> None:
    gate, never, stop = RunGate(), threading.Event(), threading.Event()
    running = gate.enter(False, never.is_set)
    suspect = Entry(gate, True, stop)
    time.sleep(0.3)
    stop.set()
    assert suspect.done(2) and suspect.token is None
    # It holds back no one once it gave up.
    other = gate.enter(False, never.is_set)
    assert other is not None
    gate.leave(other)
    gate.leave(running)


def test_many_threads_never_run_beside_a_suspect() -> None:
    """Usual runs and suspects from 8 threads at once: a suspect's run never overlaps another."""
    gate, never = RunGate(), threading.Event()
    lock = threading.Lock()
    running = {"usual": 0, "alone": 0}
    overlaps: list[dict[str, int]] = []

    def worker(n: int) -> None:
        for i in range(300):
            alone = (i + n) % 50 == 0
            token = gate.enter(alone, never.is_set)
            kind = "alone" if alone else "usual"
            with lock:
                running[kind] += 1
                if running["alone"] and (running["alone"] > 1 or running["usual"]):
                    overlaps.append(dict(running))
            time.sleep(0.0005)
            with lock:
                running[kind] -= 1
            gate.leave(token)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert overlaps == []
