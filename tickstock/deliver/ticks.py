"""
Live ticks from a pub/sub source, past the history.

Every daemon receives every pub/sub message, so each can deliver a tick to
its own clients the moment it arrives: storing ticks in the shared history
and reading them back (what must-deliver events do, to agree on ids and
order) cost most of a tick's time, in the daemon and in Redis, for an event
that the next tick of its symbol supersedes. What ticks still need from the
other daemons is only the answer to "who counts this one in the bars": one
C{SET NX} per tick, batched per reactor turn (L{IClaims}).

A tick's id sorts after the newest stored event delivered before it and
before any stored later (L{tickstock.domain.events.TickIds}), so a client's last
id stays a valid resume point. A resuming subscription gets the newest tick
of each of its symbols this daemon has seen, if newer than its last id.

In streams mode each entry reaches one daemon, so ticks take the history's
path there, as every other event does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from tickstock.domain.events import Event, TickIds, id_key
from tickstock.domain.interfaces import IClaims, IHistory

CLAIM_BATCH = 1000
"""Ticks claimed per script call at most (Redis runs nothing else meanwhile)."""
LATEST_KEPT = 100_000
"""Symbols whose newest tick is kept for resuming clients, at most."""

Done = Callable[[Event, bool | Failure], object]
"""Told, once per tick, whether this daemon counts it (True), another one
does (False), or nobody could tell (a Failure: Redis did not answer)."""


class LiveTicks:
    """
    Delivers each tick at once through C{live} (the per-symbol throttle)
    and finds out, through C{claims}, whether this daemon is the one that
    counts it.

    @param claims: L{None} when this process is the only one (the embedded
        bus): every tick is its own.
    """

    def __init__(self, clock: IReactorTime, history: IHistory,
                 live: Callable[[Event], object], claims: IClaims | None) -> None:
        self._clock = clock
        self._history = history
        self._live = live
        self._claims = claims
        self._ids = TickIds()
        self._latest: OrderedDict[str | None, Event] = OrderedDict()
        self._pending: list[tuple[object, Event, Done]] = []
        self._flushing: IDelayedCall | None = None

    def __call__(self, event: Event, key: object, done: Done) -> None:
        event.id = self._ids.next(self._history.position, self._clock.seconds())
        latest = self._latest
        if event.symbol not in latest and len(latest) >= LATEST_KEPT:
            latest.popitem(last=False)
        latest[event.symbol] = event
        self._live(event)
        if self._claims is None or key is None:
            done(event, True)
            return
        self._pending.append((key, event, done))
        if self._flushing is None:
            self._flushing = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushing = None
        pending, self._pending = self._pending, []
        assert self._claims is not None
        for start in range(0, len(pending), CLAIM_BATCH):
            batch = pending[start:start + CLAIM_BATCH]
            self._claims.claim([key for key, _, _ in batch]).addCallbacks(
                self._claimed, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    @staticmethod
    def _claimed(reply: list[Any], batch: list[tuple[object, Event, Done]]) -> None:
        for (_, event, done), mine in zip(batch, reply, strict=True):
            done(event, bool(int(mine)))

    @staticmethod
    def _failed(failure: Failure, batch: list[tuple[object, Event, Done]]) -> None:
        for _, event, done in batch:
            done(event, failure)

    def replay(self, after: str, symbols: frozenset[str] | None) -> list[Event]:
        """
        The newest tick of each symbol (of C{symbols}) with an id after
        C{after}, oldest first.
        """
        last = id_key(after)
        if symbols is None:
            ticks = list(self._latest.values())
        else:
            ticks = [tick for tick in map(self._latest.get, symbols) if tick is not None]
        ticks = [tick for tick in ticks if id_key(tick.id) > last]
        ticks.sort(key=lambda tick: id_key(tick.id))
        return ticks
