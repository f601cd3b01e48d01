"""
Redis Sentinel: the options, the endpoint against real sentinels, and a
failover under a running daemon (a master, a replica and one sentinel, all
real redis-server processes; the master is killed -9).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from tests.servers import RedisServer, SentinelServer, free_port, poll
from tests.test_end_to_end import pattern, publish, ready
from tests.wsclient import connect, eventually, http_get
from tickstock.config import ConfigError, load_settings
from tickstock.connections.sentinel import (
    SentinelEndpoint,
    SentinelError,
    client_endpoint,
)

PASSWORD = "s3nt1nel-pw"
NAME = "tsmaster"


def test_sentinel_options_parse():
    """
    host:port lists (default port 26379, IPv6 in brackets) become a Redis
    address that keeps --redis's password and db, and prints no password.
    """
    settings = load_settings({
        "redis": f"redis://:{PASSWORD}@ignored.invalid:1/3",
        "redis_sentinel": "10.0.0.1:26380, [::1]:5000,s3", "redis_master": NAME,
        "demo": True}, {})
    assert settings.redis_sentinel == (("10.0.0.1", 26380), ("::1", 5000), ("s3", 26379))
    address = settings.redis
    assert address.sentinels == settings.redis_sentinel and address.master == NAME
    assert (address.password, address.db) == (PASSWORD, 3)
    assert str(address) == f"redis+sentinel://10.0.0.1:26380,[::1]:5000,s3:26379/{NAME}/3"
    assert PASSWORD not in str(address)
    with pytest.raises(ValueError):
        address.endpoint()

    alone = load_settings({"redis_sentinel": "h:1", "redis_master": NAME, "demo": True}, {})
    assert str(alone.redis) == f"redis+sentinel://h:1/{NAME}/0"
    assert alone.redis.password is None and not alone.embedded


def test_sentinel_options_from_environment():
    """TICKSTOCK_REDIS_SENTINEL and TICKSTOCK_REDIS_MASTER work like the flags."""
    env = {"TICKSTOCK_REDIS_SENTINEL": "a:1,b:2", "TICKSTOCK_REDIS_MASTER": "m",
           "TICKSTOCK_DEMO": "1"}
    assert str(load_settings({}, env).redis) == "redis+sentinel://a:1,b:2/m/0"


@pytest.mark.parametrize("flags, message", [
    ({"redis_sentinel": "h:26379"}, "--redis-sentinel: give --redis-master too"),
    ({"redis_master": NAME}, "--redis-master: give --redis-sentinel too"),
    ({"redis_sentinel": "h:notaport", "redis_master": NAME}, "--redis-sentinel: bad port"),
    ({"redis_sentinel": "h:0", "redis_master": NAME}, "--redis-sentinel: bad port"),
    ({"redis_sentinel": "h:1,,h:2", "redis_master": NAME}, "--redis-sentinel: expected host:port"),
    ({"redis_sentinel": "h:1/x", "redis_master": NAME}, "--redis-sentinel: expected host:port"),
    ({"redis_sentinel": "h:1", "redis_master": NAME},
     "--jwt-secret-file: clients must authenticate"),
])
def test_sentinel_options_wrong(flags, message):
    """Both or neither; each wrong value is one line naming the flag."""
    with pytest.raises(ConfigError) as raised:
        load_settings({"demo": False, **flags}, {})
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


class Cluster:
    """A master, its replica and one sentinel watching them."""

    def __init__(self) -> None:
        self.master = RedisServer(password=PASSWORD)
        self.replica = RedisServer(password=PASSWORD, replicaof=self.master.port)
        self.sentinel = SentinelServer(self.master.port, NAME, password=PASSWORD)

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        # Sentinel learns of replicas from the master's INFO, asked at once
        # and then every 10 s: the replica must be listed there first.
        poll(lambda: b"master_link_status:up" in self.replica.command("INFO", "replication")
             and b",state=online," in self.master.command("INFO", "replication"),
             10, "replica in sync")
        self.sentinel.start()
        poll(lambda: self.sentinel.knows_replica(self.replica.port), 10, "sentinel sees replica")

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class _Recorder(Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.append(self)

    def connectionLost(self, reason: Any) -> None:
        self.factory.connected.remove(self)


@pytest_twisted.ensureDeferred
async def test_endpoint_asks_the_sentinels_in_turn(cluster):
    """
    A sentinel that accepts but never answers, and one that is not there,
    are skipped after the timeout; the live one then comes first; an
    unknown master name or no sentinel at all fails the connect.
    """
    mute = Factory.forProtocol(_Recorder)
    mute.connected = []
    silent = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(mute)
    try:
        silent_port = silent.getHost().port
        live = ("127.0.0.1", cluster.sentinel.port)
        endpoint = SentinelEndpoint(
            reactor, [("127.0.0.1", silent_port), ("127.0.0.1", free_port()), live], NAME, 0.3)
        factory = Factory.forProtocol(_Recorder)
        factory.connected = []
        start = reactor.seconds()
        protocol = await endpoint.connect(factory)
        assert 0.3 <= reactor.seconds() - start < 2
        assert protocol.transport.getPeer().port == cluster.master.port
        assert endpoint.master == ("127.0.0.1", cluster.master.port)
        protocol.transport.loseConnection()
        start = reactor.seconds()
        assert await endpoint.discover() == ("127.0.0.1", cluster.master.port)
        assert reactor.seconds() - start < 0.25, "the live sentinel is asked first now"

        with pytest.raises(SentinelError, match="does not know master 'nope'"):
            await client_endpoint(reactor, load_settings({
                "redis_sentinel": f"127.0.0.1:{cluster.sentinel.port}",
                "redis_master": "nope", "demo": True}, {}).redis).connect(factory)
        with pytest.raises(SentinelError, match="no sentinel knows master"):
            await SentinelEndpoint(reactor, [("127.0.0.1", free_port())], NAME,
                                   0.3).connect(factory)

        # Stopping the client cancels an attempt: its sentinel query hangs up.
        waiting = SentinelEndpoint(reactor, [("127.0.0.1", silent_port)], NAME, 30).connect(factory)
        await eventually(lambda: mute.connected, 5, "query connected")
        waiting.cancel()
        with pytest.raises(CancelledError):
            await waiting
        await eventually(lambda: not mute.connected, 5, "query closed")
    finally:
        await silent.stopListening()


@pytest_twisted.ensureDeferred
async def test_daemon_follows_a_failover(cluster, daemons):
    """
    The daemon finds the master through the sentinel; kill -9 the master,
    the sentinel promotes the replica, and the daemon is ready again on the
    new master: the same client, still connected, gets events published
    there. /ready names the sentinel address, never the password.
    """
    logged: list[dict[str, Any]] = []
    observe = logged.append
    globalLogPublisher.addObserver(observe)
    try:
        daemon = daemons(redis=f"redis://:{PASSWORD}@unused.invalid:1/0",
                         redis_sentinel=f"127.0.0.1:{cluster.sentinel.port}",
                         redis_master=NAME)
        await ready(daemon)
        status, body = await http_get(daemon.port, "/ready")
        assert status == 200
        expected = f"redis+sentinel://127.0.0.1:{cluster.sentinel.port}/{NAME}/0"
        assert body["components"]["source"]["address"] == expected
        assert PASSWORD.encode() not in orjson.dumps(body)

        client = await connect(daemon.port, hello=daemon.hello("alice"))
        await client.request({"op": "subscribe", "id": "s", "topic": "patterns"}, "subscribed")
        assert publish(cluster.master, "tickstock.events.patterns", pattern(n=1)) == 1
        await eventually(lambda: len(client.events()) == 1, 5, "event from the first master")

        cluster.master.kill()
        killed = reactor.seconds()
        await eventually(lambda: not daemon.service.readiness()[0], 5, "not ready")
        await eventually(lambda: cluster.sentinel.master_port_now() == cluster.replica.port,
                         15, "sentinel failover")
        switched = reactor.seconds() - killed
        await eventually(lambda: daemon.service.readiness()[0], 10, "ready on the new master")
        failover = reactor.seconds() - killed
        print(f"\nmaster killed: sentinel switched after {switched:.2f}s, "
              f"daemon ready after {failover:.2f}s")
        assert failover < 12

        assert publish(cluster.replica, "tickstock.events.patterns", pattern(n=2)) == 1
        await eventually(lambda: len(client.events()) == 2, 5, "event from the new master")
        assert [e["data"]["n"] for e in client.events()] == [1, 2]
        assert client.close_code is None
        assert daemon.service.source.status()["gaps"] == 1
        status, body = await http_get(daemon.port, "/ready")
        assert status == 200 and body["components"]["source"]["address"] == expected
        moved = [e for e in logged if "moved from" in e.get("log_format", "")]
        assert moved and moved[0]["port"] == cluster.replica.port
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_link_reconnects_when_its_redis_turns_read_only(redis_server):
    """
    A Redis made a replica under a live connection (as a demoted master)
    answers writes with READONLY: the link drops that connection, so the
    next one asks Sentinel again.
    """
    from txredisapi import ResponseError

    from tickstock.config import parse_redis_url
    from tickstock.connections.redis import RedisLink

    link = RedisLink(reactor, parse_redis_url(redis_server.url), deadletter_max=0)
    link.startService()
    try:
        await eventually(lambda: link.connected, 5, "link connected")
        first = link._redis.connection()
        await link.execute("SET", "k", "v")
        redis_server.command("REPLICAOF", "127.0.0.1", str(free_port()))
        with pytest.raises(ResponseError, match="READONLY"):
            await link.execute("SET", "k", "w")
        await eventually(lambda: link.connected and link._redis.connection() is not first,
                         5, "a new connection")
        assert await link.execute("GET", "k") == "v"
    finally:
        await link.stopService()
