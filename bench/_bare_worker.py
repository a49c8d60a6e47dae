"""A bare Dramatiq actor for the throughput baseline: same Redis, queue, processes and threads."""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ["REDIS_URL"], namespace="dramatiq")
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="default", actor_name="noop", max_retries=0)
def noop(job_id, payload):
    return None
