"""vibecast: a streaming multi-speaker speech server."""

__version__ = "0.1.0"
