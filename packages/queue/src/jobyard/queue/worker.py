"""Dramatiq's Worker, with the two changes jobyard's promises need.

- A consumer thread that loses its Redis connection keeps the delayed messages it holds in
  memory. Dramatiq drops them, but their ids stay in this worker's ack set, and a live worker's
  ack set is never swept: jobs parked by `ctx.sleep` or a retry backoff would wait forever.
  That includes the one delayed message whose move to its queue failed: Dramatiq has taken it
  off the in-memory delay queue by then, and the error is not even a connection error to it.
- A graceful stop gives every worker thread the whole grace period: dramatiq's `join_all`
  takes the total elapsed time off each remaining thread's timeout, so a stop can give up
  (and requeue jobs that would have finished) long before the grace ends.
"""

from __future__ import annotations

import contextlib
import time
from queue import PriorityQueue
from typing import Any

import dramatiq
import redis
from dramatiq.common import current_millis, iter_queue, q_name
from dramatiq.errors import BrokerConnectionError, ConnectionClosed
from dramatiq.worker import ConsumerThread


class KeepDelayedConsumerThread(ConsumerThread):
    """Keeps its delayed messages across a connection error: ignores the reset of
    `delay_queue` that follows one, and does not hand them back on the close after it."""

    _kept: PriorityQueue[Any] | None = None

    @property
    def delay_queue(self) -> PriorityQueue[Any]:
        assert self._kept is not None
        return self._kept

    @delay_queue.setter
    def delay_queue(self, queue: PriorityQueue[Any]) -> None:
        if self._kept is None:
            self._kept = queue

    def handle_delayed_messages(self) -> None:
        """Dramatiq's, except that a message whose enqueue fails goes back on the delay queue
        (to be enqueued again once Redis answers; a second copy from an enqueue that reached
        Redis runs once, see the job's seq) and the error is the connection error it is.

        Called after every message: an empty delay queue is seen without a get (which takes its
        lock and raises Empty). Only this thread adds to it, so the look cannot miss one."""
        if not self.delay_queue.queue:
            return
        for item in iter_queue(self.delay_queue):
            message = item.message
            if item.priority > current_millis():
                self.delay_queue.put(item)
                self.delay_queue.task_done()
                break
            ready = message.copy(queue_name=q_name(message.queue_name))
            del ready.options["eta"]
            try:
                self.broker.enqueue(ready)
            except redis.RedisError as exc:
                self.delay_queue.put(item)
                self.delay_queue.task_done()
                raise ConnectionClosed(exc) from exc
            self.post_process_message(message)
            self.delay_queue.task_done()

    def close(self) -> None:
        if self.running:  # a reconnect, not a stop: the delayed messages stay ours
            with contextlib.suppress(BrokerConnectionError):
                if self.consumer:
                    self.consumer.close()
            return
        super().close()


class JobyardWorker(dramatiq.Worker):
    def _add_consumer(self, queue_name: str, *, delay: bool = False) -> None:
        # dramatiq 2.x's Worker._add_consumer, with the consumer thread class above.
        if queue_name in self.consumers:
            return
        if self.consumer_whitelist and q_name(queue_name) not in self.consumer_whitelist:
            return
        consumer = self.consumers[queue_name] = KeepDelayedConsumerThread(
            broker=self.broker,
            queue_name=queue_name,
            prefetch=self.delay_prefetch if delay else self.queue_prefetch,
            work_queue=self.work_queue,
            worker_timeout=self.worker_timeout,
        )
        consumer.start()

    def stop(self, timeout: int = 600000) -> None:
        """Lets the worker threads finish their messages until `timeout` ms from now, then
        stops the consumers as Dramatiq does (requeueing what is left in memory)."""
        deadline = time.monotonic() + timeout / 1000
        for thread in self.workers:
            thread.stop()
        for thread in self.workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        super().stop(timeout=max(1, int((deadline - time.monotonic()) * 1000)))
