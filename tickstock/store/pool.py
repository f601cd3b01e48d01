"""
A PostgreSQL connection pool that survives what txpostgres's own does not
(see docs/internals.md §9): backends killed, the server restarted or hung, PostgreSQL
down at start-up. Each slot holds one txpostgres connection and remakes it,
with backoff, whenever it fails; every operation has a watchdog that closes
a connection the server stopped answering on; and a caller never waits on a
dead server: with no live connection an operation fails at once with
L{StoreUnavailable}, and one that would wait too long for a free connection
fails when its time is up.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from tickstock.store import StoreUnavailable

RECONNECT_MIN = 0.2
RECONNECT_MAX = 5.0
MAX_WAITING = 1000

_DEAD = (psycopg2.OperationalError, psycopg2.InterfaceError, neterror.ConnectionDone,
         neterror.ConnectionLost, txpostgres.AlreadyPolling)


def session_dsn(dsn: str, timeout: float, read_only: bool, name: str = "tickstock") -> str:
    """
    C{dsn} (a URL or C{key=value} string) with what every session needs:
    a statement timeout, a connect timeout and TCP keepalives (so a dead
    peer is noticed), and for a read pool a read-only session.
    """
    params = psycopg2.extensions.parse_dsn(dsn)
    options = [params.get("options", "")]
    options.append(f"-c statement_timeout={int(timeout * 1000)} -c timezone=UTC")
    options.append(f"-c idle_in_transaction_session_timeout={int(timeout * 2000)}")
    if read_only:
        options.append("-c default_transaction_read_only=on")
    params.update(
        options=" ".join(option for option in options if option),
        connect_timeout=str(max(1, int(timeout))),
        keepalives="1", keepalives_idle="10", keepalives_interval="5", keepalives_count="3",
        application_name=params.get("application_name", name),
    )
    session: str = psycopg2.extensions.make_dsn(**params)
    return session


class _Connection(txpostgres.Connection):  # type: ignore[misc]
    """
    A txpostgres connection that reports its own death: an idle
    connection whose backend went away raises out of C{doRead} (nobody is
    polling it), which the reactor would log as an unhandled error.
    """

    def __init__(self, reactor: Any, lost: Callable[[], None]) -> None:
        super().__init__(reactor=reactor)
        self._lost = lost

    def doRead(self) -> Any:
        try:
            super().doRead()
        except psycopg2.Error as error:
            return neterror.ConnectionLost(str(error).strip())
        return None

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._lost()


class Slot:
    """One connection of a pool, remade whenever it fails."""

    def __init__(self, pool: Pool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.conn: _Connection | None = None
        self.state = "down"
        self.was_up = False
        self._delay = RECONNECT_MIN
        self._retry: IDelayedCall | None = None

    def connect(self) -> None:
        self._retry = None
        if self.pool.stopped:
            return
        self.state = "connecting"
        conn = self.conn = _Connection(self.pool.reactor, lambda: self.lost(conn))
        d = conn.connect(self.pool.dsn)
        watchdog = self.pool.clock.callLater(self.pool.timeout + 1, self._abort, conn)

        def connected(_: Any) -> None:
            watchdog.cancel()
            if self.conn is conn and self.state == "connecting":
                self._delay = RECONNECT_MIN
                if self.was_up:
                    self.pool.reconnects += 1
                self.was_up = True
                self.pool.up(self)

        def failed(failure: Failure) -> None:
            if watchdog.active():
                watchdog.cancel()
            if self.conn is conn:
                self.pool.note_error(failure)
                self.lost(conn)

        d.addCallbacks(connected, failed)

    def _abort(self, conn: _Connection) -> None:
        """The server stopped answering: close the socket, which fails what waits on it."""
        try:
            conn.close()
        except Exception:
            pass
        self.lost(conn)

    def lost(self, conn: _Connection | None) -> None:
        if conn is not self.conn or self.state == "down":
            return
        self.state = "down"
        self.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        self.pool.down(self)
        if not self.pool.stopped and self._retry is None:
            delay, self._delay = self._delay, min(RECONNECT_MAX, self._delay * 2)
            self._retry = self.pool.clock.callLater(random.uniform(0, delay), self.connect)

    def close(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        conn, self.conn, self.state = self.conn, None, "down"
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


Operation = Callable[[txpostgres.Connection], Deferred[Any]]


class Pool:
    """
    C{size} connections to one DSN. L{run} gives an operation a live
    connection of its own: C{op(connection)} returns a Deferred (e.g.
    C{connection.runQuery(sql, params)}).

    @ivar reconnects: connections remade after a failure.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorFDSet, clock: IReactorTime, dsn: str, size: int,
                 timeout: float, name: str) -> None:
        self.reactor = reactor
        self.clock = clock
        self.dsn = dsn
        self.timeout = timeout
        self.name = name
        self.stopped = True
        self._slots = [Slot(self, index) for index in range(size)]
        self._idle: deque[Slot] = deque()
        self._waiting: deque[tuple[Deferred[Any], Operation, float]] = deque()
        self.reconnects = 0
        self.last_error: str | None = None
        self._ever_up = False
        self._outage_logged = False

    @property
    def live(self) -> int:
        """Connections that are up (idle or busy)."""
        return sum(slot.state in ("idle", "busy") for slot in self._slots)

    def status(self) -> dict[str, Any]:
        live = self.live
        state = "connected" if live else ("connecting" if not self._ever_up else "down")
        status: dict[str, Any] = {"state": state, "live": live, "size": len(self._slots),
                                  "reconnects": self.reconnects}
        if self.last_error and not live:
            status["error"] = self.last_error
        return status

    def start(self) -> None:
        self.stopped = False
        for slot in self._slots:
            slot.connect()

    def stop(self) -> None:
        self.stopped = True
        for slot in self._slots:
            slot.close()
        self._idle.clear()
        waiting, self._waiting = self._waiting, deque()
        for d, _, _ in waiting:
            d.errback(StoreUnavailable(f"{self.name}: stopping"))

    def run(self, op: Operation) -> Deferred[Any]:
        """
        Run C{op} on a live connection. Fails with L{StoreUnavailable} at
        once when no connection is up, after C{timeout} when none became
        free, or when the connection dies or the statement times out;
        other database errors (bad SQL, permissions) pass through.
        """
        if self._idle:
            return self._start(self._idle.popleft(), op)
        if self.stopped or not any(slot.state in ("busy", "idle") for slot in self._slots):
            return fail(StoreUnavailable(f"{self.name}: no connection to PostgreSQL"
                                         + (f" ({self.last_error})" if self.last_error else "")))
        if len(self._waiting) >= MAX_WAITING:
            return fail(StoreUnavailable(f"{self.name}: too many queries waiting"))
        d: Deferred[Any] = Deferred()
        self._waiting.append((d, op, self.clock.seconds() + self.timeout))
        return d

    def _start(self, slot: Slot, op: Operation) -> Deferred[Any]:
        slot.state = "busy"
        conn = slot.conn
        assert conn is not None
        watchdog = self.clock.callLater(self.timeout * 1.5 + 1, slot._abort, conn)
        try:
            d = op(conn)
        except Exception:
            d = fail()

        def done(result: Any) -> Any:
            if watchdog.active():
                watchdog.cancel()
            if slot.conn is conn and slot.state == "busy":
                if isinstance(result, Failure) and result.check(*_DEAD):
                    self.note_error(result)
                    slot.lost(conn)
                else:
                    self.up(slot)
            if isinstance(result, Failure):
                return self._translate(result)
            return result

        return d.addBoth(done)

    def _translate(self, failure: Failure) -> Failure:
        if failure.check(*_DEAD):
            return Failure(StoreUnavailable(f"{self.name}: connection lost "
                                            f"({failure.getErrorMessage().strip()})"))
        if failure.check(CancelledError, psycopg2.extensions.QueryCanceledError):
            return Failure(StoreUnavailable(f"{self.name}: statement timed out"))
        return failure

    def up(self, slot: Slot) -> None:
        """C{slot} has a live, free connection: give it the oldest waiter, if any."""
        if slot.state == "connecting":
            self._ever_up = True
            if self._outage_logged:
                self._outage_logged = False
                self._log.info("{pool}: PostgreSQL is back", pool=self.name)
        now = self.clock.seconds()
        while self._waiting:
            d, op, deadline = self._waiting.popleft()
            if now > deadline:
                d.errback(StoreUnavailable(f"{self.name}: no connection free in time"))
                continue
            self._start(slot, op).chainDeferred(d)
            return
        slot.state = "idle"
        self._idle.append(slot)

    def down(self, slot: Slot) -> None:
        try:
            self._idle.remove(slot)
        except ValueError:
            pass
        if self._ever_up and self.live == 0:
            if not self._outage_logged:
                self._outage_logged = True
                self._log.warn("{pool}: lost PostgreSQL ({error}); reconnecting",
                               pool=self.name, error=self.last_error)
            # Nothing can serve the waiters now: fail them rather than make them wait.
            waiting, self._waiting = self._waiting, deque()
            for d, _, _ in waiting:
                d.errback(StoreUnavailable(f"{self.name}: lost PostgreSQL"))

    def note_error(self, failure: Failure) -> None:
        message = failure.getErrorMessage().strip()
        self.last_error = message.splitlines()[0] if message else type(failure.value).__name__
