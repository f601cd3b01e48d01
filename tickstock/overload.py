"""
Whether this daemon is behind: events reach its live path late, or most of
its clients have frames waiting though they read. Either way the daemon
(not one client) is the bottleneck, so what it does is take in less: ticks
go out less often (L{tickstock.throttle}) and a streams source reads less
(the stream holds the rest), while every client that reads stays
connected; only a client that stopped reading is closed
(L{tickstock.web.stream}).
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

from tickstock.events import Event

LATE_AFTER = 0.5
"""Seconds from an event's arrival to the live path past which it is late:
delivery takes milliseconds, so this is a backlog, not a slow moment."""
LATE_HOLD = 0.1
"""Seconds one late event keeps the daemon behind: it bridges the gaps
between the live path's reads of its backlog, and ends soon after the
backlog is delivered, so that a source waiting for it does not leave the
daemon idle."""


class Overload:
    """
    C{overload()} is whether the daemon is behind.

    @ivar late: events that reached the live path more than L{LATE_AFTER}
        seconds after they arrived.
    """

    def __init__(self, clock: IReactorTime,
                 clients_behind: Callable[[], bool] = lambda: False) -> None:
        """
        @param clients_behind: whether most clients have frames waiting
            though they read (L{tickstock.web.stream.StreamFactory}).
        """
        self._clock = clock
        self._clients_behind = clients_behind
        self._late_until = float("-inf")
        self.late = 0

    def arrived(self, event: Event) -> None:
        """The live path took C{event}: note how long after its arrival."""
        now = self._clock.seconds()
        arrived = event.received_at or int(event.id.split("-", 1)[0]) / 1000
        if now - arrived > LATE_AFTER:
            self.late += 1
            self._late_until = now + LATE_HOLD

    def __call__(self) -> bool:
        return self._clock.seconds() < self._late_until or self._clients_behind()
