"""A web process of the fault suite's transactional row: `python -m tests.faults.txn_web
<ledger> <prefix> <n> <rate>` dispatches `faults.chain` jobs in its own transactions, one job per
transaction, `rate` per second; every fifth transaction is rolled back after its dispatch. Right
after its last commit it SIGKILLs itself: no send, no flush, nothing after the commit. Job ids
are the tags: `<prefix>-c<i>` committed, `<prefix>-r<i>` rolled back."""

from __future__ import annotations

import os
import signal
import sys
import time

from sqlalchemy.exc import DBAPIError

from jobyard.dispatcher import dispatch_job
from jobyard.job_engine.db import get_engine
from jobyard.job_engine.registry import load_job_modules


def tag(prefix: str, i: int) -> str:
    return f"{prefix}-r{i}" if i % 5 == 4 else f"{prefix}-c{i}"


def main(ledger: str, prefix: str, n: int, rate: float) -> None:
    load_job_modules()
    engine = get_engine()
    begin = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, begin + i / rate - time.monotonic()))
        name = tag(prefix, i)
        payload = {"ledger": ledger, "tag": name, "steps": 2, "work": 0.02}
        while True:
            try:
                with engine.connect() as connection:
                    dispatch_job("faults.chain", payload, connection=connection, job_id=name)
                    if name.startswith(f"{prefix}-r"):
                        connection.rollback()
                    else:
                        connection.commit()
                break
            except DBAPIError:
                # The database went away (the PostgreSQL row): as a web app would, the request
                # tries its transaction again, with the same job id. A commit whose reply was
                # lost and that did commit is then a duplicate dispatch of that id: one job.
                time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
