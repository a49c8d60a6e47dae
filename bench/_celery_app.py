"""Celery with its Redis broker, for the throughput peers: a no-op task, no result backend."""

import os

from celery import Celery

app = Celery("bench", broker=os.environ["REDIS_URL"])
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)


@app.task(name="noop")
def noop(job_id, payload):
    return None
