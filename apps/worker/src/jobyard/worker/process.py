"""One worker process: a Dramatiq Worker per queue with that queue's concurrency, a heartbeat,
and a graceful stop on SIGTERM that lets in-flight jobs finish within the grace period and
requeues the ones that cannot."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Any, NamedTuple

from dramatiq.broker import Broker, MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from jobyard.job_engine import env, tracing
from jobyard.job_engine.db import joblog
from jobyard.job_engine.queues import get_queue, parse_queue_list
from jobyard.queue.client import get_client
from jobyard.queue.direct import DirectJobStore
from jobyard.queue.dramatiq_compat import broker_id_of
from jobyard.queue.messages import SEQ
from jobyard.queue.worker import JobyardWorker, RunGate, StrandedSweep
from jobyard.worker.liveness import Heartbeat, new_worker_id

log = logging.getLogger("jobyard.worker")

#: A message running this many times its time limit means the thread is wedged.
STUCK_FACTOR = 2
#: A run still before its first step after this many seconds is shown as running, at the next
#: heartbeat. Marking every run when it starts would cost a short job one more Redis write and
#: job log event; a run that reaches a step is marked by its start call anyway.
SHOW_RUNNING_AFTER = 1.0


class Run(NamedTuple):
    """A message this process is running."""

    queue: str
    redis_message_id: str
    started: float  # time.monotonic()
    job_id: str
    seq: int


class InFlight(Middleware):
    """Tracks the messages this process is running: to requeue them if the grace period ends,
    and to show the long ones as running (`long_unmarked`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, Run] = {}
        self.marked: set[str] = set()  # message ids shown as running

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        run = Run(
            message.queue_name,
            message.options["redis_message_id"],
            time.monotonic(),
            message.args[0] if message.args else "",
            int(message.options.get(SEQ, 0)),
        )
        with self.lock:
            self.running[message.message_id] = run

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        with self.lock:
            self.running.pop(message.message_id, None)
            self.marked.discard(message.message_id)

    after_skip_message = after_process_message

    def stuck(self, limits_ms: dict[str, int]) -> bool:
        now = time.monotonic()
        with self.lock:
            return any(
                (now - run.started) * 1000 > STUCK_FACTOR * limits_ms.get(run.queue, 3_600_000)
                for run in self.running.values()
            )

    def long_unmarked(self, seconds: float) -> dict[str, Run]:
        """Runs started at least `seconds` ago and not yet shown as running, by message id."""
        since = time.monotonic() - seconds
        with self.lock:
            return {
                message_id: run
                for message_id, run in self.running.items()
                if run.started <= since and message_id not in self.marked
            }

    def mark(self, message_id: str) -> None:
        with self.lock:
            if message_id in self.running:
                self.marked.add(message_id)


