"""
Live delivery of the pattern events a producer inserts straight into the
C{events} table (docs/database.md, "The shared database"). Migration 0008's
trigger NOTIFYs C{tickstock_events} with each such row's id when its
transaction commits; L{ProducerRowListener} LISTENs on a connection of its
own, reads the row and hands it on as a flat producer-style message on
channel L{CHANNEL}, as if it had come from Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg2.extensions import Notify
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres
from zope.interface import implementer

from tickstock.domain.events import ID_STRIDE, id_key
from tickstock.domain.interfaces import IComponent
from tickstock.store import StoreUnavailable
from tickstock.store.pool import Pool, Slot, session_dsn
from tickstock.store.postgres import PRODUCER_CHANNEL

CHANNEL = PRODUCER_CHANNEL
"""The channel name the messages are handed on with."""

NOTIFY_CHANNEL = "tickstock_events"
PAGE = 1000
REMEMBERED = 4096
"""Row ids kept to hand each row on once, when both a notification and the
catch-up after a reconnect find it."""

Key = tuple[int, int]

_ROW = ("SELECT id_ms, id_seq, tickstock_producer_message(events)::text FROM events "
        "WHERE channel = %s AND id_ms = %s AND id_seq = %s")
_AFTER = ("SELECT id_ms, id_seq, tickstock_producer_message(events)::text FROM events "
          "WHERE channel = %s AND (id_ms, id_seq) > (%s, %s) ORDER BY id_ms, id_seq LIMIT %s")
_NEWEST = ("SELECT id_ms, id_seq FROM events WHERE channel = %s "
           "ORDER BY id_ms DESC, id_seq DESC LIMIT 1")


class _Pool(Pool):
    """A L{Pool} that says when one of its connections comes up and goes down."""

    def __init__(self, reactor: IReactorFDSet, clock: IReactorTime, dsn: str, timeout: float,
                 connected: Callable[[txpostgres.Connection], None],
                 lost: Callable[[], None]) -> None:
        super().__init__(reactor, clock, dsn, 1, timeout, "postgres listener")
        self._connected = connected
        self._lost = lost

    def up(self, slot: Slot) -> None:
        fresh = slot.state == "connecting"
        super().up(slot)
        if fresh and slot.conn is not None:
            self._connected(slot.conn)

    def down(self, slot: Slot) -> None:
        super().down(slot)
        self._lost()


@implementer(IComponent)
class ProducerRowListener(Service):
    """
    Calls C{receive(CHANNEL, raw)} once for each row a producer inserts
    into C{events} while it runs, in commit order; C{raw} is the JSON of
    C{tickstock_producer_message}: C{event_type}, C{event_id} (C{"pg:<id>"},
    the same in every daemon), C{symbol}, C{pattern}, C{confidence},
    C{timestamp} (epoch seconds), C{source} C{"postgres"} and the row's
    C{details}.

    Its one connection is remade like a L{Pool}'s; LISTEN does not survive
    a new connection, so it is issued on each, followed by the rows
    committed meanwhile (those with ids after the newest it had seen).

    @ivar listening: LISTEN is in force on a live connection.
    @ivar ignored: notifications on the channel that named no id.
    """

    _log = Logger()
    ready = True
    """Never what keeps the daemon from serving: rows inserted while it does
    not listen are read once it listens again."""

    def __init__(self, reactor: IReactorFDSet, clock: IReactorTime, dsn: str, timeout: float,
                 receive: Callable[[str, bytes], Any]) -> None:
        self.pool = _Pool(reactor, clock, session_dsn(dsn, timeout, read_only=True,
                                                      name="tickstock-listen"),
                          timeout, self._connected, self._lost)
        self._receive = receive
        self.listening = False
        self.delivered = 0
        self.ignored = 0
        self._newest: Key | None = None
        self._seen: dict[Key, None] = {}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.pool.stop()

    def status(self) -> dict[str, Any]:
        return {**self.pool.status(), "listening": self.listening, "delivered": self.delivered}

    def _connected(self, conn: txpostgres.Connection) -> None:
        conn.addNotifyObserver(self._notified)
        d = self.pool.run(lambda c: c.runOperation(f"LISTEN {NOTIFY_CHANNEL}"))
        if self._newest is None:
            d.addCallback(lambda _: self.pool.run(
                lambda c: c.runQuery(_NEWEST, (CHANNEL,))))
            d.addCallback(self._start_after)
        else:
            d.addCallback(lambda _: self._catch_up(self._newest or (0, 0)))

        def listening(_: object) -> None:
            self.listening = self.pool.live > 0

        def failed(failure: Failure) -> None:
            if not failure.check(StoreUnavailable):
                self._log.failure("LISTEN {channel} failed", failure, channel=NOTIFY_CHANNEL)

        d.addCallbacks(listening, failed)

    def _start_after(self, rows: list[Key]) -> None:
        """On the first connection: what was there before is not handed on."""
        self._advance(rows[0] if rows else (0, 0))

    def _catch_up(self, after: Key) -> Deferred[None]:
        """Hand on the rows committed after C{after} (while not listening), page by page."""
        def page(rows: list[tuple[int, int, str]]) -> Deferred[None] | None:
            for ms, seq, raw in rows:
                self._hand_on((ms, seq), raw)
            if len(rows) < PAGE:
                return None
            return self._catch_up((rows[-1][0], rows[-1][1]))

        d = self.pool.run(lambda c: c.runQuery(_AFTER, (CHANNEL, *after, PAGE)))
        return d.addCallback(page)

    def _lost(self) -> None:
        self.listening = False

    def _notified(self, notify: Notify) -> None:
        if notify.channel != NOTIFY_CHANNEL:
            return
        try:
            key = id_key(notify.payload)
            if not (key[0] < 2**63 and key[1] < ID_STRIDE):
                raise ValueError(notify.payload)
        except ValueError:
            # Anyone who may connect may NOTIFY: count it, say it once.
            if not self.ignored:
                self._log.warn("ignored a {channel} notification that names no row id: {payload!r}",
                               channel=NOTIFY_CHANNEL, payload=notify.payload[:64])
            self.ignored += 1
            return
        if key in self._seen:
            return

        def read(rows: list[tuple[int, int, str]]) -> None:
            for ms, seq, raw in rows:
                self._hand_on((ms, seq), raw)

        def failed(failure: Failure) -> None:
            self._log.warn("producer row {key} not read: {error}", key=notify.payload,
                           error=failure.getErrorMessage())

        self.pool.run(lambda c: c.runQuery(_ROW, (CHANNEL, *key))).addCallbacks(read, failed)

    def _advance(self, key: Key) -> None:
        """A reconnect catches up from the newest id seen."""
        if self._newest is None or key > self._newest:
            self._newest = key

    def _hand_on(self, key: Key, raw: str) -> None:
        if key in self._seen:
            return
        self._seen[key] = None
        if len(self._seen) > REMEMBERED:
            del self._seen[next(iter(self._seen))]
        self._advance(key)
        self.delivered += 1
        try:
            self._receive(CHANNEL, raw.encode())
        except Exception:
            self._log.failure("handing on producer row {key} failed", key=f"{key[0]}-{key[1]}")
