"""
End to end: the daemon's real service tree in the test reactor, the test's own
redis-server, events published with a real Redis client and received over
real WebSocket connections.
"""

from __future__ import annotations

import socket
from typing import Any

import orjson
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import LoopingCall, deferLater

from tests.test_jobs import job_listener  # noqa: F401 - fixture
from tests.wsclient import connect, eventually, http_get


def publish(redis: Any, channel: str, payload: dict[str, Any] | bytes) -> int:
    """PUBLISH with a real Redis client; the number of Redis subscribers."""
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    reply = redis.command("PUBLISH", channel, data)
    return int(reply[1:].strip())


def pattern(symbol: str = "AAPL", name: str = "Doji", confidence: float = 0.9,
            **extra: Any) -> dict[str, Any]:
    return {"event_type": "pattern_detected", "symbol": symbol, "pattern": name,
            "confidence": confidence, "timestamp": 1_700_000_000.5, **extra}


class Steady:
    """
    Publishes a pattern for C{symbol} every C{interval} seconds (events
    numbered C{n} = 0, 1, ...), so a test can check a client got each one
    once, in order, through whatever else it does meanwhile.
    """

    def __init__(self, redis: Any, symbol: str = "ZZZ", interval: float = 0.02) -> None:
        self.sent = 0
        self._redis, self._symbol = redis, symbol
        self._call = LoopingCall(self._publish)
        self._call.start(interval)

    def _publish(self) -> None:
        publish(self._redis, "tickstock.events.patterns", pattern(self._symbol, n=self.sent))
        self.sent += 1

    def stop(self) -> int:
        """Stop publishing; how many were sent."""
        if self._call.running:
            self._call.stop()
        return self.sent


async def ready(daemon: Any) -> None:
    await eventually(lambda: daemon.service.readiness()[0], 10, "daemon ready")


@pytest_twisted.ensureDeferred
async def test_one_event_per_channel(redis_server, daemons, job_listener):
    """
    A client subscribed to every topic receives one event from each producer
    channel of docs/contract.md §1, with the producer's fields (unknown ones kept),
    and its own backtest's progress and result.
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    client = await connect(daemon.port, hello=daemon.hello("alice"))
    for topic in ("patterns", "market_state", "backtests", "health", "ticks", "universe"):
        reply = await client.request({"op": "subscribe", "id": topic, "topic": topic}, "subscribed")
        assert reply["op"] == "subscribed", reply

    accepted = await client.request(
        {"op": "submit_backtest", "id": "r1", "params": {
            "symbols": ["AAPL"], "start_date": "2024-01-02", "end_date": "2024-03-01",
            "patterns": ["Doji"]}},
        "job_accepted",
    )
    job_id = accepted["job_id"]
    now = 1_700_000_000.0
    sent = {
        "tickstock.events.patterns": pattern(extra_field="kept"),
        "tickstock.events.market_state": {"event_type": "stage_change", "symbol": "MSFT",
                                          "timestamp": now, "metric": "stage"},
        "tickstock.events.backtesting.progress": {"job_id": job_id, "progress": 0.5,
                                                  "status": "running", "timestamp": now},
        "tickstock.events.backtesting.results": {
            "job_id": job_id, "completed_at": now,
            "results": {"win_rate": 0.5, "roi": 0.1, "sharpe_ratio": 1.2, "max_drawdown": 0.05}},
        "tickstock.health.status": {"service": "tickstockpl", "status": "healthy",
                                    "timestamp": now},
        "tickstock.data.ticks": {"symbol": "NVDA", "price": 120.5, "volume": 300, "timestamp": now},
        "tickstock.universe.updated": {"universe": "etf_growth", "symbols": ["QQQ"],
                                       "timestamp": now},
        "tickstock.cache.sync_complete": {"timestamp": now},
        "tickstock.etf.correlation_update": {"etf": "SPY", "timestamp": now},
        "tickstock.cache.ipo_assignment": {"symbol": "NEWCO", "timestamp": now},
        "tickstock.cache.delisting_cleanup": {"symbols": ["OLD"], "timestamp": now},
    }
    for channel, payload in sent.items():
        assert publish(redis_server, channel, payload) == 1

    await eventually(lambda: len(client.events()) == len(sent), 5, "every event")
    events = client.events()
    by_type = {e["type"]: e for e in events}
    assert set(by_type) == {
        "pattern_detected", "stage_change", "backtest_progress", "backtest_result", "health",
        "tick", "universe_updated", "cache_sync_complete", "etf_correlation_update",
        "ipo_assignment", "delisting_cleanup",
    }
    assert by_type["pattern_detected"]["sub"] == "patterns"
    assert by_type["pattern_detected"]["data"] == sent["tickstock.events.patterns"]
    assert by_type["backtest_result"]["sub"] == "backtests"
    assert by_type["tick"]["data"]["price"] == 120.5
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert len(set(ids)) == len(ids)


@pytest_twisted.ensureDeferred
async def test_submitted_job_reaches_the_producer(redis_server, daemons):
    """
    submit_backtest publishes the docs/contract.md §2 job on tickstock.jobs.backtest,
    with a job id assigned by TickStock and the submitting user.
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    from tickstock.config import parse_redis_url
    from tickstock.ingest.pubsub import RedisPubSubSource

    received: list[bytes] = []
    listener = RedisPubSubSource(reactor, parse_redis_url(redis_server.url),
                                 channels=["tickstock.jobs.backtest"])
    listener.listen(lambda channel, raw, key: received.append(raw))
    listener.startService()
    try:
        await eventually(lambda: listener.ready, 5, "job listener")
        client = await connect(daemon.port, hello=daemon.hello("bob"))
        accepted = await client.request({"op": "submit_backtest", "id": "r", "params": {
            "symbols": ["AAPL", "MSFT"], "start_date": "2023-01-02", "end_date": "2023-12-29",
            "patterns": []}}, "job_accepted")
        await eventually(lambda: received, 5, "job on Redis")
        job = orjson.loads(received[0])
        assert job["job_id"] == accepted["job_id"]
        assert job["job_type"] == "backtest" and job["user_id"] == "bob"
        assert job["symbols"] == ["AAPL", "MSFT"]
        assert (job["start_date"], job["end_date"]) == ("2023-01-02", "2023-12-29")
        assert isinstance(job["timestamp"], float)
    finally:
        await listener.stopService()