class WorkerProcess:
    def __init__(self, queues: list[str], token: str | None = None) -> None:
        """`token`: the last part of the worker id, chosen by the supervisor (which then knows
        the id of a process it sees die: see jobyard.worker.supervisor)."""
        from jobyard.queue.broker import build_broker

        self.queues = queues
        self.worker_id = new_worker_id(token)
        # With the job log on, every job change is marked for the supervisor's shipper. The
        # job threads' calls made at the same moment share a round trip (CallGroup).
        self.store = DirectJobStore(
            get_client(timeout=env.get_float(env.WORKER_REDIS_TIMEOUT)),
            log_changes=joblog.enabled(),
            group_calls=True,
        )
        self.in_flight = InFlight()
        self.brokers: dict[str, RedisBroker] = {}
        self.workers: dict[str, JobyardWorker] = {}
        self.limits_ms: dict[str, int] = {}
        gate = RunGate()  # a suspect runs alone in the process, whatever its queue
        for queue in queues:
            config = get_queue(queue)
            broker = build_broker(
                queue, store=self.store, broker_id=broker_id_of(self.worker_id, queue)
            )
            broker.add_middleware(self.in_flight)
            self.brokers[queue] = broker
            self.limits_ms[queue] = int(config.time_limit * 1000)
            worker = JobyardWorker(
                broker,
                queues={queue},
                worker_threads=config.concurrency,
                worker_timeout=200,
                gate=gate,
            )
            worker.queue_prefetch = config.prefetch
            self.workers[queue] = worker
        self.heartbeat = Heartbeat(
            self.store,
            self.brokers,
            self.worker_id,
            env.get_float(env.WORKER_HEARTBEAT_INTERVAL),
            healthy=self.healthy,
            each_beat=self.each_beat,
        )
        self.stranded = StrandedSweep(self.workers.values())
        self.stop_requested = threading.Event()

    def healthy(self) -> bool:
        threads_alive = all(
            t.is_alive() for w in self.workers.values() for t in (*w.workers, *w.consumers.values())
        )
        return threads_alive and not self.in_flight.stuck(self.limits_ms)

    def each_beat(self) -> None:
        self.show_long_runs_running()
        self.stranded.run_once()  # after a failover: acks it lost (see StrandedSweep)

    def show_long_runs_running(self) -> None:
        for message_id, run in self.in_flight.long_unmarked(SHOW_RUNNING_AFTER).items():
            self.store.mark_running(run.job_id, run.seq)
            self.in_flight.mark(message_id)

    def run(self) -> int:
        for broker in self.brokers.values():
            # Starts the TimeLimit watchdog, as `dramatiq`'s own CLI does in each process.
            broker.emit_after("process_boot")
        for worker in self.workers.values():
            worker.start()
        self.heartbeat.beat()  # be visible to dispatchers before the first interval passes
        self.heartbeat.start()
        log.info("worker %s consuming %s", self.worker_id, ", ".join(self.queues))
        self.stop_requested.wait()
        return self.shutdown(env.get_float(env.WORKER_SHUTDOWN_GRACE))

    def shutdown(self, grace: float) -> int:
        log.info("worker %s stopping; in-flight jobs get %.0fs", self.worker_id, grace)
        self.heartbeat.stop_and_deregister()
        stoppers = [
            threading.Thread(target=w.stop, kwargs={"timeout": int(grace * 1000)}, daemon=True)
            for w in self.workers.values()
        ]
        for t in stoppers:
            t.start()
        deadline = time.monotonic() + grace
        for t in stoppers:
            t.join(max(0.0, deadline - time.monotonic()))
        return self.requeue_unfinished()

    def requeue_unfinished(self) -> int:
        with self.in_flight.lock:
            unfinished = list(self.in_flight.running.values())
        for run in unfinished:
            log.warning("requeueing unfinished message %s on %s", run.redis_message_id, run.queue)
            self.brokers[run.queue].do_requeue(run.queue, run.redis_message_id)
        return 0


def _install_child_dispatcher() -> None:
    """Jobs here start child jobs through the dispatcher, and a release here wakes the Temporal
    workflows it frees a slot for (flow control in a mixed run)."""
    try:
        from jobyard.dispatcher import install_child_dispatcher
        from jobyard.dispatcher.flow import install_cross_engine_wake
    except ImportError:  # a worker image without the dispatcher cannot start child jobs
        return
    install_child_dispatcher()
    install_cross_engine_wake("dramatiq")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobyard-worker-process")
    parser.add_argument("--queues", default="")
    parser.add_argument("--worker-token", default=None, help="the worker id's last part")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
        force=True,
    )
    _install_child_dispatcher()
    process = WorkerProcess(parse_queue_list(args.queues), args.worker_token)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: process.stop_requested.set())
    code = process.run()
    tracing.shutdown()  # os._exit skips the span exporter's own exit hook
    logging.shutdown()
    os._exit(code)  # threads of unfinished jobs must not keep the process alive


if __name__ == "__main__":
    main()
