"""
The daemon on the test's own Redis and PostgreSQL, end to end: ticks become
exact 1-minute bars with none lost across a PostgreSQL restart; pattern
events reach the C{events} table and the REST API; a client back after a gap
older than the Redis history catches up from PostgreSQL; universe filters
follow the universe as it changes; the API cache is invalidated by events.
"""

from __future__ import annotations

import random
import socket
from typing import Any

import orjson
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.servers import PostgresServer, RedisServer
from tests.wsclient import connect, eventually, http_get
from tickstock.store.migrate import migrate

TICKS = "tickstock.data.ticks"
PATTERNS = "tickstock.events.patterns"


def publish_many(redis: RedisServer, messages: list[tuple[str, bytes]]) -> None:
    """PUBLISH a batch over one pipelined connection (a real Redis client, no library)."""
    chunks = []
    for channel, data in messages:
        chunks.append(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            len(channel), channel.encode(), len(data), data))
    with socket.create_connection(("127.0.0.1", redis.port), timeout=10) as sock:
        sock.sendall(b"".join(chunks))
        replies = 0
        while replies < len(messages):
            replies += sock.recv(1 << 20).count(b"\r\n")


def pattern(symbol: str, n: int, name: str = "Doji") -> tuple[str, bytes]:
    return PATTERNS, orjson.dumps({"event_type": "pattern_detected", "symbol": symbol,
                                   "pattern": name, "confidence": 0.9,
                                   "timestamp": 1_700_000_000 + n, "n": n})


