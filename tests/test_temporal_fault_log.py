"""Expected faults log one line per cause per interval, with a count, and no traceback (issue 29,
item 4): Redis down while jobs move to Temporal, each job's `jobyard.claim` activity failing
once, used to write five chained tracebacks per job into the Temporal worker's log."""

from __future__ import annotations

import logging
import math
import re
import time

import pytest

from jobyard.dispatcher import dispatch_job
from jobyard.temporal_worker.faultlog import FaultLog
from tests.engines import Engines
from tests.support import RedisServer, wait_for

CLAIM_CAUSE = "claim: Redis unavailable"
MORE = re.compile(r"claim: Redis unavailable: (\d+) more in the last")


def test_redis_down_claims_log_one_line_per_interval_with_a_count(
    engines: Engines, redis_server: RedisServer
) -> None:
    n = 40
    worker = engines.start_temporal_worker()
    redis_server.kill()
    began = time.monotonic()
    handles = [dispatch_job("system.echo", {"i": i}) for i in range(n)]
    assert {h.engine for h in handles} == {"temporal"}
    for handle in handles:
        assert engines.wait(handle.job_id, timeout=60).state == "succeeded"

    def counted() -> int:
        out = worker.output()
        first = out.count(f"{CLAIM_CAUSE}: job ")  # a cause's first line names its job
        return first + sum(int(m) for m in MORE.findall(out))

    # Every failed claim is accounted for, the last ones in the count written when their
    # interval ends (FaultLog's FAULT_LOG_INTERVAL, 10 s).
    wait_for(lambda: counted() == n, timeout=30, interval=0.5)
    elapsed = time.monotonic() - began
    out = worker.output()
    lines = [line for line in out.splitlines() if CLAIM_CAUSE in line]
    print(f"summary: {n} failed claims, {len(lines)} log lines, "
          f"{out.count('Traceback')} tracebacks in {elapsed:.0f} s")  # fmt: skip
    assert "Traceback" not in out, out[-5000:]
    # one line when the fault begins, then at most one per interval
    assert len(lines) <= 1 + math.ceil(elapsed / 10), lines


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def captured() -> tuple[logging.Logger, _Lines]:
    logger = logging.getLogger("tests.fault_log")
    logger.propagate = False
    handler = _Lines()
    logger.handlers = [handler]
    return logger, handler


def test_counts_per_cause_and_interval(captured: tuple[logging.Logger, _Lines]) -> None:
    logger, handler = captured
    now = [0.0]
    faults = FaultLog(logger, interval=10, clock=lambda: now[0])
    for i in range(5):
        faults.fault("a", f"job {i}")
    faults.fault("b", "job 9")
    assert handler.lines == ["a: job 0", "b: job 9"]
    now[0] = 9.9
    faults.flush()
    assert len(handler.lines) == 2  # the interval has not ended
    now[0] = 10.0
    faults.flush()
    assert handler.lines[2:] == ["a: 4 more in the last 10 s; latest: job 4"]
    now[0] = 25.0
    faults.fault("a", "job 5")  # a new interval: written at once
    assert handler.lines[3:] == ["a: job 5"]
    faults.fault("a", "job 6")
    faults.flush(force=True)
    assert handler.lines[4:] == ["a: 1 more in the last 0 s; latest: job 6"]
