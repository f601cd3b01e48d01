"""
The PostgreSQL store: a writer pool for the daemon's batched writes and a
read-only pool for every UI query (C{--postgres-readonly}, by default the
writer's DSN in read-only sessions), both L{Pool}s that reconnect by
themselves and fail fast while PostgreSQL is away.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from tickstock.domain.events import Event, id_key, stored_event
from tickstock.domain.interfaces import IJobStore, ITickMarks
from tickstock.domain.jobs import update_of
from tickstock.domain.records import Bar, PatternQuery
from tickstock.domain.topics import STORED_TOPICS
from tickstock.store import UNIVERSE_TYPES, StoreUnavailable
from tickstock.store.pool import Pool, session_dsn

WRITE = "SELECT tickstock_write(" + ", ".join(["%s"] * 21) + ")"
JOBS = ", tickstock_update_jobs(%s, %s, %s, %s, %s, %s)"
MARKS = ", tickstock_mark_ticks(%s, %s, %s, %s)"
_JOB_COLUMNS = ("job_id, user_id, status, params::text, progress, results::text, error, "
                "extract(epoch FROM created_at)::float8, extract(epoch FROM updated_at)::float8")

PRODUCER_CHANNEL = "tickstock.db.events"
"""The C{events.channel} of rows a producer inserted itself (its default,
migration 0008): TickStock never writes it, and reads such a row's data
as the producer-style message C{tickstock_producer_message} makes of it."""

_DATA = (f"(CASE WHEN channel = '{PRODUCER_CHANNEL}' THEN tickstock_producer_message(events) "
         "ELSE details END)::text")
_EVENT_COLUMNS = f"id_ms, id_seq, channel, event_type, {_DATA}"


def _event(row: tuple[Any, ...]) -> Event:
    ms, seq, channel, event_type, data = row
    return stored_event(f"{ms}-{seq}", channel, event_type, data, None)


def _pattern(row: tuple[Any, ...]) -> dict[str, Any]:
    ms, seq, symbol, pattern, confidence, data = row
    data = orjson.loads(data)
    return {"id": f"{ms}-{seq}", "symbol": symbol, "pattern": pattern,
            "confidence": confidence, "timestamp": data.get("timestamp"), "data": data}


def _job(row: tuple[Any, ...]) -> dict[str, Any]:
    job_id, user, status, params, progress, results, error, created, updated = row
    return {"job_id": job_id, "user_id": user, "status": status,
            "params": orjson.loads(params), "progress": progress,
            "results": None if results is None else orjson.loads(results),
            "error": error, "created_at": created, "updated_at": updated}


def job_params(events: Iterable[Event], now: float) -> list[list[Any]]:
    """The 6 column arrays of one C{tickstock_update_jobs} call, in event order."""
    columns: list[list[Any]] = [[] for _ in range(6)]
    for event in events:
        update = update_of(event)
        if update is None:
            continue
        status, progress, results, error = update
        for column, value in zip(columns, (
            event.job_id, status, progress,
            None if results is None else orjson.dumps(results).decode(), error,
            event.received_at or now,
        ), strict=True):
            column.append(value)
    return columns


def write_params(bars: Iterable[Bar], events: Iterable[Event]) -> list[list[Any]]:
    """The 21 column arrays of one C{tickstock_write} call (backtest events aside)."""
    columns: list[list[Any]] = [[] for _ in range(21)]
    bar_columns, event_columns = columns[:11], columns[11:]
    # One version per part (the newest): a statement may touch a row once.
    newest: dict[tuple[str, int, str], Bar] = {}
    for bar in bars:
        key = (bar.symbol, bar.minute, bar.part)
        if key not in newest or newest[key].ticks <= bar.ticks:
            newest[key] = bar
    for bar in newest.values():
        for column, value in zip(bar_columns, (
            bar.symbol, bar.minute, bar.part, bar.open, bar.high, bar.low, bar.close,
            bar.volume, bar.open_ts, bar.close_ts, bar.ticks,
        ), strict=True):
            column.append(value)
    for event in events:
        # A producer's row is in events already: written again it would be
        # a second row (another id) and notify again.
        if event.topic not in STORED_TOPICS or event.channel == PRODUCER_CHANNEL:
            continue
        ms, seq = id_key(event.id)
        data = event.data
        confidence = data.get("confidence") if event.topic == "patterns" else None
        for column, value in zip(event_columns, (
            ms, seq, event.topic, event.channel, event.type, event.symbol,
            data.get("pattern") if event.topic == "patterns" else None,
            confidence, data.get("timestamp"), orjson.dumps(data).decode(),
        ), strict=True):
            column.append(value)
    return columns


@implementer(ITickMarks, IJobStore)
class PostgresStore(Service):
    """
    L{IStore} on PostgreSQL, with tick marks (L{ITickMarks}). The schema
    must be migrated (C{tickstock-db migrate}); until it is, the store says
    so in C{/ready} and is not ready.
    """

    _log = Logger()

    def __init__(self, reactor: Any, dsn: str, readonly_dsn: str | None, timeout: float,
                 writers: int = 2, readers: int = 4) -> None:
        self.writer = Pool(reactor, reactor, session_dsn(dsn, timeout, read_only=False),
                           writers, timeout, "postgres writer")
        self.reader = Pool(reactor, reactor,
                           session_dsn(readonly_dsn or dsn, timeout, read_only=True),
                           readers, timeout, "postgres reader")
        self.schema: str | None = None
        self._clock = reactor

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.writer.start()
        self.reader.start()
        self._check_schema()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.writer.stop()
        self.reader.stop()

    def _check_schema(self) -> None:
        """Find out, once a connection is up, whether the schema is migrated."""
        from tickstock.store.migrate import packaged

        if not self.running or self.schema == "ok":
            return

        def checked(rows: list[tuple[int]]) -> None:
            applied = {row[0] for row in rows}
            missing = [m.name for m in packaged() if m.version not in applied]
            if missing:
                self.schema = "not migrated: run tickstock-db migrate (missing " \
                    + ", ".join(missing) + ")"
                self._log.error("PostgreSQL schema {s}", s=self.schema)
            else:
                self.schema = "ok"

        def failed(failure: Any) -> None:
            if failure.check(StoreUnavailable):
                self._clock.callLater(0.5, self._check_schema)
            else:
                self.schema = "not migrated: run tickstock-db migrate"
                self._log.error("PostgreSQL schema check failed: {e}",
                                e=failure.getErrorMessage())

        d = self.reader.run(lambda c: c.runQuery("SELECT version FROM schema_migrations"))
        d.addCallbacks(checked, failed)

    @property
    def ready(self) -> bool:
        return self.schema == "ok" and self.writer.live > 0 and self.reader.live > 0

    def status(self) -> dict[str, Any]:
        state = "ready" if self.ready else ("schema" if self.schema not in (None, "ok")
                                            else "connecting")
        status = {"state": state, "writer": self.writer.status(),
                  "reader": self.reader.status()}
        if self.schema not in (None, "ok"):
            status["schema"] = self.schema
        return status

    def write(self, bars: Sequence[Bar], events: Sequence[Event],
              marks: tuple[str, Mapping[str, tuple[int, int]]] | None = None) -> Deferred[None]:
        """One statement, so one transaction: the parts, events, job updates and marks."""
        sql = WRITE
        params: list[Any] = write_params(bars, events)
        jobs = job_params(events, self._clock.seconds())
        if jobs[0]:
            sql += JOBS
            params += jobs
        if marks is not None and marks[1]:
            node, newest = marks
            keys = list(newest.values())
            sql += MARKS
            params += [node, list(newest), [ms for ms, _ in keys], [seq for _, seq in keys]]
        return self.writer.run(lambda c: c.runOperation(sql, params))

    def tick_marks(self, node: str) -> Deferred[dict[str, tuple[int, int]]]:
        return self.writer.run(lambda c: c.runQuery(
            "SELECT symbol, tick_ms, tick_seq FROM tickstock_tick_marks(%s)", (node,),
        )).addCallback(lambda rows: {symbol: (ms, seq) for symbol, ms, seq in rows})

    # IJobStore

    def create_job(self, record: dict[str, Any], max_active: int) -> Deferred[bool]:
        return self.writer.run(lambda c: c.runQuery(
            "SELECT tickstock_submit_job(%s, %s, %s::jsonb, %s, %s)",
            (record["job_id"], record["user_id"], orjson.dumps(record["params"]).decode(),
             record["created_at"], max_active),
        )).addCallback(lambda rows: bool(rows[0][0]))

    def job(self, job_id: str) -> Deferred[dict[str, Any] | None]:
        return self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = %s", (job_id,)
                          ).addCallback(lambda rows: _job(rows[0]) if rows else None)

    def jobs(self, user: str, before: str | None, limit: int) -> Deferred[list[dict[str, Any]]]:
        sql = [f"SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = %s"]
        params: list[Any] = [user]
        if before is not None:
            sql.append("AND (created_at, job_id) < (SELECT created_at, job_id FROM jobs "
                       "WHERE job_id = %s AND user_id = %s)")
            params += [before, user]
        sql.append("ORDER BY created_at DESC, job_id DESC LIMIT %s")
        params.append(limit)
        return self._read(" ".join(sql), params).addCallback(lambda rows: [_job(r) for r in rows])

    def stale_jobs(self, cutoff: float, limit: int) -> Deferred[list[dict[str, Any]]]:
        return self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'running') "
            "AND updated_at < to_timestamp(%s) ORDER BY updated_at LIMIT %s", (cutoff, limit),
        ).addCallback(lambda rows: [_job(r) for r in rows])

    def close_job(self, job_id: str, status: str, error: str | None,
                  at: float) -> Deferred[None]:
        return self.writer.run(lambda c: c.runOperation(
            "UPDATE jobs SET status = %s, error = coalesce(%s, error), "
            "updated_at = to_timestamp(%s) "
            "WHERE job_id = %s AND status IN ('queued', 'running')",
            (status, error, at, job_id)))

    def _read(self, sql: str, params: Any) -> Deferred[list[tuple[Any, ...]]]:
        return self.reader.run(lambda c: c.runQuery(sql, params))

    def events_after(self, topic: str, after: str, until: str | None,
                     symbols: Iterable[str] | None, limit: int) -> Deferred[list[Event]]:
        sql = [f"SELECT {_EVENT_COLUMNS} FROM events "
               "WHERE topic = %s AND (id_ms, id_seq) > (%s, %s)"]
        params: list[Any] = [topic, *id_key(after)]
        if until is not None:
            sql.append("AND (id_ms, id_seq) <= (%s, %s)")
            params += id_key(until)
        if symbols is not None:
            sql.append("AND symbol = ANY(%s)")
            params.append(sorted(symbols))
        sql.append("ORDER BY id_ms, id_seq LIMIT %s")
        params.append(limit)
        return self._read(" ".join(sql), params).addCallback(lambda rows: [_event(r) for r in rows])

    def patterns(self, query: PatternQuery) -> Deferred[list[dict[str, Any]]]:
        sql = [f"SELECT id_ms, id_seq, symbol, pattern, confidence, {_DATA} FROM events "
               "WHERE topic = 'patterns'"]
        params: list[Any] = []
        for clause, value in (
            ("AND symbol = %s", query.symbol),
            ("AND pattern = %s", query.pattern),
            ("AND confidence >= %s", query.min_confidence),
            ('AND "timestamp" >= to_timestamp(%s)', query.since),
        ):
            if value is not None:
                sql.append(clause)
                params.append(value)
        if query.before is not None:
            sql.append("AND (id_ms, id_seq) < (%s, %s)")
            params += id_key(query.before)
        sql.append("ORDER BY id_ms DESC, id_seq DESC LIMIT %s")
        params.append(query.limit)
        return self._read(" ".join(sql), params).addCallback(
            lambda rows: [_pattern(r) for r in rows])

    def symbols(self) -> Deferred[list[dict[str, Any]]]:
        def rows(result: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
            return [{"symbol": s, "name": n, "exchange": e, "type": t, "active": a,
                     "first_seen": f, "last_seen": last}
                    for s, n, e, t, a, f, last in result]

        return self._read(
            "SELECT symbol, name, exchange, type, active, extract(epoch FROM first_seen)::float8, "
            "extract(epoch FROM last_seen)::float8 FROM symbols ORDER BY symbol", (),
        ).addCallback(rows)

    def ohlcv(self, symbol: str, since: float | None, until: float | None,
              limit: int) -> Deferred[list[dict[str, Any]]]:
        sql = ['SELECT extract(epoch FROM "timestamp")::bigint, open, high, low, close, volume '
               "FROM ohlcv_1min WHERE symbol = %s"]
        params: list[Any] = [symbol]
        if since is not None:
            sql.append('AND "timestamp" >= to_timestamp(%s)')
            params.append(since)
        if until is not None:
            sql.append('AND "timestamp" < to_timestamp(%s)')
            params.append(until)
        sql.append('ORDER BY "timestamp" LIMIT %s')
        params.append(limit)

        def rows(result: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
            return [{"minute": m, "open": o, "high": h, "low": lo,
                     "close": c, "volume": v} for m, o, h, lo, c, v in result]

        return self._read(" ".join(sql), params).addCallback(rows)

    def universes(self) -> Deferred[list[dict[str, Any]]]:
        def rows(result: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
            return [{"key": k, "type": t, "category": c, "symbol_count": n,
                     "updated": u} for k, t, c, n, u in result]

        return self._read(
            "SELECT key, type, universe_category, "
            "coalesce(jsonb_array_length(value->'symbols'), 0), "
            "extract(epoch FROM last_universe_update AT TIME ZONE 'UTC')::float8 "
            "FROM cache_entries WHERE type = ANY(%s) ORDER BY key, type",
            (list(UNIVERSE_TYPES),),
        ).addCallback(rows)

    def universe(self, key: str) -> Deferred[dict[str, Any] | None]:
        def row(result: list[tuple[Any, ...]]) -> dict[str, Any] | None:
            if not result:
                return None
            k, t, c, value, metadata, u = result[0]
            symbols = value.get("symbols", []) if isinstance(value, dict) else []
            return {"key": k, "type": t, "category": c,
                    "symbols": [s for s in symbols if isinstance(s, str)],
                    "metadata": metadata or {}, "updated": u}

        return self._read(
            "SELECT key, type, universe_category, value, universe_metadata, "
            "extract(epoch FROM last_universe_update AT TIME ZONE 'UTC')::float8 "
            "FROM cache_entries WHERE key = %s AND type = ANY(%s) "
            "ORDER BY type LIMIT 1",
            (key, list(UNIVERSE_TYPES)),
        ).addCallback(row)
