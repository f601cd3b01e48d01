"""
Whether this daemon is behind: events reach its live path late, or more of
the events it stored wait for the live path than it may let wait, or most
of its clients have frames waiting though they read. Either way the daemon
(not one client) is the bottleneck, so what it does is take in less: ticks
go out less often (L{tickstock.deliver.throttle}) and a Redis source reads less
(the stream holds the rest, or Redis, for a pub/sub subscriber, up to half
its output-buffer limit: L{tickstock.ingest.pubsub}), while every client that
reads stays connected; only a client that stopped reading is closed
(L{tickstock.web.websocket}).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from tickstock.domain.events import Event, id_key
from tickstock.domain.interfaces import IReporting
from tickstock.domain.topics import TICKS

LATE_AFTER = 0.5
"""Seconds from an event's arrival to the live path past which it is late:
delivery takes milliseconds, so this is a backlog, not a slow moment."""
LATE_HOLD = 0.1
"""Seconds one late event keeps the daemon behind: it bridges the gaps
between the live path's reads of its backlog, and ends soon after the
backlog is delivered, so that a source waiting for it does not leave the
daemon idle."""


@implementer(IReporting)
class Overload:
    """
    C{overload()} is whether the daemon is behind.

    @ivar late: events that reached the live path more than L{LATE_AFTER}
        seconds after they arrived.
    """

    def __init__(self, clock: IReactorTime,
                 clients_behind: Callable[[], bool] = lambda: False,
                 most_waiting: int | None = None) -> None:
        """
        @param clients_behind: whether most clients have frames waiting
            though they read (L{tickstock.web.websocket.StreamFactory}).
        @param most_waiting: events stored (L{stored}) that may wait for the
            live path at most; L{None}: any number. The history keeps only
            so many per topic, and what the live path has not read when it
            is trimmed is missed; lateness alone comes too late for that at
            thousands of events a second (a source gulps its backlog).
        """
        self._clock = clock
        self._clients_behind = clients_behind
        self._late_until = float("-inf")
        self._most_waiting = most_waiting
        self._waiting: deque[tuple[int, int]] = deque()  # ids, in the order stored
        self.late = 0

    def stored(self, event: Event) -> None:
        """
        This process stored C{event}: it is on its way to the live path.
        Ticks are not counted: from a pub/sub source they skip the history.
        """
        if self._most_waiting is not None and event.topic != TICKS:
            self._waiting.append(id_key(event.id))

    def arrived(self, event: Event) -> None:
        """The live path took C{event}: note how long after its arrival."""
        now = self._clock.seconds()
        arrived = event.received_at or int(event.id.split("-", 1)[0]) / 1000
        if now - arrived > LATE_AFTER:
            self.late += 1
            self._late_until = now + LATE_HOLD
        waiting = self._waiting
        if waiting:
            key = id_key(event.id)
            while waiting and waiting[0] <= key:
                waiting.popleft()

    def __call__(self) -> bool:
        return (self._clock.seconds() < self._late_until
                or (self._most_waiting is not None and len(self._waiting) > self._most_waiting)
                or self._clients_behind())

    def status(self) -> dict[str, Any]:
        return {"behind": self(), "late_events": self.late}
