"""The embedded event store: recent events per topic, in memory, bounded."""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from tickstock.events import TOPICS, Event
from tickstock.interfaces import IEventStore


@implementer(IEventStore)
class MemoryStore:
    """
    Keeps the newest C{limit} events of each topic, so the demo has history
    with no database. Lost on restart, by design.
    """

    def __init__(self, limit: int) -> None:
        self._events: dict[str, deque[Event]] = {t: deque(maxlen=limit) for t in TOPICS}

    def deliver(self, event: Event) -> None:
        self._events[event.topic].append(event)

    def recent(self, topic: str, limit: int) -> Deferred[list[Event]]:
        events = self._events[topic]
        return succeed(list(events)[-limit:] if limit > 0 else [])
