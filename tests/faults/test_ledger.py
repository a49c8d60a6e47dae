"""The ledger tells a re-run after a return from one after an interruption, and counts engines."""

from __future__ import annotations

import json

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
