"""
Live ticks, at most C{rate} per second per symbol: a newer tick replaces
one still waiting for its turn, so every client gets each symbol's latest
price at most C{rate} times a second, never a stale one last. While the
daemon is behind (L{tickstock.deliver.overload}), at most once a second: ticks are
shed first, so that must-deliver events go out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from tickstock.domain.events import Event
from tickstock.domain.interfaces import IReporting

BEHIND_INTERVAL = 1.0
"""Seconds between two ticks of a symbol while the daemon is behind."""


@implementer(IReporting)
class TickThrottle:
    """
    Passes tick events to C{deliver}, conflated per symbol.

    @ivar conflated: ticks replaced by a newer one before their turn.
    """

    def __init__(self, clock: IReactorTime, rate: float,
                 deliver: Callable[[Event], object],
                 watched: Callable[[str | None], bool] = lambda symbol: True,
                 behind: Callable[[], bool] = lambda: False,
                 keep: Callable[[Event], None] = lambda event: None) -> None:
        """
        @param watched: whether any subscription may want a symbol's ticks:
            those of symbols nobody watches (most, usually) cost nothing more.
        @param behind: whether the daemon is behind; asked when a tick goes out.
        @param keep: given every tick, watched or not, as its symbol's current
            value (L{tickstock.deliver.latest.Latest.keep}).
        """
        self._clock = clock
        self._interval = 1.0 / rate
        self._behind = behind
        self._deliver = deliver
        self._watched = watched
        self._keep = keep
        self._next: dict[str | None, float] = {}
        self._waiting: dict[str | None, Event] = {}
        self.conflated = 0

    def status(self) -> dict[str, Any]:
        return {"ticks_conflated": self.conflated}

    def __call__(self, event: Event) -> None:
        self._keep(event)
        symbol = event.symbol
        if not self._watched(symbol):
            return
        if symbol in self._waiting:
            self.conflated += 1
            self._waiting[symbol] = event
            return
        now = self._clock.seconds()
        due = self._next.get(symbol, 0.0)
        if now >= due:
            self._next[symbol] = now + self._pace()
            self._deliver(event)
        else:
            self._waiting[symbol] = event
            self._clock.callLater(due - now, self._release, symbol)

    def _release(self, symbol: str | None) -> None:
        event = self._waiting.pop(symbol, None)
        if event is not None:
            self._next[symbol] = self._clock.seconds() + self._pace()
            self._deliver(event)

    def _pace(self) -> float:
        return max(self._interval, BEHIND_INTERVAL) if self._behind() else self._interval
