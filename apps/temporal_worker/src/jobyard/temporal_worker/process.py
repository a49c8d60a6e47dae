"""The Temporal worker process that `jobyard temporal-worker` (supervisor.py) starts and keeps
running: `python -m jobyard.temporal_worker.process --queues a,b`."""

from __future__ import annotations

import argparse

from jobyard.job_engine.queues import parse_queue_list
from jobyard.job_engine.registry import load_job_modules
from jobyard.temporal_worker.worker import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queues", default="")
    load_job_modules()
    main(parse_queue_list(parser.parse_args().queues))
