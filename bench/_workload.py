"""What every contender of bench_workloads runs, shared so that each does the same work.

A workload is a payload, some 5 ms steps (`io_step`: time.sleep, a stand-in for an API call,
returning ~200 bytes) and maybe a durable sleep between two of them. Every contender's job
appends a line when it starts and one when it is done to a file of its process (`mark`): the
benchmark reads the dispatch->start and dispatch->done times from them, and, for the bare
contenders, that every job ran (the marker is their "result recorded"). One write(2) per mark,
on a file opened with O_APPEND, the same cost for every contender.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

#: Where the job processes write their marks (a directory per contender and workload).
MARKS_ENV = "BENCH_MARKS"


@dataclass(frozen=True)
class Workload:
    name: str
    steps: int  # 5 ms steps
    sleep: float  # seconds of durable sleep after the first step (0: none)
    big_payload: bool  # the 1 KB JSON payload (the no-op job sends only its marks' fields)
    #: Jobs queued per contender for the drain mode before its first slice (topped up later).
    drain_fill: int

    @property
    def step_seconds(self) -> float:
        return self.steps * STEP_SECONDS


STEP_SECONDS = 0.005
WORKLOADS = {
    w.name: w
    for w in (
        Workload("noop", 0, 0.0, False, 20000),
        Workload("step1", 1, 0.0, True, 8000),
        Workload("step3", 3, 0.0, True, 4000),
        Workload("sleep", 2, 1.0, True, 3000),
    )
}

_ORDER = {
    "order_id": 7_654_321,
    "customer": {"id": 1234, "email": "someone@example.com", "name": "Ada Lovelace"},
    "items": [
        {
            "sku": f"SKU-{n:05d}",
            "title": f"an item of the order, number {n}",
            "qty": n % 3 + 1,
            "price_cents": 1999 + n,
        }
        for n in range(9)
    ],
    "currency": "EUR",
    "note": "leave it at the door",
}


def payload(workload: Workload, segment: str, index: int) -> dict[str, Any]:
    """The job's payload; `t` (the dispatch time) is set by the producer just before it sends."""
    body: dict[str, Any] = {"seg": segment, "i": index, "t": 0.0}
    if workload.big_payload:
        body["order"] = _ORDER
    return body


def io_step(order: dict[str, Any] | None) -> dict[str, Any]:
    """A 5 ms wait (an API call) that returns ~200 bytes of JSON."""
    time.sleep(STEP_SECONDS)
    order_id = order["order_id"] if order else 0
    return {
        "status": "ok",
        "order_id": order_id,
        "reference": f"ref-{order_id}-" + "x" * 120,
        "at": "2026-12-07T06:00:00Z",
    }


_fd: tuple[int, int] | None = None  # (pid, fd): a forked child opens its own file
_fd_lock = threading.Lock()


def _marks_fd() -> int:
    global _fd
    pid = os.getpid()
    if _fd is None or _fd[0] != pid:
        with _fd_lock:
            if _fd is None or _fd[0] != pid:
                path = os.path.join(os.environ[MARKS_ENV], f"{pid}.marks")
                _fd = (pid, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    return _fd[1]


def mark(kind: str, body: dict[str, Any]) -> None:
    """kind "s" (the job's code began) or "d" (it ended): one line per call."""
    line = f"{kind} {body['seg']} {body['i']} {body['t']:.6f} {time.time():.6f}\n"
    os.write(_marks_fd(), line.encode())


@dataclass
class Marks:
    """The marks of one contender, read incrementally from its directory. Counting the jobs
    done is a bytes.count over what is new (the producer threads share the GIL with it);
    the lines are parsed only when a segment's latencies are asked for."""

    directory: str

    def __post_init__(self) -> None:
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}
        self._chunks: list[bytes] = []  # complete lines, in the order read
        self._counted: dict[str, tuple[int, int]] = {}  # segment -> (chunks counted, done)
        self._parsed = 0  # chunks parsed into self.jobs
        #: (segment, index) -> [dispatched at, first start, first done]
        self.jobs: dict[tuple[str, int], list[float]] = {}

    def read(self) -> None:
        for name in os.listdir(self.directory):
            with open(os.path.join(self.directory, name), "rb") as f:
                f.seek(self._offsets.get(name, 0))
                new = f.read()
            if not new:
                continue
            self._offsets[name] = self._offsets.get(name, 0) + len(new)
            data = self._partial.get(name, b"") + new
            complete, _, self._partial[name] = data.rpartition(b"\n")
            if complete:  # an incomplete last line waits for the next read
                self._chunks.append(complete + b"\n")

    def done(self, segment: str) -> int:
        """Jobs of the segment whose code ended (each writes its "d" line once)."""
        self.read()
        counted, done = self._counted.get(segment, (0, 0))
        needle = f"d {segment} ".encode()
        for chunk in self._chunks[counted:]:
            done += chunk.count(needle)
        self._counted[segment] = (len(self._chunks), done)
        return done

    def segment(self, segment: str) -> dict[int, list[float]]:
        self.read()
        inf = float("inf")
        for chunk in self._chunks[self._parsed :]:
            for line in chunk.decode().splitlines():
                kind, seg, index, dispatched, at = line.split()
                key = (seg, int(index))
                entry = self.jobs.get(key)
                if entry is None:
                    entry = self.jobs[key] = [float(dispatched), inf, inf]
                slot = 1 if kind == "s" else 2
                entry[slot] = min(entry[slot], float(at))  # a replay's mark: keep the first
        self._parsed = len(self._chunks)
        return {i: v for (s, i), v in self.jobs.items() if s == segment}
