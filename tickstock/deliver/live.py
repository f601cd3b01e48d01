"""
The live delivery path: where each event goes once it is stored. Kept out
of the wiring (L{tickstock.tap}) so the decisions the delivery path makes
per event are in one place, tested without a daemon:

  - L{HandOff}: an event this process stored goes to the store (bars, the
    event history, or its job's record); the overload meter counts it.
  - L{LiveDelivery}: an event the history hands out, in id order, goes to
    the tick throttle, or to the universes and the broadcaster; a targeted
    one moves its user's delivered pointer; a gap in the history's tail
    tells the clients of that topic they missed live events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tickstock.deliver.broadcast import Broadcaster
from tickstock.deliver.overload import Overload
from tickstock.deliver.throttle import TickThrottle
from tickstock.deliver.universes import MEMBERSHIP_CHANNELS, UPDATED_CHANNEL, Universes
from tickstock.domain.events import Event
from tickstock.domain.interfaces import ICache, IClient, IHistory
from tickstock.domain.topics import BACKTESTS, STORED_TOPICS, TICKS, UNIVERSE, Registry

Deliver = Callable[[Event], None]


class Batcher(Protocol):
    """What stored events are handed to (L{tickstock.store.persist.Persister})."""

    def add_tick(self, event: Event) -> None: ...

    def add_event(self, event: Event) -> None: ...


class HandOff:
    """
    Called with each event this process stored (the router's C{stored}):
    ticks become bars, stored topics and backtest events are written, unless
    their channel says it is not stored.
    """

    def __init__(self, overload: Overload, persister: Batcher, registry: Registry) -> None:
        self._overload = overload
        self._persister = persister
        self._registry = registry

    def __call__(self, event: Event) -> None:
        self._overload.stored(event)
        if event.topic == TICKS:
            self._persister.add_tick(event)
        elif event.topic in STORED_TOPICS or event.topic == BACKTESTS:
            channel = self._registry.get(event.channel)
            if channel is None or channel.stored:
                self._persister.add_event(event)


class LiveDelivery:
    """
    Routes the history's events, in id order, to the clients.

    @param hold_final: wraps a deliver function so that a job's final event
        waits for its record to be final (L{tickstock.jobs.backtests.Jobs.record_first}).
    @param observed: called with each event that reached a client (the
        delivery latency histogram).
    @param keep_universe: with the embedded store, C{keep_universe(key,
        symbols)} keeps a universe event's own symbol list as the universe
        (no producer writes C{cache_entries} there; the store checks the
        symbols, raising L{ValueError}); L{None} otherwise.
    @param missed_live: tells one client it missed live events (the gateway).
    @param keep: given each latest-only event but a tick (the throttle keeps
        those), as its key's current value, and each job's event (a final one
        ends the job's).
    """

    def __init__(self, overload: Overload, ticks: TickThrottle, broadcaster: Broadcaster,
                 universes: Universes, cache: ICache, history: IHistory,
                 hold_final: Callable[[Deliver], Deliver], observed: Deliver,
                 missed_live: Callable[[IClient], None],
                 keep_universe: Callable[[str, list[Any]], None] | None = None,
                 keep: Deliver = lambda event: None) -> None:
        self._overload = overload
        self._ticks = ticks
        self._broadcaster = broadcaster
        self._universes = universes
        self._cache = cache
        self._history = history
        self._observed = observed
        self._missed_live = missed_live
        self._keep_universe = keep_universe
        self._keep = keep
        self._targeted = hold_final(self.deliver)

    def __call__(self, event: Event) -> None:
        """One event of the history's tail (L{IHistory.listen})."""
        self._overload.arrived(event)
        if event.topic == TICKS:
            self._ticks(event)
            return
        if event.topic == UNIVERSE:
            self._universe_changed(event)
        if event.latest is not None or event.job_id is not None:
            self._keep(event)
        if event.user is not None:
            self._targeted(event)
        else:
            self.deliver(event)

    def deliver(self, event: Event) -> None:
        if self._broadcaster.deliver(event):
            self._observed(event)
            if event.user is not None:
                self._history.delivered(event.user, event.id)

    def gap(self, topic: str) -> None:
        """The history's tail skipped events of C{topic}: its clients are told."""
        for client in self._broadcaster.clients_of(topic):
            self._missed_live(client)

    def _universe_changed(self, event: Event) -> None:
        if event.channel in MEMBERSHIP_CHANNELS:
            self._cache.invalidate()
        if self._keep_universe is not None and event.channel == UPDATED_CHANNEL:
            key, symbols = event.data.get("universe"), event.data.get("symbols")
            if isinstance(key, str) and isinstance(symbols, list):
                try:
                    self._keep_universe(key, symbols)
                except ValueError:
                    pass
        self._universes.changed(event)
