"""
Streams mode: read the producer's streams (one per channel) with a consumer
group, one consumer per daemon, and acknowledge an entry only once
everything it must become is durable: in the Redis history, and in the
store or the store's spool (L{tickstock.store.persist}). Until then it stays
pending, and a daemon killed meanwhile reads it again on start; the history
knows it as the event it already stored (L{Redelivered}), so it is not
delivered twice, while what it must become in the store is made again.
Entries are acknowledged by generation of the persister, all of one
generation in one script call, so bar parts and acknowledgements line up.

docs/internals.md §5, §6 honoured here: the blocking XREADGROUP runs on a connection of its
own without a reply timeout (a watchdog replaces it); NOGROUP after a Redis
restart without persistence recreates the groups from C{0}; what this
consumer read but did not acknowledge before a crash is read again first on
start-up, and entries a dead peer left pending are claimed (XAUTOCLAIM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, FirstError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.connections.address import RedisAddress
from tickstock.connections.redis import NotConnected, RedisConnection, RedisProtocol, text
from tickstock.domain.events import id_key
from tickstock.domain.interfaces import IEventSource
from tickstock.domain.stored import STORED_SUFFIX, StreamEntry
from tickstock.domain.topics import DEFAULT_REGISTRY

GROUP = "tickstock"
BLOCK_MS = 1000
COUNT = 500
CLAIM_INTERVAL = 10.0
CLAIM_MIN_IDLE_MS = 30_000
STOP_GRACE = 5.0
MAX_UNACKED = 100_000
"""Entries read and waiting to become durable past which no more are read:
the stream holds the rest while the store is slow."""

ACK = """
-- KEYS: producer streams   ARGV: group, then per stream: how many entry
-- ids, the ids. Acknowledges them and forgets what they were stored as.
local group, at = ARGV[1], 2
for _, stream in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  for i = at + 1, at + n, 500 do  -- unpack has a stack limit
    local last = math.min(i + 499, at + n)
    redis.call('XACK', stream, group, unpack(ARGV, i, last))
    redis.call('HDEL', stream .. '%(stored)s', unpack(ARGV, i, last))
  end
  at = at + n + 1
