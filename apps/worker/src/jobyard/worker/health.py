"""`jobyard health`: is a worker process on this host alive and beating for its queues?"""

from __future__ import annotations

import socket

import redis

from jobyard.job_engine import env
from jobyard.job_engine.queues import parse_queue_list
from jobyard.queue import keys
from jobyard.queue.client import make_client


def check_health(queues_text: str = "") -> tuple[bool, str]:
    queues = parse_queue_list(queues_text)
    timeout_ms = env.get_float(env.WORKER_HEARTBEAT_TIMEOUT) * 1000
    host = socket.gethostname() + ":"
    client = make_client(timeout=1.0)
    try:
        now_s, now_us = client.time()
        now_ms = now_s * 1000 + now_us // 1000
        missing = []
        for queue in queues:
            beats = client.zrangebyscore(keys.workers(queue), now_ms - timeout_ms, "+inf")
            # The client returns bytes (no decode_responses); redis-py types members as any.
            if not any(str(member, "utf-8").startswith(host) for member in beats):  # type: ignore[arg-type]
                missing.append(queue)
    except redis.RedisError as exc:
        return False, f"unhealthy: Redis unreachable ({exc})"
    finally:
        client.close()
    if missing:
        return False, f"unhealthy: no live worker on this host for {', '.join(missing)}"
    return True, f"healthy: {', '.join(queues)}"
