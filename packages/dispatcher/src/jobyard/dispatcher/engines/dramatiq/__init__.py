from jobyard.dispatcher.engines.base import Orphan
from jobyard.dispatcher.engines.dramatiq.engine import DramatiqEngine
from jobyard.dispatcher.engines.dramatiq.errors import map_redis_errors

__all__ = ["DramatiqEngine", "Orphan", "map_redis_errors"]
