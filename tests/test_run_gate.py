"""RunGate: a process's runs go side by side; a suspect's runs alone (jobyard.queue.reclaim)."""

from __future__ import annotations

import threading
import time

from jobyard.queue.worker import RunGate


class Entry:
    """`gate.enter(alone, stop.is_set)` called in a thread of its own."""

    def __init__(self, gate: RunGate, alone: bool, stop: threading.Event) -> None:
        self.entered: bool | None = None
        self.thread = threading.Thread(target=self._enter, args=(gate, alone, stop), daemon=True)
        self.thread.start()

    def _enter(self, gate: RunGate, alone: bool, stop: threading.Event) -> None:
        self.entered = gate.enter(alone, stop.is_set)

    def done(self, timeout: float = 0.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def test_runs_go_side_by_side() -> None:
    gate, never = RunGate(), threading.Event()
    assert gate.enter(False, never.is_set)
    assert gate.enter(False, never.is_set)  # no wait while no suspect is about
    gate.leave(False)
    gate.leave(False)


def test_a_suspect_waits_for_the_runs_under_way_and_holds_back_new_ones() -> None:
    gate, never = RunGate(), threading.Event()
    assert gate.enter(False, never.is_set)
    suspect = Entry(gate, True, never)
    assert not suspect.done(0.5)  # a run is under way
    newcomer = Entry(gate, False, never)
    assert not newcomer.done(0.5)  # a suspect waits: no new run starts
    gate.leave(False)
    assert suspect.done(2) and suspect.entered
    assert not newcomer.done(0.5)  # the suspect runs alone
    gate.leave(True)
    assert newcomer.done(2) and newcomer.entered
    gate.leave(False)


def test_suspects_run_one_at_a_time() -> None:
    gate, never = RunGate(), threading.Event()
    assert gate.enter(True, never.is_set)
    second = Entry(gate, True, never)
    assert not second.done(0.5)
    gate.leave(True)
    assert second.done(2) and second.entered
    gate.leave(True)


def test_a_waiter_gives_up_when_its_thread_stops() -> None:
    gate, never, stop = RunGate(), threading.Event(), threading.Event()
    assert gate.enter(False, never.is_set)
    suspect = Entry(gate, True, stop)
    time.sleep(0.3)
    stop.set()
    assert suspect.done(2) and suspect.entered is False
    # It held back no one once it gave up.
    assert gate.enter(False, never.is_set)
    gate.leave(False)
    gate.leave(False)