@pytest_twisted.ensureDeferred
async def test_filters_and_targeting(redis_server, daemons, job_listener):
    """
    A client for AAPL does not get MSFT; pattern and confidence filters hold;
    another user never sees a job's progress.
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    aapl = await connect(daemon.port, hello=daemon.hello("a"))
    msft = await connect(daemon.port, hello=daemon.hello("m"))
    picky = await connect(daemon.port, hello=daemon.hello("p"))
    await aapl.request({"op": "subscribe", "id": "s", "topic": "patterns",
                        "filter": {"symbols": ["AAPL"]}}, "subscribed")
    await msft.request({"op": "subscribe", "id": "s", "topic": "patterns",
                        "filter": {"symbols": ["MSFT"]}}, "subscribed")
    await picky.request({"op": "subscribe", "id": "s", "topic": "patterns",
                         "filter": {"patterns": ["Hammer"], "min_confidence": 0.8}}, "subscribed")
    await msft.request({"op": "subscribe", "id": "b", "topic": "backtests"}, "subscribed")
    job = await aapl.request({"op": "submit_backtest", "id": "r", "params": {
        "symbols": ["AAPL"], "start_date": "2024-01-02", "end_date": "2024-02-01"}}, "job_accepted")

    publish(redis_server, "tickstock.events.patterns", pattern("AAPL", "Doji", 0.9))
    publish(redis_server, "tickstock.events.patterns", pattern("MSFT", "Hammer", 0.7))
    publish(redis_server, "tickstock.events.patterns", pattern("MSFT", "Hammer", 0.85))
    publish(redis_server, "tickstock.events.backtesting.progress", {
        "job_id": job["job_id"], "progress": 0.25, "status": "running", "timestamp": 1.0})
    publish(redis_server, "tickstock.events.patterns", pattern("ZZZ", "Doji", 0.1, last=True))

    await eventually(lambda: len(msft.events("s")) == 2 and picky.events(), 5, "deliveries")
    await eventually(lambda: daemon.service.router.routed == 5, 5, "all routed")
    await deferLater(reactor, 0.05, lambda: None)
    assert [e["data"]["symbol"] for e in aapl.events()] == ["AAPL"]
    assert [e["data"]["symbol"] for e in msft.events("s")] == ["MSFT", "MSFT"]
    assert [(e["data"]["symbol"], e["data"]["confidence"]) for e in picky.events()] == [
        ("MSFT", 0.85)]
    assert msft.events("b") == []


@pytest_twisted.ensureDeferred
async def test_many_clients_get_every_event_in_order(redis_server, daemons):
    """
    Fifty clients on one symbol each receive all 40 events, in order, and a
    producer retry (the same event_id twice) once.
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    clients = [await connect(daemon.port, hello=daemon.hello(f"u{i}")) for i in range(50)]
    for client in clients:
        await client.request({"op": "subscribe", "id": "s1", "topic": "patterns",
                              "filter": {"symbols": ["AAPL"]}}, "subscribed")
    for n in range(40):
        publish(redis_server, "tickstock.events.patterns", pattern(seq=n))
    publish(redis_server, "tickstock.events.patterns", pattern(seq=99, event_id="retry-1"))
    publish(redis_server, "tickstock.events.patterns", pattern(seq=99, event_id="retry-1"))
    await eventually(lambda: daemon.service.router.duplicates == 1, 10, "the retry dropped")
    await eventually(lambda: all(len(c.events()) == 41 for c in clients), 10, "all deliveries")
    for client in clients:
        assert [e["data"]["seq"] for e in client.events()] == [*range(40), 99]
    assert daemon.service.broadcaster.delivered == 50 * 41


