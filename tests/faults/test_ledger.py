"""The ledger tells a re-run after a return from one after an interruption, and counts engines."""

from __future__ import annotations

import json
import os

from tests.faults.ledger import Ledger


def _write(path, *lines: tuple[str, str, str, int, str]) -> None:
    with path.open("a") as f:
        for t, (ev, tag, step, pid, engine) in enumerate(lines):
            line = {"ev": ev, "t": float(t), "tag": tag, "job": tag, "step": step, "pid": pid,
                    "engine": engine}  # fmt: skip
            f.write(json.dumps(line, separators=(",", ":")) + "\n")


def test_counts_each_kind_of_rerun(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    _write(
        ledger.path,
        # a: returned on Dramatiq, then ran again on Temporal (a re-run after a return)
        ("START", "a", "s0", 1, "dramatiq"), ("END", "a", "s0", 1, "dramatiq"),
        ("START", "a", "s0", 2, "temporal"), ("END", "a", "s0", 2, "temporal"),
        # b: killed mid-step, then ran again (a re-run after an interruption)
        ("START", "b", "s0", 1, "dramatiq"), ("START", "b", "s0", 3, "dramatiq"),
        ("END", "b", "s0", 3, "dramatiq"),
        # c: raised, then retried (not a re-run of a returned step)
        ("START", "c", "s0", 1, "dramatiq"), ("FAIL", "c", "s0", 1, "dramatiq"),
        ("START", "c", "s0", 1, "dramatiq"), ("END", "c", "s0", 1, "dramatiq"),
        # d: once, cleanly
        ("START", "d", "s0", 1, "dramatiq"), ("END", "d", "s0", 1, "dramatiq"),
    )  # fmt: skip
    with ledger.path.open("a") as f:
        f.write('{"ev":"START","t":9,"tag":"e"')  # a writer killed mid-line
    counts = ledger.counts()
    assert (counts.jobs_started, counts.both_engines) == (4, 1)
    assert (counts.rerun_returned, counts.rerun_interrupted) == (1, 2)
    assert ledger.engines("a") == {"dramatiq", "temporal"}
    assert ledger.counts({"d"}).rerun_returned == 0


def test_a_rescue_handoff_is_not_a_double_run(tmp_path):
    """Dramatiq killed mid-step, the job moved to Temporal with its recorded steps: the step
    interrupted runs again there, the returned one does not. That is a handoff; a returned step
    run again, a job that went back, or a Dramatiq execution alive beside Temporal is not."""
    dead, alive = 2**22 + 12345, os.getpid()  # a pid nobody has (above pid_max), and ours
    ledger = Ledger(tmp_path / "ledger")
    _write(
        ledger.path,
        # h: s0 returned on Dramatiq, s1 killed mid-way, moved: s1 and s2 on Temporal
        ("START", "h", "s0", dead, "dramatiq"), ("END", "h", "s0", dead, "dramatiq"),
        ("START", "h", "s1", dead, "dramatiq"),
        ("START", "h", "s1", 7, "temporal"), ("END", "h", "s1", 7, "temporal"),
        ("START", "h", "s2", 7, "temporal"), ("END", "h", "s2", 7, "temporal"),
        # r: moved, but its returned s0 ran again on Temporal
        ("START", "r", "s0", dead, "dramatiq"), ("END", "r", "s0", dead, "dramatiq"),
        ("START", "r", "s0", 7, "temporal"), ("END", "r", "s0", 7, "temporal"),
        # b: ran on Temporal, then went back to Dramatiq
        ("START", "b", "s0", 7, "temporal"), ("END", "b", "s0", 7, "temporal"),
        ("START", "b", "s1", dead, "dramatiq"), ("END", "b", "s1", dead, "dramatiq"),
        # z: a Dramatiq execution whose process lives ran beside Temporal
        ("START", "z", "s0", alive, "dramatiq"),
        ("START", "z", "s0", 7, "temporal"), ("END", "z", "s0", 7, "temporal"),
    )  # fmt: skip
    counts = ledger.counts()
    assert (counts.handed_over, counts.both_engines) == (1, 3)
    assert counts.rerun_returned == 1  # r
    assert ledger.counts({"h"}).rerun_interrupted == 1


def test_a_return_in_the_moment_the_poison_killed_its_process_is_a_cut(tmp_path):
    """The poison row's accounting: a neighbour whose step returned within DEATH_WINDOW of the
    poison's death in the same process, and ran again, was cut; one that returned earlier and
    ran again is a returned-step re-run, not excused."""
    from tests.faults.poison import DEATH_WINDOW, _cuts

    ledger = Ledger(tmp_path / "ledger")
    death = 1000.0
    lines = [
        {"ev": "START", "t": death - 1.0, "tag": "at", "step": "s0", "pid": 7},
        {"ev": "END", "t": death - DEATH_WINDOW / 2, "tag": "at", "step": "s0", "pid": 7},
        {"ev": "START", "t": death - 1.0, "tag": "early", "step": "s0", "pid": 7},
        {"ev": "END", "t": death - 0.5, "tag": "early", "step": "s0", "pid": 7},
        {"ev": "START", "t": death - 0.2, "tag": "mid", "step": "s0", "pid": 7},
        {"ev": "START", "t": death, "tag": "poison", "step": "die", "pid": 7},
        {"ev": "START", "t": death + 1, "tag": "at", "step": "s0", "pid": 8},
        {"ev": "END", "t": death + 2, "tag": "at", "step": "s0", "pid": 8},
        {"ev": "START", "t": death + 1, "tag": "early", "step": "s0", "pid": 8},
        {"ev": "END", "t": death + 2, "tag": "early", "step": "s0", "pid": 8},
        {"ev": "START", "t": death + 1, "tag": "mid", "step": "s0", "pid": 8},
        {"ev": "END", "t": death + 2, "tag": "mid", "step": "s0", "pid": 8},
    ]
    _append(ledger, lines)
    histories = ledger.histories()
    deaths = {e.pid: e.started for e in histories["poison"]["die"].executions}
    assert [len(_cuts(histories[t]["s0"], deaths)) for t in ("at", "early", "mid")] == [1, 0, 1]
    assert ledger.counts().rerun_returned == 2  # "at" and "early": only "at" is excused


def test_a_step_that_raised_as_the_poison_killed_its_process_is_no_excused_re_run(tmp_path):
    """A neighbour's step that raised (FAIL) within DEATH_WINDOW of the poison's death and ran
    again is a retry (`rerun_interrupted`), not a returned-step re-run: the allowance must not
    count it, or the soak's re-runs read -1."""
    from tests.faults.poison import DEATH_WINDOW, returned_as_poison_killed

    ledger = Ledger(tmp_path / "ledger")
    death = 1000.0
    lines = [
        *_execution("failing", 7, death - 1.0, death - DEATH_WINDOW / 2, ended_as="FAIL"),
        *_execution("returned", 7, death - 1.0, death - DEATH_WINDOW / 2),
        {"ev": "START", "t": death, "tag": "poison", "step": "die", "pid": 7},
        *_execution("failing", 8, death + 1, death + 2),
        *_execution("returned", 8, death + 1, death + 2),
    ]
    _append(ledger, lines)
    counts = ledger.counts()
    assert (counts.rerun_returned, counts.rerun_interrupted) == (1, 1)
    assert counts.rerun_returned - returned_as_poison_killed(ledger.histories()) == 0


def test_a_return_as_its_worker_was_killed_is_excused_one_earlier_is_not(tmp_path):
    """The fan-out row's accounting (promise 3): a step that returned within DEATH_WINDOW of
    the row's SIGKILL of its worker and ran again in another process is allowed; one that
    returned earlier and ran again is a returned-step re-run."""
    from tests.faults.poison import DEATH_WINDOW, returned_as_killed

    ledger = Ledger(tmp_path / "ledger")
    killed_at = 1000.0
    lines = [
        *_execution("at", 7, killed_at - 1.0, killed_at - DEATH_WINDOW / 2),
        *_execution("early", 7, killed_at - 1.0, killed_at - 0.5),
        *_execution("at", 8, killed_at + 1, killed_at + 2),
        *_execution("early", 8, killed_at + 1, killed_at + 2),
    ]
    _append(ledger, lines)
    assert ledger.counts().rerun_returned == 2
    assert returned_as_killed(ledger.histories(), killed_at) == 1  # "at" only


def _execution(
    tag: str, pid: int, started: float, ended: float, ended_as: str = "END"
) -> list[dict[str, object]]:
    """The ledger lines of one execution of step s0: its START and its END (or FAIL)."""
    return [
        {"ev": "START", "t": started, "tag": tag, "step": "s0", "pid": pid},
        {"ev": ended_as, "t": ended, "tag": tag, "step": "s0", "pid": pid},
    ]


def _append(ledger: Ledger, lines: list[dict[str, object]]) -> None:
    with ledger.path.open("a") as f:
        for line in lines:
            f.write(json.dumps({**line, "job": line["tag"], "engine": "dramatiq"}) + "\n")
