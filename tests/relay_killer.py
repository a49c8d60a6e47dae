"""A dispatch relay SIGKILLed mid-batch: one pass that sends its batch to the engines and kills
its own process before the transaction that deletes the rows commits (tests of the relay, and
the fault suite's row). Run as `python -m tests.relay_killer` with the test's environment."""

from __future__ import annotations

import os
import signal

from jobyard.dispatcher import get_dispatcher
from jobyard.dispatcher.engines import Submission
from jobyard.dispatcher.models import JobHandle
from jobyard.dispatcher.relay import OutboxRelay
from jobyard.job_engine.registry import load_job_modules


class KilledMidBatch(OutboxRelay):
    def send(self, jobs: list[Submission]) -> list[JobHandle | Exception]:
        results = super().send(jobs)
        print(f"sent {sum(isinstance(r, JobHandle) for r in results)} of {len(jobs)}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        return results


if __name__ == "__main__":
    load_job_modules()
    KilledMidBatch(get_dispatcher()).relay_once()
