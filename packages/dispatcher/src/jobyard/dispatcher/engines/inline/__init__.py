from jobyard.dispatcher.engines.inline.engine import InlineEngine

__all__ = ["InlineEngine"]
