"""
Storing events: the ingest script (scripts/ingest.lua) called with batches
of events, one call in flight at a time, so events are stored in the order
they were appended, and no call dies behind a failed one unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from tickstock.connections.redis import RedisLink, text
from tickstock.domain.events import Event
from tickstock.domain.jobs import outcome
from tickstock.domain.stored import Redelivered, Refused, StreamEntry
from tickstock.history import BOOKMARK_EVERY, Appended
from tickstock.history.redis.layout import (
    JOB_PREFIX,
    LAST_KEY,
    PREFIX,
    SEEN_TTL,
    SINCE_KEY,
    USER_PREFIX,
    digest,
)
from tickstock.history.redis.scripts import INGEST, Script

INGEST_BATCH = BOOKMARK_EVERY
"""Events stored per script call at most: Redis runs nothing else meanwhile,
and trimming by age keeps pace (it drops up to this many per call)."""

_Pending = tuple[Event, object, Deferred[Appended]]


class Writer:
    """
    Batches appended events into ingest script calls and numbers the calls,
    so the live tail can wait for those sent before a read it took.
    """

    def __init__(
        self, reactor: IReactorTime, link: RedisLink, max_events: int, max_age: float,
        user_max: int, store_window: float, dedupe_window: float,
        keep: Callable[[str, Event], None], answered: Callable[[], None],
    ) -> None:
        """
        @param keep: called with each event stored (but a job's) and its id,
            as its call answers.
        @param answered: called once a call has answered (or failed) and
            its events were handed on.
        """
        self._reactor = reactor
        self._ingest = Script(link, INGEST)
        self._max_events = max_events
        self._max_age_ms = int(max_age * 1000)
        self._user_max = user_max
        self._user_ttl = int(max_age)
        self._store_window = store_window
        self._dedupe_window_ms = int(dedupe_window * 1000)
        self._keep = keep
        self._answered = answered
        self._flushed_at = float("-inf")
        self._pending: list[_Pending] = []
        self._flushing: IDelayedCall | None = None
        self._sent = 0
        self._open: set[int] = set()

    @property
    def sent(self) -> int:
        """How many calls were sent: the next one's number."""
        return self._sent

    def answered_before(self, call: int) -> bool:
        """True when every call numbered below C{call} has answered."""
        return not self._open or min(self._open) >= call

    def append(self, event: Event, key: object = None) -> Deferred[Appended]:
        """
        Events are stored by one script call per C{store_window} (at most
        L{INGEST_BATCH} events per call), in the order they were appended: a
        round-trip per event would cost more than everything else an event
        needs. The first event after a quiet window goes out in the same
        reactor turn; under load, those after it wait at most the window,
        and so do the tail reads their call wakes.

        One call at a time: a call sent while an earlier one may still fail
        (an error reply, such as BUSY or OOM, spares the calls behind it)
        would store its stream entries before the earlier ones, which are
        read again and stored after them. So under load a call also waits
        for the one before it to answer, and goes at once if it is full.
        """
        d: Deferred[Appended] = Deferred()
        self._pending.append((event, key, d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._flushing is not None or self._open or not self._pending:
            return
        wait = 0.0 if len(self._pending) >= INGEST_BATCH else \
            self._flushed_at + self._store_window - self._reactor.seconds()
        self._flushing = self._reactor.callLater(max(wait, 0), self._flush)

    def _flush(self) -> None:
        self._flushing = None
        self._flushed_at = self._reactor.seconds()
        batch, self._pending = self._pending[:INGEST_BATCH], self._pending[INGEST_BATCH:]
        self._store(batch)

    def _store(self, batch: list[_Pending]) -> None:
        keys = [LAST_KEY, SINCE_KEY]
        args: list[Any] = [
            self._max_events, self._max_age_ms, int(SEEN_TTL * 1000), self._dedupe_window_ms,
            self._user_max, self._user_ttl, USER_PREFIX,
        ]
        for event, key, _ in batch:
            producer_id = event.data.get("event_id")
            entry = key if isinstance(key, StreamEntry) else None
            keys += (
                PREFIX + event.topic,
                JOB_PREFIX + event.job_id if event.job_id else "",
                entry.stream if entry else "",
            )
            args += (
                event.channel, event.type, orjson.dumps(event.data),
                entry.group if entry else "", entry.entry_id if entry else "",
                (outcome(event) or "") if event.job_id else "",
                digest(producer_id) if producer_id else "",
                digest(key) if isinstance(key, str) else "",
            )

        call = self._sent
        self._sent += 1
        self._open.add(call)

        def stored(reply: list[Any]) -> None:
            self._open.discard(call)
            if len(self._pending) >= INGEST_BATCH:
                self._flush()  # Redis runs the next call while these are handed on
            for i, (event, key, d) in enumerate(batch):
                value = text(reply[2 * i + 1])
                if int(reply[2 * i]) == 1:
                    event.id = value
                    if event.job_id is None:  # a job's event gets its owner in Redis
                        self._keep(value, event)
                    d.callback(value)
                elif value.startswith("!"):
                    d.callback(Refused(value[1:]))
                elif value and isinstance(key, StreamEntry):
                    event.id = value
                    d.callback(Redelivered(value))
                else:
                    d.callback(None)
            self._answered()
            self._schedule()

        def failed(failure: Any) -> None:
            self._open.discard(call)
            # Stream entries waiting behind it fail too: they are read again
            # after this call's own, and stored now they would come first.
            behind = [item for item in self._pending if isinstance(item[1], StreamEntry)]
            if behind:
                self._pending = [item for item in self._pending
                                 if not isinstance(item[1], StreamEntry)]
            for _, _, d in batch + behind:
                d.errback(failure)
            self._answered()
            self._schedule()

        self._ingest.run(keys, args).addCallbacks(stored, failed)
