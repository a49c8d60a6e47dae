"""Bare Dramatiq actors for the baselines: same Redis, queue, processes and threads.

`noop` is bench_throughput's job; the `w_*` actors are bench_workloads' (see _workload.py):
the same calls as the jobyard jobs in _bench_jobs.py, without memoisation, and a durable sleep
done as a Dramatiq user does it, a message sent again with a delay. Dramatiq's defaults
otherwise (its Retries middleware included).
"""

import os

import dramatiq
from _workload import WORKLOADS, io_step, mark
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ["REDIS_URL"], namespace="dramatiq")
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="default", actor_name="noop", max_retries=0)
def noop(job_id, payload):
    return None


@dramatiq.actor(queue_name="default", actor_name="w_noop")
def w_noop(payload):
    mark("s", payload)
    mark("d", payload)


@dramatiq.actor(queue_name="default", actor_name="w_step1")
def w_step1(payload):
    mark("s", payload)
    result = io_step(payload["order"])
    mark("d", payload)
    return result


@dramatiq.actor(queue_name="default", actor_name="w_step3")
def w_step3(payload):
    mark("s", payload)
    for _ in range(3):
        result = io_step(payload["order"])
    mark("d", payload)
    return result


@dramatiq.actor(queue_name="default", actor_name="w_sleep")
def w_sleep(payload):
    mark("s", payload)
    io_step(payload["order"])
    w_sleep_b.send_with_options(args=(payload,), delay=int(WORKLOADS["sleep"].sleep * 1000))


@dramatiq.actor(queue_name="default", actor_name="w_sleep_b")
def w_sleep_b(payload):
    result = io_step(payload["order"])
    mark("d", payload)
    return result