@pytest_twisted.ensureDeferred
async def test_malformed_events_are_dead_lettered_not_fatal(redis_server, daemons):
    """
    Messages that cannot be normalized are counted by channel and kind,
    kept in the bounded tickstock:deadletter list, and delivered to nobody;
    what can be understood (a lower-case symbol, an event type of the
    producer's own) is normalized and delivered.
    """
    daemon = daemons(redis=redis_server.url, deadletter_max=3)
    await ready(daemon)
    client = await connect(daemon.port, hello=daemon.hello("alice"))
    await client.request({"op": "subscribe", "id": "s", "topic": "patterns"}, "subscribed")
    bad = [
        b"not json",
        b'["a list"]',
        orjson.dumps({"symbol": "AAPL", "pattern": "Doji", "timestamp": 1.0}),
        orjson.dumps(pattern(confidence=1.5)),
        b'{"event_type":"pattern_detected","symbol":"AAPL","pattern":"Doji","confidence":NaN,"timestamp":1}',
        orjson.dumps(pattern(symbol="NOT A SYMBOL")),
        orjson.dumps(pattern(timestamp="yesterday")),
    ]
    for payload in bad:
        publish(redis_server, "tickstock.events.patterns", payload)
    publish(redis_server, "tickstock.events.patterns", pattern(symbol="aapl", liberal=1))
    publish(redis_server, "tickstock.events.patterns", pattern(event_type="mine", liberal=2))
    publish(redis_server, "tickstock.events.patterns", pattern(good=True))
    await eventually(lambda: len(client.events()) == 3, 5, "the good events")
    await eventually(lambda: daemon.service.router.received == len(bad) + 3, 5, "all received")
    events = client.events()
    assert [e["data"].get("liberal") for e in events] == [1, 2, None]
    assert events[0]["data"]["symbol"] == "AAPL" and events[1]["type"] == "pattern_detected"
    assert events[1]["data"]["event_type"] == "mine" and events[2]["data"]["good"] is True
    channel = "tickstock.events.patterns"
    assert dict(daemon.service.router.malformed) == {
        (channel, "not_json"): 2, (channel, "not_object"): 1, (channel, "missing_field"): 1,
        (channel, "bad_field"): 2, (channel, "bad_timestamp"): 1,
    }

    def dead_letters() -> list[dict[str, Any]]:
        reply = redis_server.command("LRANGE", "tickstock:deadletter", "0", "-1")
        return [orjson.loads(line) for line in reply.split(b"\r\n") if line.startswith(b"{")]

    await eventually(lambda: len(dead_letters()) == 3, 5, "dead letters trimmed to 3")
    newest = dead_letters()[0]
    assert newest["channel"] == "tickstock.events.patterns"
    assert newest["reason"] == "bad_timestamp: timestamp 'yesterday' not understood"
    assert "yesterday" in newest["raw"]


