"""
Deep catch-up: a client resuming after a gap older than the Redis history
(back from a weekend) gets the events it missed from the store's C{events}
table, in order, read in pages, before the history's own replay.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from tickstock.domain.events import Event, id_before
from tickstock.domain.interfaces import IStore
from tickstock.domain.stored import Replay
from tickstock.domain.topics import STORED_TOPICS

PAGE = 1000


def deepen(replay: Replay, store: IStore | None, topic: str, after: str | None,
           symbols: Iterable[str] | None, limit: int) -> Deferred[Replay]:
    """
    C{replay} with what the history dropped (C{replay.missed}) filled in
    from the store, at most C{limit} events. The gap counts as recovered
    when the store returned every event after C{after} up to the newest one
    the history dropped, and holds that event itself (it was written).
    """
    missed = replay.missed
    if (missed is None or store is None or after is None or topic not in STORED_TOPICS
            or not limit or not missed.get("to")):
        return succeed(replay)
    until = missed["to"]
    wanted = None if symbols is None else sorted(symbols)
    older: list[Event] = []

    def page(start: str) -> Deferred[Replay]:
        want = min(PAGE, limit - len(older))
        return store.events_after(topic, start, until, wanted, want).addCallback(got, want)

    def got(events: list[Event], want: int) -> Any:
        older.extend(events)
        if len(events) == want:
            if len(older) < limit:
                return page(events[-1].id)
            return Replay(older + replay.events, {
                "from": older[-1].id, "to": until, "count": None,
                "reason": "catch-up limit: read older events from /api/patterns"})
        # Everything the filter wants is here, if the store has the newest dropped event.
        return store.events_after(topic, id_before(until), until, None, 1).addCallback(
            lambda last: Replay(older + replay.events, None if last else missed))

    def unavailable(failure: Any) -> Replay:
        return Replay(replay.events, {**missed, "reason": "history store unavailable"})

    return page(after).addErrback(unavailable)
