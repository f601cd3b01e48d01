"""
Nothing acknowledged before it is durable (README, "What it promises"): in
streams mode an entry is acknowledged only once everything it must become
is in the Redis history and in PostgreSQL, or in the spool, fsynced. Faults
in combination, against real processes: PostgreSQL down, then the daemon
killed with SIGKILL during the outage; and a daemon that wrote to
PostgreSQL but died before acknowledging. Bars stay exact across such
restarts: persisters over a real PostgreSQL, each started where the last
was killed, count every tick read again once (tick marks).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest_twisted
from psycopg2.extensions import parse_dsn
from twisted.internet import reactor

from tests.servers import free_port, poll
from tests.test_startup import Twistd
from tests.wsclient import eventually
from tickstock.ingest.normalize import parse_event
from tickstock.store.migrate import migrate
from tickstock.store.persist import Persister
from tickstock.store.postgres import PostgresStore

TICKS = "tickstock.data.ticks"
PATTERNS = "tickstock.events.patterns"
MINUTE = 1_700_000_040  # a minute's start


def xadd(redis: Any, channel: str, message: dict[str, Any]) -> None:
    redis.command("XADD", channel, "*", "data", orjson.dumps(message))


def pending(redis: Any, stream: str) -> int:
    reply = redis.command("XPENDING", stream, "tickstock")
    return int(reply.split(b"\r\n")[1][1:])


def publish(redis: Any, first: int, count: int) -> None:
    """C{count} ticks of AAA (volume 1 each) in one minute, and a pattern per 10 ticks."""
    for n in range(first, first + count):
        xadd(redis, TICKS, {"symbol": "AAA", "price": 10 + n % 7, "volume": 1,
                            "timestamp": MINUTE + n * 0.1})
        if n % 10 == 0:
            xadd(redis, PATTERNS, {"symbol": "AAA", "pattern": "Doji", "confidence": 0.5,
                                   "event_id": f"p{n}", "timestamp": MINUTE + n * 0.1})


def stored(postgres: Any) -> tuple[float, int]:
    """The volume of AAA's bar, and how many of its pattern events there are."""
    volume = postgres.sql("SELECT coalesce(sum(volume), 0) FROM ohlcv_1min WHERE symbol = 'AAA'")
    events = postgres.sql("SELECT count(*) FROM events WHERE symbol = 'AAA'")
    return float(volume[0][0]), int(events[0][0])


