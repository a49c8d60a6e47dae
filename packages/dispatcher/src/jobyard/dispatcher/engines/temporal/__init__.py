from jobyard.dispatcher.engines.temporal.contract import (
    STATUS_QUERY,
    WORKFLOW_NAME,
    JobRequest,
    StatusReply,
)
from jobyard.dispatcher.engines.temporal.engine import TemporalEngine
from jobyard.dispatcher.engines.temporal.errors import map_temporal_errors

__all__ = [
    "STATUS_QUERY",
    "WORKFLOW_NAME",
    "JobRequest",
    "StatusReply",
    "TemporalEngine",
    "map_temporal_errors",
]
