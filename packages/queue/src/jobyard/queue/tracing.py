"""The Dramatiq half of jobyard's tracing (see jobyard.job_engine.tracing): a middleware that
continues the trace a job message carries, with a ``jobyard.queue_wait`` span for the time it
waited and a ``jobyard.run`` span, current while the handler runs, for its steps and for the
message a retry or a durable sleep sends."""

from __future__ import annotations

import logging
import time
from typing import Any

from dramatiq.broker import Broker
from dramatiq.middleware import Middleware

from jobyard.job_engine import tracing
from jobyard.queue.keys import DELAY_SUFFIX
from jobyard.queue.messages import RESUME, SEQ, TRACE

log = logging.getLogger("jobyard.tracing")
#: The MessageProxy attribute holding the run's span and its `current` context manager.
_RUN = "jobyard_run_span"


class TracingMiddleware(Middleware):
    """Added to a worker's brokers when tracing is on (jobyard.queue.broker.build_broker).
    Dramatiq calls both hooks on the worker thread that runs the message."""

    def before_process_message(self, broker: Broker, message: Any) -> None:
        try:
            self._begin(message)
        except Exception:  # a tracing fault must never fail or drop a job
            log.warning("tracing: the run of message %s has no span", message.message_id)

    def _begin(self, message: Any) -> None:
        options = message.options
        parent = options.get(TRACE)
        job_id = message.args[0] if message.args else ""
        queue = message.queue_name.removesuffix(DELAY_SUFFIX)
        attributes: dict[str, Any] = tracing.job_attributes(
            job_id, message.actor_name, queue, "dramatiq"
        )
        now = time.time()
        tracing.completed_span(
            tracing.QUEUE_WAIT,
            {**attributes, "jobyard.delayed": bool(options.get("eta"))},
            start=message.message_timestamp / 1000,
            end=now,
            parent=parent,
        )
        attributes.update(
            {"jobyard.seq": options.get(SEQ, 0), "jobyard.resume": bool(options.get(RESUME))}
        )
        span = tracing.start_span(
            tracing.RUN, attributes, parent=parent, kind="consumer", start=now
        )
        current = tracing.current(span)
        current.__enter__()
        setattr(message, _RUN, (span, current))

    def after_process_message(
        self,
        broker: Broker,
        message: Any,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        run = getattr(message, _RUN, None)
        if run is None:
            return
        setattr(message, _RUN, None)
        span, current = run
        try:
            if exception is not None:  # bookkeeping failed (a job's errors are caught before)
                span.record_exception(exception)
            span.end()
        finally:
            current.__exit__(None, None, None)  # the worker thread's next message starts clean

    after_skip_message = after_process_message
