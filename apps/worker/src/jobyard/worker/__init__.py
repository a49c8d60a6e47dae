"""jobyard.worker: Dramatiq worker processes for jobyard's queues."""
