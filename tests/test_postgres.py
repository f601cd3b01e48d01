"""
The PostgreSQL store against a real PostgreSQL: what it writes and reads,
that its read pool cannot write, and that its pools ride out killed
backends, a restarted server, a hung server and a server that is down at
start-up, failing fast meanwhile and never hanging.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor, task

from tests.servers import PostgresServer
from tests.wsclient import eventually
from tickstock.domain.events import Event
from tickstock.domain.records import Bar, PatternQuery
from tickstock.ingest.normalize import parse_event
from tickstock.store import StoreUnavailable
from tickstock.store.migrate import migrate
from tickstock.store.postgres import PostgresStore


async def outcome(d: Any) -> Any:
    """The result of C{d}, or its exception (returned, not raised)."""
    try:
        return await d
    except Exception as error:  # noqa: BLE001 - the test looks at it
        return error


def pattern(event_id: str, symbol: str, name: str, confidence: float, ts: float) -> Event:
    event = parse_event("tickstock.events.patterns", orjson.dumps({
        "event_type": "pattern_detected", "symbol": symbol, "pattern": name,
        "confidence": confidence, "timestamp": ts, "extra": {"k": [1, 2]}}), event_id, ts)
    return event


def part(symbol: str, minute: int, part_id: str, o: float, h: float, lo: float, c: float,
         v: float, ots: float, cts: float) -> Bar:
    return Bar(symbol, minute, o, h, lo, c, v, ots, cts, 1, part_id)


@pytest.fixture
def start_store() -> Any:
    stores: list[PostgresStore] = []

    def start(dsn: str, timeout: float = 2.0, **kwargs: Any) -> PostgresStore:
        store = PostgresStore(reactor, dsn, kwargs.pop("readonly", None), timeout, **kwargs)
        store.startService()
        stores.append(store)
        return store

    yield start
    for store in stores:
        store.stopService()


@pytest_twisted.ensureDeferred
async def test_bars_combine_their_parts_and_writes_are_idempotent(postgres, start_store) -> None:
    """
    A bar is the combination of its parts (open of the earliest, close of
    the latest, extremes, summed volume); rewriting a part replaces it.
    """
    store = start_store(postgres)
    await eventually(lambda: store.ready, 10, "store ready")
    m = 1_700_000_040
    await store.write([
        part("AAPL", m, "n1:1", 10, 12, 9, 11, 100, m + 5, m + 30),
        part("AAPL", m, "n2:1", 10.5, 13, 9.5, 12.5, 50, m + 1, m + 50),
        part("MSFT", m, "n1:2", 300, 301, 299, 300.5, 7, m + 2, m + 3),
    ], [])
    bars = await store.ohlcv("AAPL", None, None, 10)
    assert bars == [{"minute": m, "open": 10.5, "high": 13, "low": 9, "close": 12.5,
                     "volume": 150}]
    # n1:1 grows (a later version of the same part) and a late part arrives.
    await store.write([part("AAPL", m, "n1:1", 10, 14, 9, 13, 120, m + 5, m + 55),
                       part("AAPL", m, "n3:1", 8, 8, 8, 8, 1, m + 59, m + 59)], [])
    await store.write([part("AAPL", m, "n1:1", 10, 14, 9, 13, 120, m + 5, m + 55)], [])
    bars = await store.ohlcv("AAPL", m, m + 60, 10)
    assert bars == [{"minute": m, "open": 10.5, "high": 14, "low": 8, "close": 8,
                     "volume": 171}]
    assert await store.ohlcv("AAPL", m + 60, None, 10) == []
    symbols = [row["symbol"] for row in await store.symbols()]
    assert symbols == ["AAPL", "MSFT"]


@pytest_twisted.ensureDeferred
async def test_events_are_stored_once_and_read_in_order(postgres, start_store) -> None:
    """Events keep their ids and fields; a rewrite changes nothing; pages are in id order."""
    store = start_store(postgres)
    await eventually(lambda: store.ready, 10, "store ready")
    events = [pattern(f"1700000000000-{n}", "AAPL" if n % 2 else "MSFT", "Doji",
                      n / 10, 1_700_000_000 + n) for n in range(10)]
    await store.write([], events[:6])
    await store.write([], events)
    page = await store.events_after("patterns", "1700000000000-2", None, None, 3)
    assert [e.id for e in page] == ["1700000000000-3", "1700000000000-4", "1700000000000-5"]
    assert page[0].data == events[3].data and page[0].symbol == "AAPL"
    only = await store.events_after("patterns", "0-0", "1700000000000-7", ["MSFT"], 100)
    assert [e.id for e in only] == [f"1700000000000-{n}" for n in (0, 2, 4, 6)]
    newest = await store.patterns(PatternQuery(symbol="AAPL", min_confidence=0.4, limit=2))
    assert [row["id"] for row in newest] == ["1700000000000-9", "1700000000000-7"]
    assert newest[0]["data"]["extra"] == {"k": [1, 2]} and newest[0]["confidence"] == 0.9
    older = await store.patterns(PatternQuery(symbol="AAPL", min_confidence=0.4,
                                              before=newest[-1]["id"], limit=2))
    assert [row["id"] for row in older] == ["1700000000000-5"]
    assert await store.patterns(PatternQuery(pattern="Hammer")) == []


@pytest_twisted.ensureDeferred
async def test_the_read_pool_cannot_write(postgres, start_store) -> None:
    """UI reads go through read-only sessions: an INSERT there is refused by PostgreSQL."""
    store = start_store(postgres)
    await eventually(lambda: store.ready, 10, "store ready")
    error = await outcome(store.reader.run(
        lambda c: c.runOperation("INSERT INTO symbols (symbol) VALUES ('EVIL')")))
    assert isinstance(error, psycopg2.errors.ReadOnlySqlTransaction)
    assert await store.symbols() == []


@pytest_twisted.ensureDeferred
async def test_universes_are_read_from_cache_entries(postgres, postgres_cluster,
                                                     start_store) -> None:
    """Universes come from cache_entries rows, as update_etf_universe writes them."""
    name = postgres.split("dbname=")[1].split()[0]
    postgres_cluster.sql("SELECT update_etf_universe('etf_growth', ARRAY['QQQ','VUG'], "
                         "'growth', '{\"note\": 1}'::jsonb)", name)
    store = start_store(postgres)
    await eventually(lambda: store.ready, 10, "store ready")
    universe = await store.universe("etf_growth")
    assert universe["symbols"] == ["QQQ", "VUG"] and universe["category"] == "growth"
    assert await store.universe("nope") is None
    summary = await store.universes()
    assert [(u["key"], u["symbol_count"]) for u in summary] == [("etf_growth", 2)]


@pytest_twisted.ensureDeferred
async def test_an_unmigrated_database_is_not_ready(postgres_cluster, start_store) -> None:
    """The daemon says what to do rather than failing on missing tables."""
    postgres_cluster.sql("CREATE DATABASE unmigrated")
    try:
        store = start_store(postgres_cluster.dsn("unmigrated"))
        await eventually(lambda: store.schema not in (None,), 10, "schema checked")
        assert not store.ready
        assert "tickstock-db migrate" in store.status()["schema"]
    finally:
        store.stopService()
        postgres_cluster.sql("DROP DATABASE unmigrated WITH (FORCE)")


async def _write_until_ok(store: PostgresStore, bars: list[Bar], timeout: float) -> int:
    """Retry a write until it succeeds; how many attempts failed (each failing fast)."""
    failures = 0
    deadline = time.monotonic() + timeout
    while True:
        result = await outcome(store.write(bars, []))
        if result is None:
            return failures
        assert isinstance(result, StoreUnavailable), result
        failures += 1
        assert time.monotonic() < deadline, "the store did not recover"
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_killed_backends_and_a_restart_are_survived(postgres_server: PostgresServer,
                                                          start_store) -> None:
    """
    pg_terminate_backend on every connection, then a server restart: the
    pools reconnect by themselves, /ready goes false and back, and calls
    fail with StoreUnavailable meanwhile instead of hanging.
    """
    migrate(postgres_server.dsn())
    store = start_store(postgres_server.dsn())
    await eventually(lambda: store.ready, 10, "store ready")
    m = 1_700_000_040
    postgres_server.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'tickstock'")
    await _write_until_ok(store, [part("A", m, "p1", 1, 1, 1, 1, 1, m, m)], 15)
    await eventually(lambda: store.ready, 15, "ready after killed backends")

    postgres_server.stop_server()
    await eventually(lambda: not store.ready, 10, "not ready while down")
    assert store.status()["state"] != "ready"
    error = await outcome(store.symbols())
    assert isinstance(error, StoreUnavailable)
    postgres_server.start()
    failures = await _write_until_ok(store, [part("A", m, "p2", 2, 2, 2, 2, 1, m + 1, m + 1)], 20)
    await eventually(lambda: store.ready, 15, "ready after restart")
    assert (await store.ohlcv("A", None, None, 5))[0]["volume"] == 2
    assert store.writer.reconnects >= 1 and failures >= 0


@pytest_twisted.ensureDeferred
async def test_a_hung_server_fails_calls_instead_of_hanging(postgres_server: PostgresServer,
                                                           start_store) -> None:
    """
    SIGSTOPped PostgreSQL: a call in flight fails (the watchdog closes the
    connection) instead of waiting forever; after SIGCONT the pool recovers.
    """
    migrate(postgres_server.dsn())
    store = start_store(postgres_server.dsn(), timeout=0.5)
    await eventually(lambda: store.ready, 10, "store ready")
    postgres_server.pause()
    try:
        error = await outcome(store.symbols())
        assert isinstance(error, StoreUnavailable)
    finally:
        postgres_server.resume()
    await eventually(lambda: store.ready, 20, "ready after the pause")
    assert await store.symbols() == []


@pytest_twisted.ensureDeferred
async def test_postgres_down_at_start(postgres_server: PostgresServer, start_store) -> None:
    """Started while PostgreSQL is down: not ready, calls fail at once, then it connects."""
    migrate(postgres_server.dsn())
    postgres_server.stop_server()
    store = start_store(postgres_server.dsn())
    error = await outcome(store.symbols())
    assert isinstance(error, StoreUnavailable)
    assert not store.ready
    postgres_server.start()
    await eventually(lambda: store.ready, 20, "ready once PostgreSQL is up")


@pytest_twisted.ensureDeferred
async def test_the_job_limit_holds_under_concurrent_submissions(postgres, start_store) -> None:
    """
    Eight submissions at once for one user with a limit of 2 (the writer pool
    runs them on two connections): exactly 2 are inserted. Job updates apply
    in order and stop at a final state.
    """
    from twisted.internet.defer import gatherResults

    store = start_store(postgres, writers=4)
    await eventually(lambda: store.ready, 10, "store ready")

    def record(n: int, user: str = "alice") -> dict[str, Any]:
        return {"job_id": f"job-{user}-{n}", "user_id": user, "params": {"symbols": ["AAPL"]},
                "created_at": 1_700_000_000.0 + n}

    inserted = await gatherResults([store.create_job(record(n), 2) for n in range(8)])
    assert sorted(inserted) == [False] * 6 + [True] * 2
    assert await store.create_job(record(0, "bob"), 2)
    mine = [record(n)["job_id"] for n, ok in enumerate(inserted) if ok]
    job_id = mine[0]

    def progress(value: float, status: str, event_id: str) -> Event:
        return parse_event("tickstock.events.backtesting.progress", orjson.dumps(
            {"job_id": job_id, "progress": value, "status": status, "timestamp": 1.0}),
            event_id, 1_700_000_100.0)

    result = parse_event("tickstock.events.backtesting.results", orjson.dumps(
        {"job_id": job_id, "results": {"win_rate": 0.5, "roi": 0.1, "sharpe_ratio": 1.0,
                                       "max_drawdown": 0.2}, "completed_at": 2.0}),
        "1700000000000-3", 1_700_000_200.0)
    await store.write([], [progress(0.5, "processing", "1700000000000-1"),
                           progress(0.9, "processing", "1700000000000-2"), result,
                           progress(0.1, "failed", "1700000000000-4")])
    job = await store.job(job_id)
    assert (job["status"], job["progress"], job["error"]) == ("completed", 1.0, None)
    assert job["results"]["roi"] == 0.1 and job["updated_at"] == 1_700_000_200.0
    assert [j["job_id"] for j in await store.jobs("alice", None, 10)] == mine[::-1]
    assert [j["job_id"] for j in await store.jobs("alice", mine[1], 10)] == mine[:1]
    stale = await store.stale_jobs(1_800_000_000.0, 10)
    assert sorted(j["job_id"] for j in stale) == sorted([mine[1], "job-bob-0"])
    assert await store.stale_jobs(1_600_000_000.0, 10) == []
