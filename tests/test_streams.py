"""
Streams mode (zero loss) with real processes: the test's own redis-server
(append-only, fsync always), the daemon as a real C{twistd} process, and a
producer process; Redis and the daemon are killed -9 and restarted while
events flow, and a resuming WebSocket client must see every event once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.conftest import TEST_SECRET
from tests.servers import RedisServer, free_port
from tests.wsclient import connect, eventually, http_get
from tickstock.deliver.auth import JWTAuthenticator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TwistdDaemon:
    """C{twistd -n tickstock} in its own process, to be killed -9."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.args = [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n",
                     "--pidfile=", "-l", "-", "tickstock",
                     "--listen", f"tcp:{self.port}:interface=127.0.0.1", *args]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    async def ready(self, timeout: float = 30) -> None:
        deadline = reactor.seconds() + timeout
        while True:
            try:
                status, _ = await http_get(self.port, "/ready")
                if status == 200:
                    return
            except Exception:
                pass
            if reactor.seconds() > deadline:
                raise AssertionError("daemon not ready in time")
            await deferLater(reactor, 0.1, lambda: None)


class ResumingClient:
    """
    A browser-like client: subscribes to patterns, keeps the last event id
    it saw, and whenever the connection drops, reconnects with C{resume}.
    """

    def __init__(self, daemon: TwistdDaemon, token: str) -> None:
        self.daemon = daemon
        self.token = token
        self.done: list[dict[str, Any]] = []
        self.current: Any = None
        self.connections = 0
        self.replies: list[dict[str, Any]] = []
        self.stopped = False

    def events(self) -> list[dict[str, Any]]:
        return self.done + (self.current.events() if self.current is not None else [])

    async def run(self) -> None:
        while not self.stopped:
            seen = self.events()
            hello: dict[str, Any] = {"token": self.token}
            if seen:
                hello["resume"] = {"last_id": seen[-1]["id"]}
            try:
                conn = await connect(self.daemon.port, hello=hello)
            except Exception:
                await deferLater(reactor, 0.1, lambda: None)
                continue
            self.connections += 1
            self.current = conn
            self.replies.append(await conn.request(
                {"op": "subscribe", "id": "p", "topic": "patterns"}, "subscribed", timeout=30))
            await conn.closed
            self.done.extend(conn.events())
            self.current = None


@pytest_twisted.ensureDeferred
async def test_streams_nothing_lost_when_redis_and_the_daemon_are_killed(secret_file):
    """
    10,000 producer entries; Redis is killed -9 and restarted (AOF), then
    the daemon is killed -9 and restarted, while they flow. The client,
    resuming after each drop, receives every entry exactly once, in order
    per symbol.
    """
    total = 10_000
    redis = RedisServer(appendonly=True)
    redis.start()
    daemon = TwistdDaemon("--redis", redis.url, "--mode", "streams", "--node-id", "node-1",
                          "--jwt-secret-file", secret_file)
    producer = None
    client = None
    try:
        daemon.start()
        await daemon.ready()
        token = JWTAuthenticator(TEST_SECRET).mint("alice", time.time(), 3600)
        client = ResumingClient(daemon, token)
        running = client.run()
        from twisted.internet.defer import ensureDeferred
        loop = ensureDeferred(running)
        await eventually(lambda: client.current is not None and client.replies, 10, "subscribed")

        producer = subprocess.Popen(
            [sys.executable, "-m", "tests.stream_producer", str(redis.port), str(total), "1500"],
            cwd=ROOT, stdout=subprocess.PIPE)
        await eventually(lambda: len(client.events()) >= 2000, 30, "2000 events")
        redis.kill()
        await deferLater(reactor, 0.5, lambda: None)  # the producer keeps retrying meanwhile
        redis.start()
        await eventually(lambda: len(client.events()) >= 5000, 30, "5000 events")
        daemon.kill()
        daemon.start()
        await eventually(lambda: len(client.events()) >= total, 60, "every event")
        output, _ = producer.communicate(timeout=30)
        assert producer.returncode == 0
        report = json.loads(output)
        await deferLater(reactor, 0.5, lambda: None)  # nothing extra may follow

        events = client.events()
        ids = [e["data"]["event_id"] for e in events]
        twice = {i for i in ids if ids.count(i) > 1} if len(ids) != len(set(ids)) else set()
        assert len(ids) == total and len(set(ids)) == total, (
            len(ids), len(set(ids)),
            sorted((e["data"]["event_id"], e["id"]) for e in events
                   if e["data"]["event_id"] in twice)[:6],
            [(n, e["id"]) for n, e in enumerate(events) if e["data"]["event_id"] in twice][:4],
            len(client.done),
            client.replies)
        by_symbol: dict[str, list[int]] = {}
        for e in events:
            by_symbol.setdefault(e["data"]["symbol"], []).append(e["data"]["n"])
        assert all(ns == sorted(ns) for ns in by_symbol.values())
        assert client.connections >= 2 and all(
            r.get("recovered", True) for r in client.replies), client.replies
        sys.stderr.write(json.dumps({"streams_fault_test": {
            "delivered": len(ids), "lost": total - len(set(ids)),
            "duplicates": len(ids) - len(set(ids)), "producer_retries": report["retries"],
            "client_connections": client.connections}}) + "\n")
        client.stopped = True
        if client.current is not None:
            client.current.transport.loseConnection()
        await loop
    finally:
        if producer is not None and producer.poll() is None:
            producer.kill()
        daemon.kill()
        redis.stop()