end
return 1
""".replace("%(stored)s", STORED_SUFFIX)

Receiver = Callable[[str, bytes, object], Deferred[Any]]


def _first_error(failure: Failure) -> Failure:
    """What failed first in a L{DeferredList} that fires on one errback."""
    error = failure.value
    assert isinstance(error, FirstError)
    return error.subFailure


@implementer(IEventSource)
class RedisStreamSource(Service):
    """
    Reads every producer stream as consumer C{consumer} of group
    L{GROUP}, hands each entry to the receiver in order, and acknowledges
    the batch once every entry of it was handled.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorTime, address: RedisAddress, consumer: str,
                 read_timeout: float = 5.0, extra_streams: tuple[str, ...] = (),
                 streams: tuple[str, ...] = DEFAULT_REGISTRY.names,
                 durability: Any = None) -> None:
        """
        @param streams: the producer's streams (the registry's exact names:
            a stream cannot be read by pattern).
        @param extra_streams: this daemon's own (the canary's).
        @param durability: the persister (its C{generation} and
            C{when_durable}), also settable later as C{durability}; L{None}:
            an entry is acknowledged once handled.
        """
        self.durability = durability
        self.behind: Callable[[], bool] = lambda: False
        """Whether the daemon is behind its clients (L{tickstock.deliver.overload}):
        then it reads no more until it caught up; the stream holds the rest."""
        self._added = 0
        self._awaiting: set[tuple[str, str]] = set()
        self._cursors: dict[str, str] = {}
        self._reactor = reactor
        self._address = address
        self._redis = RedisConnection(reactor, address, self._new_factory, "redis streams")
        self._consumer = consumer
        self._read_timeout = read_timeout
        self._streams = [*streams, *extra_streams]
        self._receiver: Receiver | None = None
        self._next: IDelayedCall | None = None
        self._busy: Deferred[Any] | None = None
        self._groups_ready = False
        self._backlog = True  # read our own pending entries before new ones
        self._last_claim = float("-inf")
        self.state = "connecting"
        self.read = 0
        self.acked = 0
        self.claimed = 0
        self.groups_created = 0
        self.errors = 0
        self.last_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == "reading"

    def listen(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state, "address": str(self._address), "group": GROUP,
            "consumer": self._consumer, "read": self.read, "acked": self.acked,
            "claimed": self.claimed, "unacked": len(self._awaiting),
            "groups_created": self.groups_created,
            "errors": self.errors, "last_error": self.last_error,
        }

    def _new_factory(self) -> txredisapi.RedisFactory:
        a = self._address
        factory = txredisapi.RedisFactory(
            None, a.db, poolsize=1, isLazy=True, password=a.password, username=a.username,
            replyTimeout=self._read_timeout, convertNumbers=False, charset=None,
        )
        factory.protocol = RedisProtocol
        return factory

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._redis.start()
        self._schedule(0)

    def stopService(self) -> Deferred[Any]:
        """
        Stop reading; let the batch in hand finish (routed, stored), have
        the persister write what it holds now, and acknowledge what became
        durable, at most L{STOP_GRACE} seconds in all; then disconnect. What
        was read but not acknowledged stays pending and is read again.
        """
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        self.state = "stopping"
        busy, self._busy = self._busy, None
        finished: Deferred[None] = Deferred()
        timer = self._reactor.callLater(STOP_GRACE, finished.callback, None)

        def done(_: Any = None) -> None:
            if timer.active():
                timer.cancel()
                finished.callback(None)

        def drain(_: Any) -> None:
            if self.durability is None or not self._awaiting:
                done()
                return
            self.durability.flush_now().addBoth(lambda _: self._when_acked(done))

        (succeed(None) if busy is None else busy).addBoth(drain)
        return finished.addCallback(lambda _: self._disconnect())

    def _disconnect(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self._redis.stop()

    def _when_acked(self, then: Callable[[], None]) -> None:
        """Call C{then} once no entry waits for its acknowledgement (checked each 10 ms)."""
        if not self._awaiting:
            then()
        else:
            self._reactor.callLater(0.01, self._when_acked, then)

    def _schedule(self, delay: float) -> None:
        if self.running and self.state != "stopping":
            self._next = self._reactor.callLater(delay, self._step)

    def _step(self) -> None:
        self._next = None
        try:
            conn = self._redis.connection()
        except NotConnected:
            if self.state == "reading":
                self.state = "connecting"
            self._groups_ready = False
            self._schedule(0.05)
            return
        if not self._groups_ready:
            d = self._create_groups(conn)
        elif self._backlog:
            d = self._read_group(conn, "0")
        elif len(self._awaiting) >= MAX_UNACKED:
            self.state = "waiting"  # for the store: the stream holds the rest
            self._schedule(0.05)
            return
        elif self.behind():
            self._schedule(0.05)  # still ready: this passes once delivery catches up
            return
        elif self._reactor.seconds() - self._last_claim >= CLAIM_INTERVAL:
            d = self._claim(conn)
        else:
            self.state = "reading"
            d = self._read_group(conn, ">", block=True)
        self._busy = d
        d.addCallbacks(self._stepped, self._failed)

    def _stepped(self, all_handled: bool) -> None:
        self._busy = None
        self._schedule(0 if all_handled else 0.1)

    def _failed(self, failure: Any) -> None:
        self._busy = None
        self.errors += 1
        self.last_error = failure.getErrorMessage()
        if "NOGROUP" in self.last_error:
            self._log.warn("redis streams: consumer group gone (Redis lost its data?); "
                           "recreating it from 0")
            self._groups_ready = False
            self._schedule(0)
            return
        if self.running and self.state != "stopping":
            self._log.warn("redis streams: {e}; retrying", e=self.last_error)
        self._backlog = True  # whatever was not acknowledged is read again
        self._cursors.clear()
        self._schedule(0.1)

    def _create_groups(self, conn: Any) -> Deferred[bool]:
        def create(stream: str) -> Deferred[Any]:
            d: Deferred[Any] = conn.execute_command(
                "XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")

            def created(_: Any) -> None:
                self.groups_created += 1

            def exists(failure: Any) -> None:
                if "BUSYGROUP" not in failure.getErrorMessage():
                    failure.raiseException()

            return d.addCallbacks(created, exists)

        d = DeferredList([create(s) for s in self._streams], fireOnOneErrback=True,
                         consumeErrors=True)

        def done(_: Any) -> bool:
            self._groups_ready = True
            self._backlog = True
            return True

        return d.addCallback(done).addErrback(_first_error)

    def _read_group(self, conn: Any, start: str, block: bool = False) -> Deferred[bool]:
        args: list[Any] = ["XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT", COUNT]
        if block:
            args += ["BLOCK", BLOCK_MS]
        # This consumer's pending entries are read on from where the last
        # read of them stopped: those still waiting to be durable stay pending.
        starts = [self._cursors.get(s, "0") for s in self._streams] if start == "0" \
            else [start] * len(self._streams)
        args += ["STREAMS", *self._streams, *starts]
        d: Deferred[Any] = conn.execute_command(*args, apply_timeout=False)
        watchdog = self._reactor.callLater(BLOCK_MS / 1000 + self._read_timeout,
                                           self._hung, conn)

        def cancel(result: Any) -> Any:
            if watchdog.active():
                watchdog.cancel()
            return result

        d.addBoth(cancel)

        def handle(reply: list[Any] | None) -> Deferred[bool]:
            batch = [
                (text(stream), entry)
                for stream, entries in (reply or ())
                for entry in entries
            ]
            if start == "0" and not batch:
                self._backlog = False
                self._cursors.clear()
            return self._handle(conn, batch)

        return d.addCallback(handle)

    def _claim(self, conn: Any) -> Deferred[bool]:
        """Take over entries a consumer that died left pending for too long."""
        self._last_claim = self._reactor.seconds()

        def claim(stream: str) -> Deferred[Any]:
            d: Deferred[Any] = conn.execute_command(
                "XAUTOCLAIM", stream, GROUP, self._consumer, CLAIM_MIN_IDLE_MS, "0-0",
                "COUNT", COUNT)
            return d.addCallback(lambda reply: [(stream, entry) for entry in reply[1]])

        d = DeferredList([claim(s) for s in self._streams], fireOnOneErrback=True,
                         consumeErrors=True)

        def handle(results: list[tuple[bool, Any]]) -> Deferred[bool]:
            batch = [item for _, items in results for item in items]
            self.claimed += len(batch)
            if batch:
                self._log.info("redis streams: claimed {n} entries left pending by others",
                               n=len(batch))
            return self._handle(conn, batch)

        return d.addCallbacks(handle, _first_error)

    def _hung(self, conn: Any) -> None:
        self._log.warn("redis streams: no reply in time; reconnecting")
        self._redis.abort(conn)

    def _handle(self, conn: Any, batch: list[tuple[str, Any]]) -> Deferred[bool]:
        """
        Route a batch in entry-id order; each entry is acknowledged once the
        generation it was handled in is durable (an entry trimmed from its
        stream while pending comes back without fields: there is nothing
        left to handle). Entries already waiting for that are skipped.
        """
        if self._backlog:
            for stream, (entry_id, _) in batch:
                self._cursors[stream] = text(entry_id)
        batch = [item for item in batch if (item[0], text(item[1][0])) not in self._awaiting]
        if not batch:
            return succeed(True)
        assert self._receiver is not None
        batch.sort(key=lambda item: id_key(text(item[1][0])))
        self.read += len(batch)
        handled: list[Deferred[Any]] = []
        for stream, (entry_id, fields) in batch:
            entry_id = text(entry_id)
            if fields is None:
                d: Deferred[Any] = succeed(None)
            else:
                pairs: dict[bytes | str, bytes] = dict(zip(fields[::2], fields[1::2], strict=True))
                raw = pairs.get(b"data", pairs.get("data", b""))
                d = self._receiver(stream, raw, StreamEntry(stream, GROUP, entry_id))
            # What it became was added to the persister just now, if at all.
            handled.append(d.addCallback(self._generation))

        def routed(results: list[tuple[bool, Any]]) -> bool:
            generations: dict[int, list[tuple[str, str]]] = {}
            for (ok, generation), (stream, (entry_id, _f)) in zip(results, batch, strict=True):
                if ok:
                    generations.setdefault(generation, []).append((stream, text(entry_id)))
            for generation, entries in generations.items():
                self._ack_when_durable(generation, entries)
            all_handled = sum(map(len, generations.values())) == len(batch)
            if not all_handled:
                # Read the rest again, from the first pending, once the history is back.
                self._backlog = True
                self._cursors.clear()
            return all_handled

        return DeferredList(handled, consumeErrors=True).addCallback(routed)

    def _generation(self, _: Any) -> int:
        """
        The persister's generation that what this entry became went into;
        0 if it added nothing there (a canary, a health event, a duplicate),
        so it is acknowledged as soon as it is handled.
        """
        durability = self.durability
        if durability is None:
            return 0
        added, self._added = self._added, durability.added
        return int(durability.generation) if durability.added != added else 0

    def _ack_when_durable(self, generation: int, entries: list[tuple[str, str]]) -> None:
        self._awaiting.update(entries)
        durable = succeed(None) if self.durability is None \
            else self.durability.when_durable(generation)
        durable.addCallback(lambda _: self._ack(entries))

    def _ack(self, entries: list[tuple[str, str]]) -> None:
        """Acknowledge C{entries} in one script call: all or none of them."""
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in entries:
            by_stream.setdefault(stream, []).append(entry_id)
        args: list[Any] = [GROUP]
        for ids in by_stream.values():
            args += [len(ids), *ids]
        try:
            conn = self._redis.connection()
            d = conn.execute_command("EVAL", ACK, len(by_stream), *by_stream, *args)
        except NotConnected as error:
            self._not_acked(error, entries)
            return
        d.addCallbacks(self._acked, self._not_acked, callbackArgs=(entries,),
                       errbackArgs=(entries,))

    def _acked(self, _: Any, entries: list[tuple[str, str]]) -> None:
        self._awaiting.difference_update(entries)
        self.acked += len(entries)

    def _not_acked(self, why: Any, entries: list[tuple[str, str]]) -> None:
        # Still pending: read again (and known to the history) once back.
        self._awaiting.difference_update(entries)
        self.errors += 1
        self.last_error = f"acknowledging failed: {getattr(why, 'getErrorMessage', lambda: why)()}"
        self._backlog = True
