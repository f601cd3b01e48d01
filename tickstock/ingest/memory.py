"""
The embedded bus: producer and TickStock in one process, no Redis. It runs
the demo and stands in for Redis in unit tests of the parts behind it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from tickstock.domain.interfaces import IEventSource, IProducerLink
from tickstock.domain.topics import DEFAULT_REGISTRY, Registry

Receiver = Callable[[str, bytes], None]


@implementer(IEventSource, IProducerLink)
class MemoryBus:
    """
    In-process channels. Producer channels go to the router that called
    L{listen}; any other channel (backtest jobs) goes to whoever called
    L{on} for it, like the built-in simulator.

    @ivar dead_letters: malformed messages, newest first, bounded.
    """

    _log = Logger()
    ready = True

    def __init__(self, deadletter_max: int = 1000,
                 registry: Registry = DEFAULT_REGISTRY) -> None:
        self._registry = registry
        self._receiver: Receiver | None = None
        self._handlers: dict[str, list[Callable[[bytes], object]]] = {}
        self.dead_letters: deque[tuple[str, bytes, str]] = deque(maxlen=deadletter_max)

    def listen(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def on(self, channel: str, handler: Callable[[bytes], object]) -> None:
        """Call C{handler(payload)} for each message published on C{channel}."""
        self._handlers.setdefault(channel, []).append(handler)

    def publish(self, channel: str, payload: bytes) -> Deferred[int]:
        """
        Hand C{payload} to what listens on C{channel} now; fires with how
        many did (0: nobody heard it, and it is gone, as with Redis PUBLISH).
        """
        if self._registry.by_redis_name(channel) is not None:
            if self._receiver is None:
                return succeed(0)
            self._receiver(channel, payload)
            return succeed(1)
        handlers = self._handlers.get(channel, ())
        for handler in handlers:
            try:
                handler(payload)
            except Exception:
                self._log.failure("handler for {channel} failed", channel=channel)
        return succeed(len(handlers))

    def dead_letter(self, channel: str, raw: bytes, reason: str) -> None:
        self.dead_letters.appendleft((channel, raw, reason))

    def status(self) -> dict[str, object]:
        return {"state": "embedded"}
