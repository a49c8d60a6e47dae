"""RQ's job for the throughput peers (RQ imports it by path in its workers)."""


def noop(job_id, payload):
    return None
