"""
Streams mode: read the producer's streams (CONTRACT §1, one per channel)
with a consumer group, one consumer per daemon, and acknowledge an entry only
once it is in the history (the history's script acknowledges it atomically
with the write, so an entry handled twice is stored once).

PITFALLS honoured here: the blocking XREADGROUP runs on a connection of its
own without a reply timeout (a watchdog replaces it); NOGROUP after a Redis
restart without persistence recreates the groups from C{0}; what this
consumer read but did not acknowledge before a crash is read again first on
start-up, and entries a dead peer left pending are claimed (XAUTOCLAIM).
"""

from __future__ import annotations

from typing import Any, Callable

import txredisapi
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorCore
from twisted.logger import Logger
from zope.interface import implementer

from tickstock.bus.redis import NotConnected, RedisProtocol, _Supervised
from tickstock.config import RedisAddress
from tickstock.events import id_key
from tickstock.topics import DEFAULT_REGISTRY
from tickstock.history.redis import StreamEntry, text
from tickstock.interfaces import IEventSource

GROUP = "tickstock"
BLOCK_MS = 1000
COUNT = 500
CLAIM_INTERVAL = 10.0
CLAIM_MIN_IDLE_MS = 30_000
STOP_GRACE = 5.0

Receiver = Callable[[str, bytes, object], Deferred[Any]]


@implementer(IEventSource)
class RedisStreamSource(_Supervised):
    """
    Reads every producer stream as consumer C{consumer} of group
    L{GROUP}, hands each entry to the receiver in order, and acknowledges
    the batch once every entry of it was handled.
    """

    _log = Logger()
    name_for_logs = "redis streams"

    def __init__(self, reactor: IReactorCore, address: RedisAddress, consumer: str,
                 read_timeout: float = 5.0, extra_streams: tuple[str, ...] = (),
                 streams: tuple[str, ...] = DEFAULT_REGISTRY.names) -> None:
        """
        @param streams: the producer's streams (the registry's exact names:
            a stream cannot be read by pattern).
        @param extra_streams: this daemon's own (the canary's).
        """
        super().__init__(reactor, address, self._new_factory)
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
            "claimed": self.claimed, "groups_created": self.groups_created,
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
        super().startService()
        self._schedule(0)

    def stopService(self) -> Deferred[Any]:
        """
        Stop reading; let the batch in hand finish (routed, stored and
        acknowledged), at most L{STOP_GRACE} seconds, then disconnect. What
        was read but not acknowledged stays pending and is read again.
        """
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        self.state = "stopping"
        busy, self._busy = self._busy, None
        if busy is None:
            return super().stopService()
        finished: Deferred[None] = Deferred()
        timer = self._reactor.callLater(STOP_GRACE, finished.callback, None)

        def done(_: Any) -> None:
            if timer.active():
                timer.cancel()
                finished.callback(None)

        busy.addBoth(done)
        return finished.addCallback(lambda _: super(RedisStreamSource, self).stopService())

    def _schedule(self, delay: float) -> None:
        if self.running and self.state != "stopping":
            self._next = self._reactor.callLater(delay, self._step)

    def _connection(self) -> Any:
        factory = self._factory
        if factory is None or not factory.pool:
            raise NotConnected(f"not connected to {self._address}")
        return factory.pool[0]

    def _step(self) -> None:
        self._next = None
        try:
            conn = self._connection()
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
        self._schedule(0.1)

    def _create_groups(self, conn: Any) -> Deferred[bool]:
        def create(stream: str) -> Deferred[Any]:
            d = conn.execute_command("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")

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

        return d.addCallback(done).addErrback(lambda f: f.value.subFailure)

    def _read_group(self, conn: Any, start: str, block: bool = False) -> Deferred[bool]:
        args: list[Any] = ["XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT", COUNT]
        if block:
            args += ["BLOCK", BLOCK_MS]
        args += ["STREAMS", *self._streams, *([start] * len(self._streams))]
        d = conn.execute_command(*args, apply_timeout=False)
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
            return self._handle(conn, batch)

        return d.addCallback(handle)

    def _claim(self, conn: Any) -> Deferred[bool]:
        """Take over entries a consumer that died left pending for too long."""
        self._last_claim = self._reactor.seconds()

        def claim(stream: str) -> Deferred[Any]:
            d = conn.execute_command("XAUTOCLAIM", stream, GROUP, self._consumer,
                                     CLAIM_MIN_IDLE_MS, "0-0", "COUNT", COUNT)
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

        return d.addCallbacks(handle, lambda f: f.value.subFailure)

    def _hung(self, conn: Any) -> None:
        self._log.warn("redis streams: no reply in time; reconnecting")
        if conn.transport is not None:
            conn.transport.abortConnection()

    def _handle(self, conn: Any, batch: list[tuple[str, Any]]) -> Deferred[bool]:
        """
        Route a batch in entry-id order, then acknowledge what was handled
        (the history's script already acknowledged what it stored; this
        covers malformed and duplicate entries). An entry trimmed from its
        stream while pending comes back without fields: acknowledged, as
        there is nothing left to handle.
        """
        if not batch:
            return succeed(True)
        assert self._receiver is not None
        batch.sort(key=lambda item: id_key(text(item[1][0])))
        self.read += len(batch)
        handled: list[Deferred[Any]] = []
        for stream, (entry_id, fields) in batch:
            entry_id = text(entry_id)
            raw = b""
            if fields:
                pairs = dict(zip(fields[::2], fields[1::2]))
                raw = pairs.get(b"data", pairs.get("data", b""))
            if fields is None:
                handled.append(succeed(None))
            else:
                handled.append(self._receiver(stream, raw, StreamEntry(stream, GROUP, entry_id)))

        def ack(results: list[tuple[bool, Any]]) -> Deferred[bool]:
            done: dict[str, list[str]] = {}
            for (ok, _), (stream, (entry_id, _f)) in zip(results, batch):
                if ok:
                    done.setdefault(stream, []).append(text(entry_id))
            acks = [conn.execute_command("XACK", stream, GROUP, *ids)
                    for stream, ids in done.items()]
            handled = sum(len(ids) for ids in done.values())
            self.acked += handled
            if handled < len(batch):
                self._backlog = True  # read the rest again once the history is back
            return DeferredList(acks, consumeErrors=True).addCallback(
                lambda _: handled == len(batch))

        return DeferredList(handled, consumeErrors=True).addCallback(ack)
