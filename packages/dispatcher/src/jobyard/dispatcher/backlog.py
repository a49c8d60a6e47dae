"""The non-transactional dispatch's one limit during a database outage.

`dispatch_job` without `connection=` sends the job at once and leaves its "queued" job log row to
this process's writer thread (joblog/writer.py), which keeps unwritten events in memory while
the database is down. That row is how a job is found again when Redis comes back empty (the
rescue's `recover_lost`), so an unwritten one is a job nothing would recover. Past
JOBYARD_JOB_LOG_DISPATCH_LIMIT unwritten events, dispatch refuses (`JobLogBacklogError`, a
`DispatchUnavailableError`: nothing started) instead of growing that exposure, and well before
the writer's own bound (`joblog.MAX_BUFFER`), so a dispatch's row is never the one it drops.
"""

from __future__ import annotations

from jobyard.dispatcher.errors import JobLogBacklogError
from jobyard.job_engine import env
from jobyard.job_engine.db import joblog


def check_job_log_backlog() -> None:
    """Raises JobLogBacklogError when this process's job log holds too many unwritten events."""
    writer = joblog.writer()
    if writer is None:  # JOBYARD_JOB_LOG=false: no log to keep complete
        return
    backlog = writer.backlog()
    if backlog < _limit():
        return
    raise JobLogBacklogError(
        f"dispatch refused: {backlog} job log events of this process are not written yet (the "
        f"database is unreachable), at the limit {env.JOB_LOG_DISPATCH_LIMIT}={_limit()}. A job "
        "started now could not be recovered if Redis lost it. Nothing was started: dispatch "
        "again once the database answers, or dispatch in a transaction (connection=...)."
    )


def _limit() -> int:
    return min(env.get_int(env.JOB_LOG_DISPATCH_LIMIT), joblog.MAX_BUFFER)