def expected_bars(ticks: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[float, ...]]:
    """OHLCV by hand: ticks in timestamp order within each symbol and minute."""
    bars: dict[tuple[str, int], list[float]] = {}
    for tick in sorted(ticks, key=lambda t: t["timestamp"]):
        key = (tick["symbol"], int(tick["timestamp"]) // 60 * 60)
        price, volume = tick["price"], tick["volume"]
        if key not in bars:
            bars[key] = [price, price, price, price, volume]
        else:
            bar = bars[key]
            bar[1], bar[2], bar[3] = max(bar[1], price), min(bar[2], price), price
            bar[4] += volume
    return {key: tuple(bar) for key, bar in bars.items()}


def stored_bars(pg: PostgresServer) -> dict[tuple[str, int], tuple[float, ...]]:
    rows = pg.sql("SELECT symbol, extract(epoch FROM \"timestamp\")::bigint, open, high, low, "
                  "close, volume FROM ohlcv_1min")
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


async def settled(daemon: Any, received: int, timeout: float = 60) -> None:
    """
    Wait until the daemon received C{received} messages, stored them (its
    persister gets each once stored) and wrote everything it holds.
    """
    service = daemon.service
    await eventually(lambda: service.router.received >= received and not service.router.in_flight,
                     timeout, "all received and stored")
    await eventually(
        lambda: service.persister.status()["pending"] == 0
        and service.persister.status()["spool_files"] == 0
        and service.persister.status()["in_flight"] == 0,
        timeout, "everything written")


@pytest_twisted.ensureDeferred
async def test_100k_ticks_across_a_postgres_restart(redis_server, postgres_server, daemons,
                                                    tmp_path) -> None:
    """
    100,000 ticks over 5 minutes of 20 symbols, PostgreSQL restarted in the
    middle (and down for a while): every bar equals the hand-computed
    OHLCV of its ticks, and the volumes add up to every tick's.
    """
    migrate(postgres_server.dsn())
    daemon = daemons(redis=redis_server.url, postgres=postgres_server.dsn(),
                     flush_interval="0.1", spool_dir=str(tmp_path))
    await eventually(lambda: daemon.service.readiness()[0], 15, "ready")
    rng = random.Random(5)
    symbols = [f"S{n:02d}" for n in range(20)]
    base = 1_700_000_000 // 60 * 60
    ticks = [{"symbol": symbols[n % 20], "price": round(rng.uniform(10, 20), 2),
              "volume": rng.randint(1, 500), "timestamp": base + n * 0.003}
             for n in range(100_000)]
    batches = [ticks[i:i + 5000] for i in range(0, len(ticks), 5000)]
    sent = 0
    for number, batch in enumerate(batches):
        publish_many(redis_server, [(TICKS, orjson.dumps(t)) for t in batch])
        sent += len(batch)
        await eventually(lambda sent=sent: daemon.service.router.received >= sent, 30,
                         "batch routed")
        if number == len(batches) // 2:
            postgres_server.stop_server()
            await eventually(lambda: not daemon.service.readiness()[0], 10, "not ready")
            status, body = await http_get(daemon.port, "/ready")
            assert status == 503 and body["components"]["store"]["state"] != "ready"
        if number == len(batches) // 2 + 3:
            assert daemon.service.persister.status()["write_failures"] > 0
            postgres_server.start()
    await settled(daemon, len(ticks))
    assert daemon.service.router.routed == len(ticks)
    assert stored_bars(postgres_server) == expected_bars(ticks)
    total = postgres_server.sql("SELECT sum(volume), count(*) FROM ohlcv_1min")[0]
    assert total == (sum(t["volume"] for t in ticks), 20 * 5)
    await eventually(lambda: daemon.service.readiness()[0], 15, "ready again")


@pytest_twisted.ensureDeferred
async def test_patterns_reach_the_api_and_the_cache_follows_events(redis_server, postgres,
                                                                   daemons) -> None:
    """
    Pattern events land in PostgreSQL and come back from /api/patterns,
    newest first; a cached answer is dropped when the producer says the
    cache was synced.
    """
    daemon = daemons(redis=redis_server.url, postgres=postgres, flush_interval="0.05",
                     api_cache_ttl="600")
    await eventually(lambda: daemon.service.readiness()[0], 15, "ready")
    headers = {b"authorization": [b"Bearer " + daemon.hello("ann")["token"].encode()]}
    publish_many(redis_server, [pattern("AAPL", n) for n in range(3)])
    await settled(daemon, 3)
    status, body = await http_get(daemon.port, "/api/patterns?symbol=AAPL", headers)
    assert status == 200 and [p["data"]["n"] for p in body["patterns"]] == [2, 1, 0]
    publish_many(redis_server, [pattern("AAPL", 3)])
    await settled(daemon, 4)
    _, cached = await http_get(daemon.port, "/api/patterns?symbol=AAPL", headers)
    assert len(cached["patterns"]) == 3, "served from the cache"
    hits = daemon.service.cache.hits
    assert hits >= 1
    publish_many(redis_server, [("tickstock.cache.sync_complete",
                                 orjson.dumps({"timestamp": 1_700_000_100}))])
    await eventually(lambda: daemon.service.router.routed >= 5, 10, "sync event")

    async def fresh() -> bool:
        _, body = await http_get(daemon.port, "/api/patterns?symbol=AAPL", headers)
        return len(body["patterns"]) == 4

    for _ in range(100):
        if await fresh():
            break
        await deferLater(reactor, 0.02, lambda: None)
    else:
        raise AssertionError("the cache was not invalidated")
    status, _ = await http_get(daemon.port, "/api/patterns?symbol=AAPL")
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_a_resume_older_than_the_redis_history_catches_up_from_postgres(
        redis_server, postgres, daemons) -> None:
    """
    The Redis history keeps 5 events per topic; a client away for 300
    patterns resumes and gets every one for its symbols from PostgreSQL,
    in order, once, then live events, with C{recovered: true}.
    """
    daemon = daemons(redis=redis_server.url, postgres=postgres, history_max="5",
                     flush_interval="0.05")
    await eventually(lambda: daemon.service.readiness()[0], 15, "ready")
    client = await connect(daemon.port, hello=daemon.hello("bo"))
    await client.request({"op": "subscribe", "id": "p", "topic": "patterns",
                          "filter": {"symbols": ["AAPL"]}}, "subscribed")
    publish_many(redis_server, [pattern("AAPL", 0)])
    await eventually(lambda: client.events("p"), 5, "first event")
    last_id = client.events("p")[-1]["id"]
    client.transport.loseConnection()
    await client.closed

    publish_many(redis_server, [pattern("AAPL" if n % 3 else "MSFT", n) for n in range(1, 301)])
    await settled(daemon, 301)
    assert daemon.service.history.status()  # the history trimmed: only a few are left in Redis

    back = await connect(daemon.port, hello={**daemon.hello("bo"), "resume": {"last_id": last_id}})
    reply = await back.request({"op": "subscribe", "id": "p", "topic": "patterns",
                                "filter": {"symbols": ["AAPL"]}}, "subscribed")
    assert reply["recovered"] is True, reply
    wanted = [n for n in range(1, 301) if n % 3]
    await eventually(lambda: len(back.events("p")) >= len(wanted), 10, "the catch-up")
    assert [e["data"]["n"] for e in back.events("p")] == wanted
    publish_many(redis_server, [pattern("AAPL", 301)])
    await eventually(lambda: back.events("p")[-1]["data"]["n"] == 301, 5, "live after catch-up")
    assert len(back.events("p")) == len(wanted) + 1


@pytest_twisted.ensureDeferred
async def test_universe_filters_follow_the_universe(redis_server, postgres, postgres_cluster,
                                                    daemons) -> None:
    """
    A subscription to universe etf_growth gets its symbols' events only;
    when the producer adds a symbol and says so, that symbol's events
    arrive too, without a new subscribe.
    """
    dbname = postgres.split("dbname=")[1].split()[0]
    postgres_cluster.sql("SELECT update_etf_universe('etf_growth', ARRAY['QQQ'])", dbname)
    daemon = daemons(redis=redis_server.url, postgres=postgres)
    await eventually(lambda: daemon.service.readiness()[0], 15, "ready")
    client = await connect(daemon.port, hello=daemon.hello("cy"))
    reply = await client.request({"op": "subscribe", "id": "u", "topic": "patterns",
                                  "filter": {"universe": "etf_growth"}}, "subscribed")
    assert reply["op"] == "subscribed", reply
    unknown = await client.request({"op": "subscribe", "id": "x", "topic": "patterns",
                                    "filter": {"universe": "nope"}}, "subscribed")
    assert unknown["code"] == "unknown_universe"
    publish_many(redis_server, [pattern("VUG", 1), pattern("QQQ", 2)])
    await eventually(lambda: client.events("u"), 5, "QQQ event")
    postgres_cluster.sql("SELECT update_etf_universe('etf_growth', ARRAY['QQQ', 'VUG'])", dbname)
    publish_many(redis_server, [("tickstock.universe.updated", orjson.dumps(
        {"timestamp": 1_700_000_000, "universe": "etf_growth"}))])
    await eventually(lambda: daemon.service.universes.refreshes == 1, 5, "refresh")
    subs = [sub for state in daemon.service.gateway.connections.values()
            for sub in state.subscriptions.values()]
    await eventually(lambda: "VUG" in subs[0].filter.symbols, 5, "VUG added")
    publish_many(redis_server, [pattern("VUG", 3), pattern("SPY", 4), pattern("QQQ", 5)])
    await eventually(lambda: len(client.events("u")) == 3, 5, "VUG and QQQ events")
    assert [(e["data"]["symbol"], e["data"]["n"]) for e in client.events("u")] == \
        [("QQQ", 2), ("VUG", 3), ("QQQ", 5)]
