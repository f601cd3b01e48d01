"""TickStock: delivers the analytics producer's Redis events to WebSocket subscribers."""

__version__ = "0.1.0"