def test_postgres_down_then_the_daemon_killed_loses_nothing(
        tmp_path: Path, redis_server, postgres_server, secret_file) -> None:
    """
    The issue's failure: PostgreSQL goes down, ticks and patterns keep
    coming, the daemon is killed (SIGKILL) 3 s into the outage. Before the
    kill everything it read is acknowledged, because it is in the spool
    (fsynced); the restarted daemon writes the spool back once PostgreSQL is
    up: the bar's volume is every tick's, exactly, and every event is there.
    """
    migrate(postgres_server.dsn())
    port = free_port()
    args = ("--redis", redis_server.url, "--mode", "streams", "--postgres",
            postgres_server.dsn(), "--jwt-secret-file", secret_file, "--node-id", "n1",
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--canary-interval", "0")
    daemon = Twistd(tmp_path, *args)
    try:
        daemon.wait_ready(port)
        publish(redis_server, 0, 50)
        poll(lambda: stored(postgres_server) == (50.0, 5), 20, "the first ticks stored")

        postgres_server.stop_server()
        publish(redis_server, 50, 60)
        # Read, spilled to the spool once a write failed, and only then acknowledged.
        poll(lambda: pending(redis_server, TICKS) == 0 and pending(redis_server, PATTERNS) == 0
             and redis_server.command("XLEN", "tickstock:history:ticks") == b":110\r\n", 20,
             "every entry read and acknowledged")
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        assert any((tmp_path / "spool").rglob("*.jsonl")), "nothing was spilled"
    finally:
        daemon.kill()

    postgres_server.start()
    restarted = Twistd(tmp_path, *args)
    try:
        restarted.wait_ready(port)
        poll(lambda: stored(postgres_server) == (110.0, 11), 30, "every tick and event stored")
        poll(lambda: not any((tmp_path / "spool").rglob("*.jsonl")), 10, "the spool empty")
        assert stored(postgres_server) == (110.0, 11)
        restarted.stop()
    finally:
        restarted.kill()


@pytest_twisted.ensureDeferred
async def test_written_but_not_acknowledged_is_made_again_not_twice(
        redis_server, postgres, postgres_cluster, daemons, monkeypatch) -> None:
    """
    A daemon that wrote its bars and events to PostgreSQL but died before
    acknowledging (its acknowledgements are dropped here) leaves the entries
    pending. The next daemon on the same consumer reads them again: the
    history knows them (no event is delivered twice), and what they make in
    PostgreSQL is made again into the same rows and bar parts: the volume
    is every tick's once, and each event is there once.
    """
    from tickstock.ingest import streams

    first = daemons(redis=redis_server.url, mode="streams", postgres=postgres,
                    node_id="n1", flush_interval="0.1", canary_interval="0")
    await eventually(lambda: first.service.readiness()[0], 15, "ready")
    monkeypatch.setattr(streams.RedisStreamSource, "_ack", lambda self, entries: None)
    publish(redis_server, 0, 40)

    dbname = parse_dsn(postgres)["dbname"]

    def in_postgres() -> tuple[float, int]:
        volume = postgres_cluster.sql(
            "SELECT coalesce(sum(volume), 0) FROM ohlcv_1min WHERE symbol = 'AAA'", dbname)
        events = postgres_cluster.sql("SELECT count(*) FROM events WHERE symbol = 'AAA'", dbname)
        return float(volume[0][0]), int(events[0][0])

    await eventually(lambda: in_postgres() == (40.0, 4), 15, "written")
    assert pending(redis_server, TICKS) == 40
    await first.service.stopService()  # its acknowledgements were lost
    monkeypatch.undo()

    second = daemons(redis=redis_server.url, mode="streams", postgres=postgres,
                     node_id="n1", flush_interval="0.1", canary_interval="0")
    await eventually(lambda: pending(redis_server, TICKS) == 0
                     and pending(redis_server, PATTERNS) == 0, 15, "read again, acknowledged")
    router = second.service.router
    assert router.redelivered == 44 and router.routed == 0
    await eventually(lambda: second.service.persister.pending == 0, 5, "written again")
    assert in_postgres() == (40.0, 4)
    assert redis_server.command("XLEN", "tickstock:history:ticks") == b":40\r\n"


def test_killed_before_anything_was_durable_makes_it_on_restart(
        tmp_path: Path, redis_server, postgres_server, secret_file) -> None:
    """
    Killed (SIGKILL) after the history stored the entries but before the
    store had them (a long flush interval): nothing was acknowledged, so
    the restarted daemon reads them again and, knowing them as stored
    events, writes what they make: every tick once, every event once, and
    none delivered twice to the history.
    """
    migrate(postgres_server.dsn())
    port = free_port()
    args = ("--redis", redis_server.url, "--mode", "streams", "--postgres",
            postgres_server.dsn(), "--jwt-secret-file", secret_file, "--node-id", "n1",
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--canary-interval", "0")
    daemon = Twistd(tmp_path, *args, "--flush-interval", "60")
    try:
        daemon.wait_ready(port)
        publish(redis_server, 0, 30)
        poll(lambda: redis_server.command("XLEN", "tickstock:history:ticks") == b":30\r\n",
             20, "in the history")
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        assert stored(postgres_server) == (0.0, 0)
        assert pending(redis_server, TICKS) == 30
    finally:
        daemon.kill()

    restarted = Twistd(tmp_path, *args, "--flush-interval", "0.2")
    try:
        restarted.wait_ready(port)
        poll(lambda: pending(redis_server, TICKS) == 0, 20, "read again and acknowledged")
        poll(lambda: stored(postgres_server) == (30.0, 3), 20, "every tick and event stored")
        assert redis_server.command("XLEN", "tickstock:history:ticks") == b":30\r\n"
        restarted.stop()
        assert stored(postgres_server) == (30.0, 3)
    finally:
        restarted.kill()


@pytest_twisted.ensureDeferred
async def test_written_in_two_parts_and_read_again_as_one_batch_counts_once(
        redis_server, postgres, postgres_cluster, daemons, monkeypatch) -> None:
    """
    The chaos run's failure: ticks written in two parts (two flushes), none
    acknowledged (Redis was down, say), then the daemon gone. The next
    daemon reads all of them again in one batch; it reads its tick marks
    first and makes no part of them: the bar's volume is every tick's once
    (before, the batch made one part beside the second: 60 of 40).
    """
    from tickstock.ingest import streams

    dbname = parse_dsn(postgres)["dbname"]

    def volume() -> float:
        return float(postgres_cluster.sql(
            "SELECT coalesce(sum(volume), 0) FROM ohlcv_1min WHERE symbol = 'AAA'", dbname)[0][0])

    first = daemons(redis=redis_server.url, mode="streams", postgres=postgres,
                    node_id="n2", flush_interval="0.1", canary_interval="0")
    await eventually(lambda: first.service.readiness()[0], 15, "ready")
    monkeypatch.setattr(streams.RedisStreamSource, "_ack", lambda self, entries: None)
    publish(redis_server, 0, 20)
    await eventually(lambda: volume() == 20.0, 15, "the first part written")
    publish(redis_server, 20, 20)
    await eventually(lambda: volume() == 40.0, 15, "the second part written")
    await first.service.stopService()  # its acknowledgements were lost
    monkeypatch.undo()
    assert pending(redis_server, TICKS) == 40
    assert postgres_cluster.sql("SELECT count(*) FROM ohlcv_1min_parts", dbname)[0][0] >= 2

    second = daemons(redis=redis_server.url, mode="streams", postgres=postgres,
                     node_id="n2", flush_interval="0.1", canary_interval="0")
    await eventually(lambda: pending(redis_server, TICKS) == 0, 15, "read again, acknowledged")
    await eventually(lambda: second.service.persister.pending == 0, 5, "written")
    assert second.service.persister.ticks == 0
    assert volume() == 40.0


def aaa(n: int) -> Any:
    """AAA's tick number C{n}, with the id the history gave it: C{1000+n}-0."""
    return parse_event(TICKS, orjson.dumps({"symbol": "AAA", "price": 10 + n % 7, "volume": n,
                                            "timestamp": MINUTE + n * 0.5}),
                       f"{1000 + n}-0", 0.0)


@pytest_twisted.ensureDeferred
async def test_persisters_killed_in_turn_over_postgresql_make_exact_bars(
        postgres, postgres_cluster, tmp_path: Path) -> None:
    """
    A streams-mode persister writes ticks 1-10 and 11-20 to PostgreSQL in
    two parts, then loses PostgreSQL and spills 21-30 to the spool (with
    their marks), and is killed with none of them acknowledged. The next run
    gets 6-30 again, and 31-35: it folds only 31-35, writes the spool back,
    and the bar is exactly that of ticks 1-35, in four parts, with the marks
    at tick 35 (the spool's older marks, written after, lower nothing).
    """
    dbname = parse_dsn(postgres)["dbname"]

    def sql(statement: str) -> list[Any]:
        return postgres_cluster.sql(statement, dbname)

    def run(store: PostgresStore, number: int) -> Persister:
        persister = Persister(reactor, store, f"n1:{number}", 0.05, 1000, str(tmp_path),
                              sealing=True)
        persister.startService()
        return persister

    stores = [PostgresStore(reactor, postgres, None, 2.0) for _ in range(2)]
    stores[0].startService()
    try:
        await eventually(lambda: stores[0].ready, 10, "store ready")
        first = run(stores[0], 1)

        async def durable(ticks: range) -> None:
            for n in ticks:
                first.add_tick(aaa(n))
            await first.when_durable(first.generation)

        await durable(range(1, 11))
        await durable(range(11, 21))
        assert sql("SELECT sum(volume) FROM ohlcv_1min") == [(sum(range(1, 21)),)]
        stores[0].writer.stop()  # PostgreSQL gone, for this run
        await durable(range(21, 31))
        assert len(list(tmp_path.glob("*.jsonl"))) == 1
        assert first._loop is not None
        first._loop.stop()  # killed

        stores[1].startService()
        await eventually(lambda: stores[1].ready, 10, "store ready")
        second = run(stores[1], 2)
        for n in range(6, 36):
            second.add_tick(aaa(n))
        await eventually(lambda: not list(tmp_path.glob("*.jsonl")) and second.pending == 0,
                         10, "the spool written back")
        assert second.ticks == 5
        prices = [10 + n % 7 for n in range(1, 36)]
        assert sql('SELECT open, high, low, close, volume FROM ohlcv_1min') == [
            (prices[0], max(prices), min(prices), prices[-1], sum(range(1, 36)))]
        assert [part for part, in sql("SELECT part FROM ohlcv_1min_parts ORDER BY part")] == [
            f"t:{1000 + n:013d}-{0:020d}" for n in (1, 11, 21, 31)]
        assert sql("SELECT node, symbol, tick_ms, tick_seq FROM ohlcv_1min_tick_marks") == [
            ("n1", "AAA", 1035, 0)]
        await second.stopService()
    finally:
        for store in stores:
            store.stopService()


@pytest_twisted.ensureDeferred
async def test_tick_marks_are_read_after_a_bar_write_under_way(postgres, postgres_cluster) -> None:
    """
    A write still running from before a crash holds the bar writers' lock:
    the marks are read once it committed, so they include its own.
    """
    dbname = parse_dsn(postgres)["dbname"]
    store = PostgresStore(reactor, postgres, None, 5.0)
    store.startService()
    writer = psycopg2.connect(postgres)
    try:
        await eventually(lambda: store.ready, 10, "store ready")
        with writer.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext('tickstock_write_bars')), "
                           "tickstock_mark_ticks('n1', ARRAY['AAA'], ARRAY[1700000000123], "
                           "ARRAY[7])")
        read: list[Any] = []
        store.tick_marks("n1").addBoth(read.append)
        await eventually(lambda: postgres_cluster.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%tickstock_tick_marks%'", dbname) == [(1,)], 5, "waiting")
        assert read == []
        writer.commit()
        await eventually(lambda: bool(read), 5, "read")
        assert read == [{"AAA": (1700000000123, 7)}]
    finally:
        writer.close()
        store.stopService()
