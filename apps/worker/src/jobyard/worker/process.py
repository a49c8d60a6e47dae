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
from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from jobyard.job_engine import env, tracing
from jobyard.job_engine.db import joblog
from jobyard.queue.client import get_client
from jobyard.queue.direct import DirectJobStore
from jobyard.queue.queues import get_queue, parse_queue_list
from jobyard.queue.worker import JobyardWorker
from jobyard.worker.liveness import Heartbeat, new_worker_id

log = logging.getLogger("jobyard.worker")

#: A message running this many times its time limit means the thread is wedged.
STUCK_FACTOR = 2


class InFlight(Middleware):
    """Tracks the messages this process is running, to requeue them if the grace period ends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, tuple[str, str, float, int]] = {}

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        limit = message.options.get("time_limit") or 0
        with self.lock:
            self.running[message.message_id] = (
                message.queue_name,
                message.options["redis_message_id"],
                time.monotonic(),
                limit,
            )

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

    after_skip_message = after_process_message

    def stuck(self, limits_ms: dict[str, int]) -> bool:
        now = time.monotonic()
        with self.lock:
            return any(
                (now - started) * 1000 > STUCK_FACTOR * limits_ms.get(queue, 3_600_000)
                for queue, _, started, _ in self.running.values()
            )


class WorkerProcess:
    def __init__(self, queues: list[str]) -> None:
        from jobyard.queue.broker import build_broker

        self.queues = queues
        self.worker_id = new_worker_id()
        # With the job log on, every job change is marked for the supervisor's shipper.
        self.store = DirectJobStore(
            get_client(timeout=env.get_float(env.WORKER_REDIS_TIMEOUT)),
            log_changes=joblog.enabled(),
        )
        self.in_flight = InFlight()
        self.brokers: dict[str, RedisBroker] = {}
        self.workers: dict[str, JobyardWorker] = {}
        self.limits_ms: dict[str, int] = {}
        for queue in queues:
            config = get_queue(queue)
            broker = build_broker(queue, store=self.store)
            broker.add_middleware(self.in_flight)
            self.brokers[queue] = broker
            self.limits_ms[queue] = int(config.time_limit * 1000)
            worker = JobyardWorker(
                broker, queues={queue}, worker_threads=config.concurrency, worker_timeout=200
            )
            worker.queue_prefetch = config.prefetch
            self.workers[queue] = worker
        self.heartbeat = Heartbeat(
            self.store,
            self.brokers,
            self.worker_id,
            env.get_float(env.WORKER_HEARTBEAT_INTERVAL),
            healthy=self.healthy,
        )
        self.stop_requested = threading.Event()

    def healthy(self) -> bool:
        threads_alive = all(
            t.is_alive() for w in self.workers.values() for t in (*w.workers, *w.consumers.values())
        )
        return threads_alive and not self.in_flight.stuck(self.limits_ms)

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
        for queue, redis_message_id, _, _ in unfinished:
            log.warning("requeueing unfinished message %s on %s", redis_message_id, queue)
            self.brokers[queue].do_requeue(queue, redis_message_id)
        return 0


def _install_child_dispatcher() -> None:
    try:
        from jobyard.dispatcher import install_child_dispatcher
    except ImportError:  # a worker image without the dispatcher cannot start child jobs
        return
    install_child_dispatcher()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobyard-worker-process")
    parser.add_argument("--queues", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
        force=True,
    )
    _install_child_dispatcher()
    process = WorkerProcess(parse_queue_list(args.queues))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: process.stop_requested.set())
    code = process.run()
    tracing.shutdown()  # os._exit skips the span exporter's own exit hook
    logging.shutdown()
    os._exit(code)  # threads of unfinished jobs must not keep the process alive


if __name__ == "__main__":
    main()
