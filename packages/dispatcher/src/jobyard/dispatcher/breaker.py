"""A circuit breaker for Redis: one failure opens it; a background probe closes it.

While open, dispatch skips Redis entirely, so an outage costs a web request nothing. The probe
runs off the request path, so no caller ever waits on a hung Redis twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("jobyard.dispatcher")


class CircuitBreaker:
    def __init__(self, probe: Callable[[], object], interval: float) -> None:
        self._probe = probe
        self._interval = interval
        self._open = False
        self._lock = threading.Lock()
        self._wake = threading.Event()

    @property
    def is_open(self) -> bool:
        return self._open

    def trip(self, reason: str) -> None:
        with self._lock:
            if self._open:
                return
            self._open = True
        log.warning("Redis circuit open (%s): dispatching to Temporal until it recovers", reason)
        threading.Thread(
            target=self._probe_until_healthy, name="jobyard-redis-probe", daemon=True
        ).start()

    def _probe_until_healthy(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self._probe()
            except Exception:
                continue
            self._open = False
            log.warning("Redis circuit closed: dispatching to Dramatiq again")
            return

    def probe_now(self) -> None:
        """Ask the probe to run at once (tests, and after a deploy)."""
        self._wake.set()
