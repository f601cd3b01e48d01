"""
The shared history, in Redis: one stream per topic (and per user, for their
own backtests), written by every daemon on that Redis through one Lua script
so that all of them agree on each event's id, and read back by each daemon
for live delivery (its tail) and for resume.

Ids: the script gives each event C{<ms>-<seq>} from one counter for all
topics, so ids order events across topics, and a client's single
C{last_id} is a valid resume point in every topic's stream.

Duplicates stop in the script, atomically with the write:
 - pub/sub: every daemon receives every message and appends it; the
   source's key (a digest of the message and how many times this daemon saw
   those bytes recently) makes the second daemon get the first one's id;
 - streams: an entry is appended only while it is still pending in the
   consumer group, and acknowledged in the same script, so an entry handled
   twice (a crash before the ack, a reclaim) is stored once;
 - a producer C{event_id} seen on its channel within the dedupe window is
   stored once (scripts/windows.lua: bounded by time and by count).

The parts: L{layout} (key names, entry fields), L{scripts} (the Lua, run
by SHA), L{writer} (batched stores), L{tailer} (live delivery),
L{replay} (resume, the delivered pointer), L{claims} (live ticks),
L{jobs} (backtest job ownership); L{RedisHistory} puts them together.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from tickstock.connections.address import RedisAddress
from tickstock.connections.redis import RedisLink
from tickstock.domain.events import Event
from tickstock.domain.interfaces import IClaims, IComponent, IHistory
from tickstock.domain.stored import Replay
from tickstock.history import DEDUPE_WINDOW, Appended
from tickstock.history.redis.claims import Claims
from tickstock.history.redis.jobs import JobOwners
from tickstock.history.redis.replay import Replays
from tickstock.history.redis.tailer import Tail
from tickstock.history.redis.writer import Writer

__all__ = ["RedisHistory"]


@implementer(IHistory, IClaims, IComponent)
class RedisHistory(Tail):
    """
    The history in Redis: writes, replays, claims and job ownership through
    the daemon's command link (C{link}); live delivery, and so the service
    and its status, is the tail's, on a connection of its own.
    """

    def __init__(
        self, reactor: IReactorTime, address: RedisAddress, link: RedisLink,
        max_events: int, max_age: float, user_max: int, read_timeout: float = 5.0,
        store_window: float = 0.0, dedupe_window: float = DEDUPE_WINDOW,
    ) -> None:
        """
        @param dedupe_window: seconds a producer event_id is remembered on
            its channel, at least (see scripts/windows.lua).
        """
        writer = Writer(reactor, link, max_events, max_age, user_max, store_window,
                        dedupe_window, keep=self.keep, answered=self.stores_answered)
        super().__init__(reactor, address, writer, read_timeout)
        self._replays = Replays(link, int(max_age))
        self._claims = Claims(link)
        self._jobs = JobOwners(link, int(max_age))

    def append(self, event: Event, key: object = None) -> Deferred[Appended]:
        return self._stores.append(event, key)

    def claim(self, keys: list[object]) -> Deferred[list[Any]]:
        return self._claims.claim(keys)

    def replay(self, topic: str, after: str | None, user: str | None) -> Deferred[Replay]:
        """
        Waits until live delivery knows where it reads from: a replay taken
        earlier could miss what happens between it and that point.
        """
        if not self.positioned:
            return self.when_positioned().addCallback(
                lambda _: self.replay(topic, after, user))
        return self._replays.replay(topic, after, user)

    def own(self, job_id: str, user: str) -> Deferred[Any]:
        return self._jobs.own(job_id, user)

    def delivered(self, user: str, event_id: str) -> None:
        self._replays.delivered(user, event_id)