@pytest_twisted.ensureDeferred
async def test_redis_killed_and_restarted(redis_server, daemons):
    """
    Kill -9 Redis under a running daemon and start it again: /ready goes 503
    then 200, the gap is counted, the client stays connected, and events flow
    again within 2 s of Redis answering.
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    client = await connect(daemon.port, hello=daemon.hello("alice"))
    await client.request({"op": "subscribe", "id": "s", "topic": "patterns"}, "subscribed")
    publish(redis_server, "tickstock.events.patterns", pattern(n=1))
    await eventually(lambda: len(client.events()) == 1, 5, "first event")

    redis_server.kill()
    await eventually(lambda: not daemon.service.readiness()[0], 5, "not ready")
    status, body = await http_get(daemon.port, "/ready")
    assert status == 503 and body["components"]["source"]["state"] == "connecting"

    redis_server.start()
    back = reactor.seconds()
    await eventually(lambda: daemon.service.readiness()[0], 5, "resubscribed")
    assert reactor.seconds() - back < 2.0
    publish(redis_server, "tickstock.events.patterns", pattern(n=2))
    await eventually(lambda: len(client.events()) == 2, 2, "event after restart")
    assert client.close_code is None
    source = daemon.service.source.status()
    assert source["gaps"] == 1 and source["last_gap_seconds"] > 0
    await eventually(lambda: daemon.service.readiness()[0], 5, "link connected again")
    status, body = await http_get(daemon.port, "/ready")
    assert status == 200 and body["ready"] is True


@pytest_twisted.ensureDeferred
async def test_redis_paused_is_detected_by_heartbeat(redis_server, daemons):
    """
    A Redis stopped with SIGSTOP answers nothing: the PING heartbeat notices,
    the daemon drops and remakes the connection, and delivers again after
    SIGCONT.
    """
    daemon = daemons(redis=redis_server.url, redis_ping_interval=0.1, redis_ping_timeout=0.5)
    await ready(daemon)
    client = await connect(daemon.port, hello=daemon.hello("alice"))
    await client.request({"op": "subscribe", "id": "s", "topic": "patterns"}, "subscribed")
    redis_server.pause()
    try:
        await eventually(lambda: not daemon.service.source.ready, 5, "hung Redis detected")
        assert daemon.service.source.heartbeat_timeouts >= 1
    finally:
        redis_server.resume()
    await eventually(lambda: daemon.service.source.ready, 5, "reconnected")
    publish(redis_server, "tickstock.events.patterns", pattern())
    await eventually(lambda: len(client.events()) == 1, 2, "event after resume")


@pytest_twisted.ensureDeferred
async def test_supervisor_rebuilds_a_factory_that_gave_up(redis_server, daemons):
    """
    txredisapi stops reconnecting for good after a failed AUTH on reconnect
    (docs/internals.md §1): with Redis refusing new clients (maxclients) and the
    subscriber killed, the library gives up; once Redis accepts clients again
    the supervisor has rebuilt it and events flow.
    """
    redis_server.command("CONFIG", "SET", "requirepass", "s3cret")
    daemon = daemons(redis=f"redis://:s3cret@127.0.0.1:{redis_server.port}/0")
    await ready(daemon)
    client = await connect(daemon.port, hello=daemon.hello("alice"))
    await client.request({"op": "subscribe", "id": "s", "topic": "patterns"}, "subscribed")
    source = daemon.service.source

    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=2) as admin:
        def command(*args: str | bytes) -> bytes:
            admin.sendall(_resp("AUTH", "s3cret") + _resp(*args))
            return admin.recv(65536)

        command("CONFIG", "SET", "maxclients", "2")  # the link and this admin
        command("CLIENT", "KILL", "TYPE", "pubsub")
        await eventually(lambda: source.rebuilds >= 1, 10, "supervisor rebuild")
        command("CONFIG", "SET", "maxclients", "10000")
        await eventually(lambda: source.ready, 10, "subscribed again")
        command("PUBLISH", "tickstock.events.patterns", orjson.dumps(pattern()))
    await eventually(lambda: len(client.events()) == 1, 5, "event after rebuild")


def _resp(*parts: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_closed_others_unaffected(redis_server, daemons):
    """
    A client that stops reading fills its socket; its queue is bounded and it
    is closed with 4001 past the bound once its socket took nothing for
    --ws-ping-timeout, while a reading client on the same subscription gets
    every event.
    """
    daemon = daemons(redis=redis_server.url, client_queue_limit=50, ws_ping_timeout=1)
    await ready(daemon)
    reader = await connect(daemon.port, hello=daemon.hello("reader"))
    stuck = await connect(daemon.port, hello=daemon.hello("stuck"))
    for client in (reader, stuck):
        await client.request({"op": "subscribe", "id": "s", "topic": "patterns"}, "subscribed")
    stuck.transport.pauseProducing()
    filler = "x" * 16_000  # 16 MB in all: more than loopback's socket buffers hold
    total = 1000
    for n in range(total):
        publish(redis_server, "tickstock.events.patterns", pattern(n=n, pad=filler))
    await eventually(lambda: len(reader.events()) == total, 10, "reader got everything")
    await eventually(lambda: daemon.service.gateway.slow_consumers_closed == 1, 5,
                     "slow client closed")
    assert [e["data"]["n"] for e in reader.events()] == list(range(total))
    assert reader.close_code is None
    stuck.transport.resumeProducing()
    code, _ = await stuck.closed
    assert code in (4001, 1006)
    assert len(daemon.service.gateway.connections) == 1
