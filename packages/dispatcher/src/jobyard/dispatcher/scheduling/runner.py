"""Running a scheduler: pass after pass in a thread of a worker (or of `jobyard scheduler`),
never taking its host process down."""

from __future__ import annotations

import logging
import threading

from jobyard.dispatcher.scheduling.passes import Scheduler
from jobyard.job_engine import env

log = logging.getLogger("jobyard.scheduler")


def run_forever(stop: threading.Event, scheduler: Scheduler | None = None) -> None:
    """Pass after pass until `stop`; a database it cannot reach is logged once and retried."""
    failing: str | None = None
    while not stop.is_set():
        try:
            scheduler = scheduler or Scheduler()
            delay = scheduler.run_once()
        except Exception as exc:  # never let the scheduler take its host process down
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if failing is None:
                log.warning(
                    "scheduler cannot work (%s); retrying every %ss (is the database at %s "
                    "reachable and migrated with `jobyard db upgrade`?)",
                    reason,
                    env.get(env.SCHEDULER_POLL),
                    env.DATABASE_URL,
                )
            failing = reason
            delay = float(env.get(env.SCHEDULER_POLL) or 1)
        else:
            if failing is not None:
                log.info("scheduler working again")
                failing = None
        stop.wait(delay)


def start_scheduler_thread(
    stop: threading.Event, role: str = "scheduler"
) -> threading.Thread | None:
    """Start the scheduler in a daemon thread unless `JOBYARD_SCHEDULER=false`."""
    try:
        if not env.get_bool(env.SCHEDULER):
            return None
        scheduler = Scheduler(role=role)
    except Exception as exc:  # bad settings: say so, keep the host process running
        log.error("scheduler not started: %s", exc)
        return None
    thread = threading.Thread(
        target=run_forever, args=(stop, scheduler), name="jobyard-scheduler", daemon=True
    )
    thread.start()
    log.info("scheduler started (%s)", scheduler.owner)
    return thread
