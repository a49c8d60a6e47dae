"""jobyard.temporal_worker: the Temporal side of jobyard."""
