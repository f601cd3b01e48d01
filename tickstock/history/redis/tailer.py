"""
Live delivery: a blocking C{XREAD} of every topic's stream on a connection
of its own (docs/internals.md §5: a blocking read must not share a
connection), resumed from the last id it delivered after any reconnect, so
a Redis blip delays live events but loses none. Each read also asks for
the drop marks trimming left after where it started (scripts/marks.lua),
so a tail that fell further behind than the history keeps tells its
subscribers to resume.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from tickstock.connections.address import RedisAddress
from tickstock.connections.redis import LinkProtocol, NotConnected, RedisConnection, text
from tickstock.domain.events import Event, id_key
from tickstock.domain.topics import TOPIC_NAMES
from tickstock.history.redis.layout import LAST_KEY, PREFIX
from tickstock.history.redis.layout import entry_event as _entry_event
from tickstock.history.redis.scripts import MARKS, MARKS_SHA
from tickstock.history.redis.writer import Writer

TAIL_BLOCK_MS = 1000
TAIL_COUNT = 1000
TAIL_CHUNK = 64
TAIL_CHUNK_BYTES = 64 * 1024
"""At most this many events, or bytes of their messages, are delivered per
reactor turn (about what a socket reads per turn): between chunks sockets
get written and read, so a burst read in one XREAD does not make healthy
clients look slow."""
STORED_KEPT = 10_000
"""Events this daemon stored, kept until its tail reads them back, at most:
the tail then delivers the event it already has instead of decoding the
entry again (a third of a tick's cost). Past the bound, the oldest go, and
are decoded as any other daemon's event is."""


class Tail(Service):
    """
    Tails every topic's stream and hands each event, in id order across
    topics, to the receivers of L{listen}.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorTime, address: RedisAddress, stores: Writer,
                 read_timeout: float = 5.0) -> None:
        """
        @param stores: the writer whose calls a read waits for (see
            L{_take_after_stores}); it hands this tail what it stored
            (L{keep}) and tells it when a call answered (L{stores_answered}).
        """
        self._reactor = reactor
        self._address = address
        self._redis = RedisConnection(reactor, address, self._new_factory, "redis history")
        self._stores = stores
        self._read_timeout = read_timeout
        self._receivers: list[Callable[[Event], object]] = []
        self._keys = [PREFIX + topic for topic in TOPIC_NAMES]
        self._positions: dict[str, str] | None = None
        self._positioned: list[Deferred[None]] = []
        self._gap_listeners: list[Callable[[str], object]] = []
        self.tail_gaps = 0
        self._held: list[Event] = []
        self._ready: deque[Event] = deque()
        # Ordered: dropping the oldest of a dict that many were popped from
        # scans their leftover slots (O(n) each time it is full).
        self._stored: OrderedDict[str, Event] = OrderedDict()
        self._unread: tuple[int, list[Any] | None] | None = None
        self._reading: IDelayedCall | None = None
        self.tail_reads = 0
        self.tail_errors = 0
        self.position = "0-0"

    def _new_factory(self) -> txredisapi.RedisFactory:
        a = self._address
        factory = txredisapi.RedisFactory(
            None, a.db, poolsize=1, isLazy=True, password=a.password, username=a.username,
            replyTimeout=self._read_timeout, convertNumbers=False, charset=None,
        )
        factory.protocol = LinkProtocol
        factory.scripts = [MARKS]
        return factory

    def listen(self, receiver: Callable[[Event], object]) -> None:
        self._receivers.append(receiver)

    def on_gap(self, listener: Callable[[str], object]) -> None:
        """Call C{listener(topic)} when live delivery of C{topic} skipped events."""
        self._gap_listeners.append(listener)

    def keep(self, event_id: str, event: Event) -> None:
        """This daemon stored C{event}: hand it on as it is when read back."""
        kept = self._stored
        if len(kept) >= STORED_KEPT:
            kept.popitem(last=False)
        kept[event_id] = event

    @property
    def positioned(self) -> bool:
        """True once the tail knows where it reads from."""
        return self._positions is not None

    def when_positioned(self) -> Deferred[None]:
        """
        Fires once L{positioned}: a replay taken earlier could miss what
        happens between it and where live delivery starts.
        """
        waiter: Deferred[None] = Deferred()
        self._positioned.append(waiter)
        return waiter

    @property
    def ready(self) -> bool:
        """True once the tail knows where it reads from and is connected."""
        return self._positions is not None and self._redis.state == "connected"

    def status(self) -> dict[str, Any]:
        return {"state": "tailing" if self.ready else "connecting",
                "reads": self.tail_reads, "errors": self.tail_errors, "gaps": self.tail_gaps,
                "held": len(self._held)}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._redis.start()
        self._schedule(0)

    def stopService(self) -> Deferred[Any]:
        if self._reading is not None and self._reading.active():
            self._reading.cancel()
        self._reading = None
        self._unread = None
        super().stopService()  # type: ignore[no-untyped-call]
        return self._redis.stop()

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._reading = self._reactor.callLater(delay, self._read)

    def _read(self) -> None:
        self._reading = None
        try:
            conn = self._redis.connection()
        except NotConnected:
            self._schedule(0.05)
            return
        if self._positions is None:
            d = conn.execute_command("GET", LAST_KEY)
            d.addCallback(self._start_at)
        else:
            block = () if self._held else ("BLOCK", TAIL_BLOCK_MS)
            ids = [self._positions[key] for key in self._keys]
            read = conn.execute_command("XREAD", "COUNT", TAIL_COUNT, *block, "STREAMS",
                                        *self._keys, *ids, apply_timeout=False)
            # Pipelined behind the read, so it runs as soon as the read
            # returns: the newest id trimming dropped from each stream after ours.
            marks = conn.execute_command("EVALSHA", MARKS_SHA, len(self._keys),
                                         *(key + ":drops" for key in self._keys), *ids,
                                         apply_timeout=False)
            d = gatherResults([read, marks], consumeErrors=True)
            watchdog = self._reactor.callLater(
                TAIL_BLOCK_MS / 1000 + self._read_timeout, self._hung, conn)
            d.addBoth(self._cancel, watchdog)
            d.addCallback(self._check_gaps)
            d.addCallbacks(self._take_after_stores, self._read_failed)
            return
        d.addCallbacks(lambda _: self._drain(), self._read_failed)

    def _take_after_stores(self, reply: list[Any] | None) -> None:
        """
        Take the read once every store call sent before it came back has
        answered. The script that woke the read answers on another
        connection, and Redis writes the read's reply first: taken at once,
        this daemon's own events would be decoded again rather than handed
        on as they are (a third of a tick's cost).
        """
        stores = self._stores
        if not stores.answered_before(stores.sent):
            self._unread = (stores.sent, reply)
        else:
            self._take(reply)

    def stores_answered(self) -> None:
        """A store call answered: take the read that waited for it, if any."""
        unread = self._unread
        if unread is not None and self.running and self._stores.answered_before(unread[0]):
            self._unread = None
            self._take(unread[1])

    def _take(self, reply: list[Any] | None) -> None:
        try:
            self._batch(reply)
        except Exception:
            self._read_failed(Failure())
            return
        self._drain()

    def _check_gaps(self, replies: list[Any]) -> list[Any] | None:
        """
        Notice entries trimmed before this tail read them (it fell further
        behind than the history keeps, e.g. while its connection was down):
        a drop mark newer than where the read started and older than the
        first entry it returned means live subscribers missed events.
        """
        reply: list[Any] | None
        reply, marks = replies
        first = {text(key): text(entries[0][0]) for key, entries in reply or () if entries}
        for key, mark in zip(self._keys, marks, strict=True):
            if not mark:
                continue
            dropped = id_key(text(mark))
            if key not in first or dropped < id_key(first[key]):
                self.tail_gaps += 1
                self._log.warn("redis history: live delivery of {key} fell behind its "
                               "trimming; its subscribers are told to resume", key=key)
                for listener in self._gap_listeners:
                    listener(key[len(PREFIX):])
        return reply

    def _start_at(self, last: bytes | None) -> None:
        start = "0-0" if last is None else text(last)
        self._positions = {key: start for key in self._keys}
        self.position = start
        waiters, self._positioned = self._positioned, []
        for waiter in waiters:
            waiter.callback(None)

    @staticmethod
    def _cancel(result: Any, watchdog: IDelayedCall) -> Any:
        if watchdog.active():
            watchdog.cancel()
        return result

    def _hung(self, conn: Any) -> None:
        self._log.warn("redis history: no reply to XREAD in time; reconnecting")
        self._redis.abort(conn)

    def _read_failed(self, failure: Any) -> None:
        self.tail_errors += 1
        message = failure.getErrorMessage()
        if self.running:
            self._log.warn("redis history: reading failed ({e}); retrying", e=message)
        if "NOSCRIPT" in message:
            # Redis's script cache was flushed: a new connection loads it.
            self._redis.drop()
        self._schedule(0.1)

    def _batch(self, reply: list[Any] | None) -> None:
        """
        Deliver what XREAD returned, in id order across topics. A stream cut
        short by COUNT may hold older entries than other streams' newest, so
        events past the oldest cut are held for the next read.
        """
        self.tail_reads += 1
        assert self._positions is not None
        events, self._held = self._held, []
        kept = self._stored
        merge = bool(events)
        cut: tuple[int, int] | None = None
        for key, entries in reply or ():
            key = text(key)
            if not entries:
                continue
            if events:
                merge = True
            self._positions[key] = text(entries[-1][0])
            topic = key[len(PREFIX):]
            for entry in entries:
                event = kept.pop(text(entry[0]), None)
                events.append(_entry_event(entry, topic) if event is None else event)
            if len(entries) >= TAIL_COUNT:
                last = id_key(self._positions[key])
                cut = last if cut is None else min(cut, last)
        if merge:  # one stream's entries are in order already
            events.sort(key=lambda e: id_key(e.id))
        if cut is None:
            self._ready.extend(events)
            return
        for event in events:
            if id_key(event.id) > cut:
                self._held.append(event)
            else:
                self._ready.append(event)

    def _drain(self) -> None:
        """Deliver the events read, L{TAIL_CHUNK} per reactor turn, then read on."""
        self._reading = None
        ready = self._ready
        budget = TAIL_CHUNK_BYTES
        for _ in range(min(TAIL_CHUNK, len(ready))):
            if budget <= 0:
                break
            event = ready.popleft()
            budget -= event.size
            self.position = event.id
            for receiver in self._receivers:
                try:
                    receiver(event)
                except Exception:
                    self._log.failure("delivering event {id} failed", id=event.id)
        if ready:
            if self.running:
                self._reading = self._reactor.callLater(0, self._drain)
        else:
            self._schedule(0)
