"""Expected faults (Redis down for a claim, a step that failed and will be retried): one log line
per cause per interval, with a count, and no traceback. A traceback in a worker's log means a
bug; a fault the code expects and handles is an operator's fact, and a thousand copies of it in
a minute hide the line that matters."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Seconds between two lines of one cause.
FAULT_LOG_INTERVAL = 10.0


@dataclass
class _Cause:
    logged_at: float  # when its last line was written (the clock's seconds)
    since: int = 0  # occurrences not yet written
    latest: str = ""  # the newest of them, as it would have been written


class FaultLog:
    """The first occurrence of a cause is written at once; the next ones within `interval` are
    counted, and written as one line ("N more in the last S s; latest: ...") when the interval
    ends, by a background thread, so a count is never left unsaid when the fault stops."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = FAULT_LOG_INTERVAL,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.level = level
        self._clock = clock
        self._causes: dict[str, _Cause] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def fault(self, cause: str, message: str) -> None:
        """One occurrence of `cause` (a short stable key: "claim: Redis unavailable"), described
        by `message` (its details: job id, error text)."""
        now = self._clock()
        with self._lock:
            known = self._causes.get(cause)
            if known is None or (known.since == 0 and now - known.logged_at >= self.interval):
                self._causes[cause] = _Cause(now)
                write = True
            else:
                known.since += 1
                known.latest = message
                write = False
                self._ensure_thread()
        if write:
            self.logger.log(self.level, "%s: %s", cause, message)

    def flush(self, *, force: bool = False) -> None:
        """Writes the counts of causes whose interval ended (all of them, with `force`)."""
        now = self._clock()
        lines = []
        with self._lock:
            for cause, state in self._causes.items():
                if state.since and (force or now - state.logged_at >= self.interval):
                    lines.append((cause, state.since, now - state.logged_at, state.latest))
                    state.since, state.latest, state.logged_at = 0, "", now
        for cause, count, seconds, latest in lines:
            self.logger.log(
                self.level, "%s: %d more in the last %.0f s; latest: %s",
                cause, count, seconds, latest,
            )  # fmt: skip

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._flush_forever, name="jobyard-fault-log", daemon=True
            )
            self._thread.start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(min(self.interval, 1.0))
            self.flush()