@pytest_twisted.ensureDeferred
async def test_graceful_stop_acknowledges_what_it_read(redis_server, daemons):
    """
    Stopping a streams daemon while entries flow finishes the batch in hand:
    nothing it read is left pending, and a daemon started afterwards stores
    the rest, so the history holds every entry exactly once.
    """
    import orjson

    from tests.test_end_to_end import pattern

    total = 3000
    first = daemons(redis=redis_server.url, mode="streams", node_id="n1")
    await eventually(lambda: first.service.readiness()[0], 10, "ready")
    for n in range(total):
        redis_server.command("XADD", "tickstock.events.patterns", "*", "data",
                             orjson.dumps(pattern(n=n)))
        if n == total // 3:
            await eventually(lambda: first.service.router.received > 0, 10, "reading")
            stopping = first.service.stopService()
    await stopping
    pending = redis_server.command("XPENDING", "tickstock.events.patterns", "tickstock")
    assert pending.startswith(b"*4\r\n:0\r\n"), (pending[:40], first.service.source.status())

    second = daemons(redis=redis_server.url, mode="streams", node_id="n2")
    await eventually(lambda: second.service.readiness()[0], 10, "ready")

    def stored() -> int:
        return int(redis_server.command("XLEN", "tickstock:history:patterns")[1:].strip())

    # Routed: producer entries stored (not the daemons' own canaries).
    await eventually(lambda: first.service.router.routed + second.service.router.routed
                     >= total, 20, "every entry stored")
    assert stored() == total
    assert first.service.router.routed + second.service.router.routed == total


@pytest_twisted.ensureDeferred
async def test_groups_are_recreated_after_redis_lost_its_data(redis_server, daemons):
    """
    Redis restarted without persistence forgets the consumer group, and a
    group destroyed under a live connection answers NOGROUP: either way the
    daemon recreates the groups from 0 and what the producer writes next is
    delivered.
    """
    import orjson

    from tests.test_end_to_end import pattern

    daemon = daemons(redis=redis_server.url, mode="streams")
    await eventually(lambda: daemon.service.readiness()[0], 10, "ready")
    client = await connect(daemon.port, hello=daemon.hello("alice"))
    await client.request({"op": "subscribe", "id": "p", "topic": "patterns"}, "subscribed")
    redis_server.command("XADD", "tickstock.events.patterns", "*", "data",
                         orjson.dumps(pattern(n=1, event_id="e1")))
    await eventually(lambda: len(client.events()) == 1, 10, "first event")
    redis_server.kill()
    redis_server.start()
    redis_server.command("XADD", "tickstock.events.patterns", "*", "data",
                         orjson.dumps(pattern(n=2, event_id="e2")))
    await eventually(lambda: len(client.events()) == 2, 15, "event after the restart")
    # The same, answered as NOGROUP on a live connection. The stream is
    # still there, so the new group re-reads it from 0: its event_ids make
    # those re-reads duplicates (or, for one not yet acknowledged when the
    # group went, it is the entry already in hand): none is delivered again,
    # and every one is acknowledged.
    redis_server.command("XGROUP", "DESTROY", "tickstock.events.patterns", "tickstock")
    redis_server.command("XADD", "tickstock.events.patterns", "*", "data",
                         orjson.dumps(pattern(n=3, event_id="e3")))
    await eventually(lambda: len(client.events()) >= 3, 15, "event after NOGROUP")
    await eventually(lambda: redis_server.command(
        "XPENDING", "tickstock.events.patterns", "tickstock").startswith(b"*4\r\n:0\r\n"),
        5, "the re-read acknowledged")
    assert [e["data"]["n"] for e in client.events()] == [1, 2, 3]
    assert "NOGROUP" in (daemon.service.source.last_error or "")


@pytest_twisted.ensureDeferred
async def test_entries_a_dead_consumer_left_pending_are_claimed(redis_server, daemons,
                                                                 monkeypatch):
    """
    Entries another consumer read and never acknowledged (it died) are
    claimed with XAUTOCLAIM and delivered, once.
    """
    import orjson

    from tests.test_end_to_end import pattern
    from tickstock.ingest import streams

    monkeypatch.setattr(streams, "CLAIM_MIN_IDLE_MS", 0)
    channel = "tickstock.events.patterns"
    redis_server.command("XGROUP", "CREATE", channel, "tickstock", "0", "MKSTREAM")
    for n in range(5):
        redis_server.command("XADD", channel, "*", "data", orjson.dumps(pattern(n=n)))
    redis_server.command("XREADGROUP", "GROUP", "tickstock", "ghost", "COUNT", "5",
                         "STREAMS", channel, ">")
    daemon = daemons(redis=redis_server.url, mode="streams", node_id="alive")
    await eventually(lambda: daemon.service.source.claimed == 5, 10, "claimed")
    await eventually(lambda: daemon.service.router.routed == 5, 10, "stored")
    await eventually(lambda: redis_server.command("XPENDING", channel, "tickstock").startswith(
        b"*4\r\n:0\r\n"), 10, "acknowledged once durable")
    stored = redis_server.command("XLEN", "tickstock:history:patterns")
    assert stored == b":5\r\n"
