"""
Event history: where events get their ids, where duplicates stop, what live
delivery follows, and what a reconnecting client is replayed from. The
embedded L{memory} history serves one process; L{redis} is shared by every
daemon on one Redis, so a client can resume on any of them.
"""

from __future__ import annotations

from typing import Any

from tickstock.domain.events import id_key
from tickstock.domain.stored import Redelivered, Refused

BOOKMARK_EVERY = 100
"""Trimming is recorded about once per this many dropped events (Redis
trims whole stream nodes of 100 entries): the precision of a gap's count."""
DEDUPE_WINDOW = 600.0
"""Seconds a producer event_id is remembered on its channel, at least (the
default of C{--dedupe-window}): a producer retries within seconds, and
within minutes after a restart or a Redis failover; ten minutes cover both
and cost about 60 bytes per event_id for that long."""
DEDUPE_MAX = 1_000_000
"""Producer event_ids remembered per channel, at least: with the
C{--dedupe-window} it bounds what remembering them holds (in Redis, about
60 bytes each, at most twice this many per channel), whatever the rate."""

Appended = str | Refused | Redelivered | None
"""What appending an event comes to (L{tickstock.domain.interfaces.IHistory.append})."""


def missed(after: str, last_dropped: str | None, dropped_total: int,
           dropped_through_after: int) -> dict[str, Any] | None:
    """
    The gap a client resuming after C{after} fell into, if any.

    @param last_dropped: the newest id ever trimmed from this history.
    @param dropped_total: how many events were ever trimmed from it.
    @param dropped_through_after: how many of those had ids up to
        C{after}, as far as the bookmarks tell (a lower bound).
    """
    if last_dropped is None or id_key(last_dropped) <= id_key(after):
        return None
    return {"from": after, "to": last_dropped,
            "count": max(1, dropped_total - dropped_through_after)}
