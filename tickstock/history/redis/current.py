"""
The current value of every latest-only key (a symbol's newest tick, a
service's newest health event), shared by the nodes in Redis, so that a
node that starts knows them before the next update comes: a page reloaded
onto a node that has just (re)started still shows every price at once,
even a rarely traded symbol's. Each node keeps its own in memory
(L{tickstock.deliver.latest.Latest}); this store fills it at start.

Once per L{FLUSH} seconds each node writes the values that changed in its
own since: nothing is done per event, and every node writes what it saw
(a value Redis has already is written again by each node that has it, a
few hundred bytes a key a second). Of two values of one key, the one
received later stays.
"""

from __future__ import annotations

from typing import Any

import orjson
import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.connections.redis import RedisLink, text
from tickstock.domain.events import Event, id_key, stored_event
from tickstock.domain.interfaces import IComponent, ICurrentValues, ILatestValues
from tickstock.history.redis.scripts import CURRENT, Script

CURRENT_KEY = "tickstock:current"
"""A hash: each latest-only key (its JSON) to its newest event."""
ORDER_KEY = CURRENT_KEY + ":order"
"""A sorted set of the same keys by when their value was received (ms)."""
FLUSH = 1.0
"""Seconds between two writes of the values that changed meanwhile."""
BATCH = 1000
"""Values per script call, and per HSCAN page when loading."""
RETRY = 0.5
"""Seconds before loading again while Redis cannot be reached."""


def encode(event: Event) -> tuple[bytes, bytes]:
    """The hash field and value that keep C{event} as its key's current value."""
    assert event.latest is not None
    return (orjson.dumps(list(event.latest)),
            orjson.dumps([event.id, event.channel, event.type, event.topic, event.data]))


def decode(field: bytes, value: bytes) -> Event:
    """
    The event a hash entry keeps; its key is the field's (the channel it
    came on may be one only this deployment configures).
    """
    event_id, channel, event_type, topic, data = orjson.loads(value)
    key = tuple(orjson.loads(field))
    if not key or key[0] != topic or not all(isinstance(part, str | int | float | None)
                                             for part in key):
        raise ValueError(f"not a key of {topic!r}: {field!r}")
    event = stored_event(event_id, channel, event_type, orjson.dumps(data), None, topic)
    event.latest = key
    return event


@implementer(ICurrentValues, IComponent)
class CurrentValues(Service):
    """
    Loads the values into C{latest} once, at start, and is ready once it
    has (a client the node accepts gets them); then writes what changed in
    C{latest} once per L{FLUSH} seconds.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, link: RedisLink, max_keys: int) -> None:
        """@param max_keys: values kept at most; past it the least recently updated go."""
        self._clock = clock
        self._link = link
        self._script = Script(link, CURRENT)
        self._max_keys = max_keys
        self._written: dict[tuple[Any, ...], Event] = {}
        self._writer = LoopingCall(self._flush)
        self._writer.clock = clock
        self._retry: IDelayedCall | None = None
        self.latest: ILatestValues | None = None
        self.loaded: int | None = None
        self.written = 0
        self.write_failures = 0
        self.unreadable = 0

    @property
    def ready(self) -> bool:
        return self.loaded is not None

    def status(self) -> dict[str, Any]:
        return {"state": "loading" if self.loaded is None else "loaded",
                "loaded": self.loaded, "written": self.written,
                "write_failures": self.write_failures, "unreadable": self.unreadable}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._load(b"0", {})
        self._writer.start(FLUSH, now=False)

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._writer.running:
            self._writer.stop()
        return self._flush()  # what changed last, if Redis is still there

    def _flush(self) -> Deferred[Any]:
        """Write the values that are not those written last (a job's progress is not shared)."""
        if self.latest is None or self.loaded is None:
            return succeed(None)
        before, now = self._written, {}
        changed = []
        for event in self.latest.values():
            if event.job_id is None and event.latest is not None:
                now[event.latest] = event
                if before.get(event.latest) is not event:
                    changed.append(event)
        self._written = now
        writes = []
        for start in range(0, len(changed), BATCH):
            batch = changed[start:start + BATCH]
            args: list[Any] = [self._max_keys]
            for event in batch:
                args += (*encode(event), int(event.received_at * 1000))
            d = self._script.run([CURRENT_KEY, ORDER_KEY], args)
            writes.append(d.addCallbacks(self._wrote, self._not_written, errbackArgs=(batch,)))
        return gatherResults(writes)

    def _wrote(self, written: Any) -> None:
        self.written += int(written)

    def _not_written(self, failure: Failure, batch: list[Event]) -> None:
        """Written again next time, unless a newer value replaced it meanwhile."""
        self.write_failures += 1
        if str(self.write_failures).strip("0") == "1":  # the 1st, 10th, 100th...
            self._log.warn("current values: writing failed ({n} times so far): {e}",
                           n=self.write_failures, e=failure.getErrorMessage())
        for event in batch:
            key = event.latest
            if key is not None and self._written.get(key) is event:
                del self._written[key]

    def _load(self, cursor: bytes, found: dict[bytes, bytes]) -> None:
        self._retry = None
        d = self._link.execute("HSCAN", CURRENT_KEY, cursor, "COUNT", BATCH)
        d.addCallbacks(self._page, self._not_loaded, callbackArgs=(found,))

    def _page(self, reply: list[Any], found: dict[bytes, bytes]) -> None:
        cursor, flat = reply
        found.update(zip(flat[::2], flat[1::2], strict=True))
        if text(cursor) != "0":
            self._load(cursor, found)
            return
        events = []
        for field, value in found.items():
            try:
                events.append(decode(field, value))
            except (ValueError, TypeError, KeyError):  # not written by this code
                self.unreadable += 1
        events.sort(key=lambda event: id_key(event.id))
        self.loaded = len(events)
        self._written = {key: event for event in events  # Redis has them
                         if (key := event.latest) is not None}
        if self.latest is not None:
            self.latest.prime(events)

    def _not_loaded(self, failure: Failure) -> None:
        if failure.check(txredisapi.ResponseError):  # the key is not ours to read: none
            self._log.warn("current values: not loaded ({e})", e=failure.getErrorMessage())
            self.loaded = 0
        elif self.running:  # Redis is not there yet: it may be soon
            self._retry = self._clock.callLater(RETRY, self._load, b"0", {})
