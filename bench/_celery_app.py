"""Celery with its Redis broker: bench_throughput's no-op task (no result backend), and
bench_workloads' `w_*` tasks (see _workload.py), acknowledged late (after they ran), as a
Celery user who must not lose a job configures them."""

import os

from _workload import WORKLOADS, io_step, mark
from celery import Celery

app = Celery("bench", broker=os.environ["REDIS_URL"])
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)


@app.task(name="noop")
def noop(job_id, payload):
    return None


@app.task(name="w_noop", acks_late=True)
def w_noop(payload):
    mark("s", payload)
    mark("d", payload)


@app.task(name="w_step1", acks_late=True)
def w_step1(payload):
    mark("s", payload)
    result = io_step(payload["order"])
    mark("d", payload)
    return result


@app.task(name="w_step3", acks_late=True)
def w_step3(payload):
    mark("s", payload)
    for _ in range(3):
        result = io_step(payload["order"])
    mark("d", payload)
    return result


@app.task(name="w_sleep", acks_late=True)
def w_sleep(payload):
    mark("s", payload)
    io_step(payload["order"])
    w_sleep_b.apply_async((payload,), countdown=WORKLOADS["sleep"].sleep)


@app.task(name="w_sleep_b", acks_late=True)
def w_sleep_b(payload):
    result = io_step(payload["order"])
    mark("d", payload)
    return result
