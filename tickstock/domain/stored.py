"""
What appending an event to the history (L{tickstock.domain.interfaces.IHistory})
can come to besides an id, and where a stream entry came from: the values
the history, the sources and the router pass between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from tickstock.domain.events import Event

STORED_SUFFIX = ":stored"
"""A producer stream's hash of entries stored but not yet acknowledged, to
the ids they were stored under."""


@dataclass(frozen=True)
class Refused:
    """
    An event the history would not store: its job is unknown
    (C{unknown_job}) or has ended (C{finished_job}).
    """

    reason: str


@dataclass(frozen=True)
class Redelivered:
    """
    A stream entry delivered again (a restart, a claim) that the history
    had stored already, under C{id}: its event is not delivered again, but
    what it must become in the store is made again (writes there repeat
    safely), since the first time may not have reached it.
    """

    id: str


@dataclass(frozen=True)
class StreamEntry:
    """The delivery key of an entry read from a producer stream."""

    stream: str
    group: str
    entry_id: str
    sheddable: ClassVar[bool] = False
    """Never shed (L{tickstock.ingest.router.Router}): an entry not stored is read
    again, after the entries behind it were stored."""


@dataclass(frozen=True)
class Replay:
    """
    What a resuming subscription gets first.

    @ivar events: kept events after the resume point, oldest first.
    @ivar missed: L{None} if nothing after the resume point was dropped;
        else C{{"from": <resume id>, "to": <newest dropped id>, "count": n}}
        where C{n} is how many events of the topic were dropped after
        C{from} (at most C{BOOKMARK_EVERY} too many: history records its
        trimming in steps).
    """

    events: list[Event] = field(default_factory=list)
    missed: dict[str, Any] | None = None
