"""
Nothing acknowledged before it is durable (README, "What it promises"): in
streams mode an entry is acknowledged only once everything it must become
is in the Redis history and in PostgreSQL, or in the spool, fsynced. Faults
in combination, against real processes: PostgreSQL down, then the daemon
killed with SIGKILL during the outage; and a daemon that wrote to
PostgreSQL but died before acknowledging.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson
import pytest_twisted
from psycopg2.extensions import parse_dsn

from tests.servers import free_port, poll
from tests.test_startup import Twistd
from tests.wsclient import eventually
from tickstock.store.migrate import migrate

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
    from tickstock.bus import streams

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
