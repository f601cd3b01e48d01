"""
The current value of every latest-only key (a symbol's tick, a service's
health), kept so that a new subscription gets it first, as a snapshot,
rather than waiting for the next update: a reloaded page shows every price
at once. Every node sees every event, so every node keeps them all; one
that starts is primed with those the nodes before it shared
(L{tickstock.history.redis.current}).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from zope.interface import implementer

from tickstock.domain.events import Event, id_key
from tickstock.domain.interfaces import ILatestValues
from tickstock.domain.jobs import outcome

MAX_KEYS = 100_000
"""Keys kept at most, all topics together; past it the least recently updated go."""


@implementer(ILatestValues)
class Latest:
    """The newest event per conflation key, by topic."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._max_keys = max_keys
        self._events: OrderedDict[tuple[Any, ...], Event] = OrderedDict()
        self._by_topic: dict[str, dict[tuple[Any, ...], Event]] = {}

    def keep(self, event: Event) -> None:
        """
        Keep C{event} as its key's current value (a must-deliver event has
        none). A job's final event (its result, or failed or cancelled)
        ends the job's: a new subscription is not told a finished job runs.
        """
        key = event.latest
        if event.job_id is not None and outcome(event) is not None:
            ended = self._events.pop((event.topic, event.job_id), None)
            if ended is not None:
                del self._by_topic[ended.topic][(event.topic, event.job_id)]
            return
        if key is None:
            return
        events = self._events
        if key in events:
            events.move_to_end(key)
        elif len(events) >= self._max_keys:
            old, dropped = events.popitem(last=False)
            del self._by_topic[dropped.topic][old]
        events[key] = event
        self._by_topic.setdefault(event.topic, {})[key] = event

    def values(self) -> Iterable[Event]:
        return self._events.values()

    def prime(self, events: list[Event]) -> None:
        """
        Keep C{events}, the values another node wrote before this one
        started, where no value came live meanwhile (that one is newer); as
        the least recently updated, so they are the first to go.
        """
        kept = self._events
        for event in reversed(events):
            key = event.latest
            if key is None or key in kept or len(kept) >= self._max_keys:
                continue
            kept[key] = event
            kept.move_to_end(key, last=False)
            self._by_topic.setdefault(event.topic, {})[key] = event

    def of(self, topic: str, symbols: frozenset[str] | None = None) -> list[Event]:
        """
        The current values of C{topic}'s keys, oldest first; with C{symbols},
        of those symbols only, looked up rather than scanned (a symbol's
        ticks are keyed by it: a reconnecting crowd of 20-symbol watchlists
        costs 20 lookups each, not a pass over every symbol).
        """
        kept = self._by_topic.get(topic, {})
        if symbols is None:
            current = list(kept.values())
        else:
            current = [kept[key] for key in ((topic, symbol) for symbol in symbols)
                       if key in kept]
        return sorted(current, key=lambda e: id_key(e.id))
