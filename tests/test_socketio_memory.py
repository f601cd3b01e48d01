"""
Socket.IO at C{/socket.io/} over an in-memory transport, as
tests/test_protocol_memory.py tests C{/ws}: the real site, Engine.IO
server, Socket.IO sessions, gateway and delivery path on one side; on the
other, raw HTTP/1.1 requests (long-polling) and an Autobahn client (the
WebSocket transport), bytes moved by C{twisted.test.iosim}, time kept by a
L{Clock}. So heartbeats, timeouts and the upgrade's ordering are tested
deterministically, with no port and no wall clock.

The official clients (C{socket.io-client} in Node and Chromium,
C{python-socketio}) against the daemon are in tests/test_socketio_clients.py
and tests/test_socketio_python.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface.verify import verifyObject

from tests.servers import RedisServer
from tests.test_protocol_memory import (
    HEALTH,
    HELLO_TIMEOUT,
    PATTERNS,
    PING_INTERVAL,
    PING_TIMEOUT,
    QUEUE_LIMIT,
    ClockTimer,
    Server,
)
from tests.test_units import ADDRESS
from tests.wsclient import eventually
from tickstock.config import parse_redis_url
from tickstock.connections.redis import RedisLink
from tickstock.deliver.broadcast import Broadcaster, Filter
from tickstock.domain.events import id_key
from tickstock.domain.interfaces import IClient, IReporting, ISessionRecords
from tickstock.history.redis.sessions import RedisSessionRecords
from tickstock.history.sessions import MemorySessionRecords
from tickstock.ingest.normalize import parse_event
from tickstock.web.socketio.engine import EngineServer, EngineWebSocketFactory
from tickstock.web.socketio.packets import BadPacket, decode, legacy_frame, native_frame
from tickstock.web.socketio.session import SocketIOSession

HOST = "tickstock.test"


class SocketIOServer(Server):
    """The in-memory server of tests/test_protocol_memory.py, with C{/socket.io/} on its site."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, 65536)
        # Every session also has its backtests and system_health subscriptions.
        self.gateway._max_subscriptions = 5
        factory = EngineWebSocketFactory(
            allowed_origins=(), max_message_size=4096, queue_limit=QUEUE_LIMIT,
            ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT, handshake_timeout=5.0,
            clock=clock)
        factory._batched_timer = ClockTimer(clock)
        factory.gateway = self.gateway
        self.records = MemorySessionRecords(clock)
        self.engine = EngineServer(
            factory, lambda server, address: SocketIOSession(server, address, self.gateway,
                                                             self.records),
            ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT, max_payload=4096,
            records=self.records)
        self.site.resource.putChild(b"socket.io", self.engine)


class HTTPClient(Protocol):
    """Writes raw HTTP/1.1 requests and splits what comes back into (status, body) answers."""

    def __init__(self) -> None:
        self.buffer = b""
        self.answers: list[tuple[int, bytes]] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines
                          if line.lower().startswith(b"content-length:"))
            if len(rest) < length:
                return
            self.answers.append((int(lines[0].split()[1]), rest[:length]))
            self.buffer = rest[length:]


class Packets(WebSocketClientProtocol):
    """An Autobahn client keeping each Engine.IO packet (text frame) it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.packets: list[bytes] = []
        self.closed: int | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.packets.append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = code


def connect(server: SocketIOServer, client: Any) -> iosim.IOPump:
    channel = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = iosim.FakeTransport(channel, isServer=True,
                                    peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    return iosim.connect(channel, transport, client, iosim.makeFakeClient(client),
                         clock=server.clock)


class Polling:
    """A long-polling client: one HTTP connection for its GETs, one for its POSTs."""

    def __init__(self, server: SocketIOServer) -> None:
        self.server = server
        self.gets, self.posts = HTTPClient(), HTTPClient()
        self.get_pump, self.post_pump = connect(server, self.gets), connect(server, self.posts)
        status, body = self.request(self.gets, self.get_pump, b"GET", b"")
        assert status == 200 and body[:1] == b"0"
        self.open = orjson.loads(body[1:])
        self.sid = self.open["sid"]

    def request(self, client: HTTPClient, pump: iosim.IOPump, method: bytes, body: bytes,
                sid: bool = True) -> tuple[int, bytes]:
        path = b"/socket.io/?EIO=4&transport=polling"
        if sid and hasattr(self, "sid"):
            path += b"&sid=" + self.sid.encode()
        before = len(client.answers)
        pump.client.transport.write(  # type: ignore[attr-defined]
            method + b" " + path + b" HTTP/1.1\r\nHost: " + HOST.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        pump.flush()
        return client.answers.pop(before) if len(client.answers) > before else (0, b"")

    def post(self, *packets: bytes) -> int:
        status, body = self.request(self.posts, self.post_pump, b"POST", b"\x1e".join(packets))
        return status

    def poll(self) -> list[bytes]:
        """One GET: the packets it was answered with ([] while it is held)."""
        status, body = self.request(self.gets, self.get_pump, b"GET", b"")
        return [] if status == 0 else body.split(b"\x1e")

    def held(self) -> list[bytes]:
        """The packets a held GET has been answered with since, if it has."""
        self.get_pump.flush()
        if not self.gets.answers:
            return []
        status, body = self.gets.answers.pop(0)
        return body.split(b"\x1e")

    def connect(self, **auth: Any) -> list[bytes]:
        assert self.post(b"40" + orjson.dumps(auth)) == 200
        return self.poll()


def events(packets: list[bytes]) -> list[list[Any]]:
    """The Socket.IO EVENT packets' arguments, name first."""
    return [orjson.loads(p[2:]) for p in packets if p.startswith(b"42")]


@pytest.fixture
def server() -> SocketIOServer:
    clock = Clock()
    clock.advance(1_700_000_000)
    return SocketIOServer(clock)


def test_polling_handshake_connect_and_filtered_events(server: SocketIOServer) -> None:
    """
    The handshake opens a session with the configured ping times; CONNECT
    is the hello (40 with sid and pid, then connection_confirmed); an acked
    subscribe is answered on its ack; a held poll is answered with the
    matching event as soon as it is published, its id as the last argument.
    """
    client = Polling(server)
    assert client.open["upgrades"] == ["websocket"]
    assert client.open["pingInterval"] == PING_INTERVAL * 1000
    assert client.open["maxPayload"] == 4096
    packets = client.connect(user="alice")
    assert packets[0].startswith(b"40")
    connected = orjson.loads(packets[0][2:])
    assert set(connected) == {"sid", "pid"}
    (confirmed,) = [e for e in events(packets) if e[0] == "connection_confirmed"]
    assert confirmed[1]["user_id"] == "alice" and confirmed[1]["recovered"] is False
    assert confirmed[2] == confirmed[1]["offset"]
    assert client.post(b'425["subscribe",{"topic":"patterns","filter":{"symbols":["AAPL"],'
                       b'"min_confidence":0.8}}]') == 200
    assert client.poll() == [b'435[{"op":"subscribed","id":"sub-1"}]']
    assert client.poll() == []  # held
    server.publish(PATTERNS, symbol="AAPL", pattern="Doji", confidence=0.5)
    server.publish(PATTERNS, symbol="MSFT", pattern="Doji", confidence=0.9)
    assert client.held() == []
    server.publish(PATTERNS, symbol="AAPL", pattern="Hammer", confidence=0.9)
    (event,) = events(client.held())
    assert event[0] == "event" and event[1]["sub"] == "sub-1"
    assert event[1]["data"]["pattern"] == "Hammer" and event[2] == event[1]["id"]


def test_original_events_and_their_shapes(server: SocketIOServer) -> None:
    """
    subscribe_patterns and subscribe_tickers answer as the original system
    did and deliver pattern_alert and tick_data in its shape; system_health
    reaches every connection; heartbeat is answered with heartbeat_ack.
    """
    client = Polling(server)
    client.connect(user="alice")
    client.post(b'42["subscribe_patterns",{"patterns":["Doji"]}]',
                b'42["heartbeat",{"timestamp":5}]')
    (confirmed, ack) = events(client.poll())
    assert confirmed[0] == "subscription_confirmed"
    assert confirmed[1]["patterns"] == ["Doji"] and confirmed[1]["count"] == 1
    assert ack[0] == "heartbeat_ack" and ack[1]["client_timestamp"] == 5
    client.poll()
    server.publish(PATTERNS, symbol="AAPL", pattern="Hammer", confidence=0.9)
    server.publish(PATTERNS, symbol="AAPL", pattern="Doji", confidence=0.9, source="engine")
    (alert,) = events(client.held())
    assert alert[0] == "pattern_alert"
    body = alert[1]
    assert body["type"] == "pattern_alert" and body["id"] == alert[2]
    assert set(body["event"]) == {"event_type", "source", "timestamp", "data", "channel"}
    assert body["event"]["event_type"] == "pattern_detected"
    assert body["event"]["source"] == "engine" and body["event"]["channel"] == PATTERNS
    assert body["event"]["data"]["pattern"] == "Doji"
    client.poll()
    server.publish(HEALTH, service="engine", status="healthy")
    (health,) = events(client.held())
    assert health[0] == "system_health" and health[1]["event"]["data"]["status"] == "healthy"
    client.post(b'42["subscribe_tickers",{"tickers":["AAPL"]}]')
    (updated,) = events(client.poll())
    assert updated[0] == "subscription_updated" and updated[1]["tickers"] == ["AAPL"]


def test_offsets_off_for_one_argument_handlers(server: SocketIOServer) -> None:
    """With auth C{offsets: false}, events carry no offset argument."""
    client = Polling(server)
    client.connect(user="alice", offsets=False)
    client.post(b'42["subscribe",{"topic":"patterns"}]')
    client.poll()
    client.poll()
    server.publish(PATTERNS, symbol="AAPL", pattern="Doji", confidence=0.9)
    (event,) = events(client.held())
    assert len(event) == 2 and event[1]["data"]["symbol"] == "AAPL"


def test_a_session_that_stops_polling_is_closed_after_the_ping_timeout(
        server: SocketIOServer) -> None:
    """
    The server pings every ping interval; a session that answers stays, one
    that does not poll (so cannot pong) is closed ping_timeout later and
    forgotten by the engine and the gateway.
    """
    client = Polling(server)
    client.connect(user="alice")
    client.poll()  # held
    server.clock.advance(PING_INTERVAL)
    assert client.held() == [b"2"]
    client.post(b"3")
    server.clock.advance(PING_INTERVAL)
    assert client.poll() == [b"2"]
    server.clock.advance(PING_TIMEOUT)
    assert not server.engine.sessions and not server.gateway.connections
    assert server.engine.pongs_missed == 1
    assert client.poll() == [b"1"]  # its next poll is told it is closed, once
    status, body = client.request(client.gets, client.get_pump, b"GET", b"")
    assert status == 400 and orjson.loads(body)["code"] == 1
    server.clock.advance(PING_TIMEOUT)
    assert not server.engine._farewells


def test_the_outbox_conflates_latest_only_events_and_bounds_the_rest(
        server: SocketIOServer) -> None:
    """
    While nobody polls, a latest-only event replaces the queued one with
    its key, and past the queue bound of must-deliver events the session
    is closed as a slow consumer, so its client reconnects and recovers.
    """
    client = Polling(server)
    client.connect(user="alice")
    client.post(b'42["subscribe",{"topic":"health"}]')
    for n in range(3):
        server.publish(HEALTH, service="engine", status="healthy", note=f"n{n}")
    health = [e for e in events(client.poll()) if e[0] == "event"]
    assert [e[1]["data"]["note"] for e in health] == ["n2"]
    client.post(b'42["subscribe",{"topic":"patterns"}]')
    client.poll()
    for n in range(QUEUE_LIMIT + 1):
        server.publish(PATTERNS, symbol="AAPL", pattern=f"P{n}", confidence=0.9)
    assert not server.gateway.connections
    assert server.gateway.slow_consumers_closed == 1


def test_upgrade_to_websocket_keeps_order(server: SocketIOServer) -> None:
    """
    The upgrade as socket.io-client does it: a WebSocket with the sid sends
    2probe and gets 3probe, the held poll is ended with a noop, then 5; what
    waited for a poll goes out on the WebSocket first, in order, then live.
    """
    client = Polling(server)
    client.connect(user="alice")
    client.post(b'42["subscribe",{"topic":"patterns"}]')
    client.poll()
    client.poll()  # held
    factory = WebSocketClientFactory(
        f"ws://{HOST}/socket.io/?EIO=4&transport=websocket&sid={client.sid}",
        reactor=server.clock)
    factory.protocol = Packets
    factory._batched_timer = ClockTimer(server.clock)
    ws: Packets = factory.buildProtocol(None)
    pump = connect(server, ws)
    ws.sendMessage(b"2probe")
    pump.flush()
    assert ws.packets == [b"3probe"]
    assert client.held() == [b"6"]
    server.publish(PATTERNS, symbol="AAPL", pattern="First", confidence=0.9)
    ws.sendMessage(b"5")
    pump.flush()
    server.publish(PATTERNS, symbol="AAPL", pattern="Second", confidence=0.9)
    pump.flush()
    got = [e[1]["data"]["pattern"] for e in events(ws.packets[1:])]
    assert got == ["First", "Second"]
    assert server.engine.upgrades == 1
    status, _ = client.request(client.gets, client.get_pump, b"GET", b"")
    assert status == 400  # polling is over for this session


def test_recovery_restores_subscriptions_and_replays_what_was_missed(
        server: SocketIOServer) -> None:
    """
    A client that comes back with its pid and last offset (as socket.io-client
    4.6+ does by itself) gets the same pid, its subscriptions back without
    asking, the events it missed once and in order, then live events; an
    identical subscribe (a connect handler) returns the subscription it has.
    """
    first = Polling(server)
    packets = first.connect(user="alice")
    pid = orjson.loads(packets[0][2:])["pid"]
    first.post(b'421["subscribe",{"topic":"patterns","filter":{"symbols":["AAPL"]}}]')
    first.poll()
    first.poll()
    server.publish(PATTERNS, symbol="AAPL", pattern="Seen", confidence=0.9)
    (seen,) = events(first.held())
    first.post(b"1")  # the client closes its transport
    assert not server.gateway.connections
    for name in ("Missed1", "Missed2"):
        server.publish(PATTERNS, symbol="AAPL", pattern=name, confidence=0.9)
    server.publish(PATTERNS, symbol="MSFT", pattern="Other", confidence=0.9)

    second = Polling(server)
    packets = second.connect(user="alice", pid=pid, offset=seen[2])
    assert orjson.loads(packets[0][2:])["pid"] == pid
    got = events(packets)
    assert got[0][0] == "connection_confirmed" and got[0][1]["recovered"] is True
    replayed = [e[1]["data"]["pattern"] for e in got[1:] if e[0] == "event"]
    assert replayed == ["Missed1", "Missed2"]
    assert server.engine.recovered == 1
    second.post(b'427["subscribe",{"topic":"patterns","filter":{"symbols":["AAPL"]}}]')
    assert second.poll() == [b'437[{"op":"subscribed","id":"sub-1"}]']
    server.publish(PATTERNS, symbol="AAPL", pattern="Live", confidence=0.9)
    assert [e[1]["data"]["pattern"] for e in events(second.poll())] == ["Live"]


def test_recovery_of_another_users_session_is_refused(server: SocketIOServer) -> None:
    """A pid names a session, not a credential: another user gets a new session."""
    first = Polling(server)
    pid = orjson.loads(first.connect(user="alice")[0][2:])["pid"]
    first.post(b"1")
    second = Polling(server)
    packets = second.connect(user="mallory", pid=pid, offset="1-0")
    assert orjson.loads(packets[0][2:])["pid"] != pid
    assert events(packets)[0][1]["recovered"] is False


def test_no_connect_in_time_is_a_connect_error_and_the_end(server: SocketIOServer) -> None:
    """A session that never sends CONNECT gets CONNECT_ERROR at the hello timeout and ends."""
    client = Polling(server)
    client.poll()
    server.clock.advance(HELLO_TIMEOUT)
    assert client.held() == [b'44{"message":"no hello in time"}']
    assert not server.engine.sessions and not server.gateway.connections
    assert client.poll() == [b"1"]


def test_bad_packets_and_binary_attachments(server: SocketIOServer) -> None:
    """
    A binary attachment (in a Socket.IO packet, or a binary message) is
    refused with an error event and the session stays; a packet that is not
    Socket.IO ends the session.
    """
    client = Polling(server)
    client.connect(user="alice")
    client.post(b'451-["x",{"_placeholder":true,"num":0}]')
    (error,) = events(client.poll())
    assert error[0] == "error" and "binary" in error[1]["message"]
    client.post(b"bAAEC")  # a base64 (binary) message: the same
    (error,) = events(client.poll())
    assert "binary" in error[1]["message"] and server.engine.sessions
    client.post(b"4x")
    assert not server.engine.sessions


def test_frames_are_made_once_per_dialect_and_subscription() -> None:
    """
    Fan-out frames each event once per subscription id and dialect: /ws
    clients and Socket.IO clients with the same subscription id get their
    own frame, clients of one dialect share one.
    """
    made: list[bytes] = []
    broadcaster = Broadcaster(lambda frame: made.append(frame) or frame)

    class Client:
        user = "u"

        def __init__(self, dialect: str | None) -> None:
            self.dialect = dialect
            self.sent: list[bytes] = []

        def frame(self, event: Any, sub_id: str) -> bytes:
            return (native_frame(event, sub_id) if self.dialect else event.frame(sub_id))

        def send(self, prepared: Any, key: Any = None) -> None:
            self.sent.append(prepared)

    clients = [Client(None), Client(None), Client("socket.io"), Client("socket.io")]
    for client in clients:
        broadcaster.subscribe(client, "s", "patterns", Filter())
    event = parse_event(PATTERNS, orjson.dumps(
        {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.9}), "5-0", 1.0)
    assert broadcaster.deliver(event) == 4
    assert len(made) == 2
    assert clients[0].sent[0] is clients[1].sent[0]
    assert clients[2].sent[0] is clients[3].sent[0] != clients[0].sent[0]


def test_packet_decoding() -> None:
    """The Socket.IO packet forms clients send, and what is refused."""
    assert decode(b"0").type == 0
    connect = decode(b'0{"token":"t"}')
    assert connect.data == {"token": "t"} and connect.namespace == "/"
    event = decode(b'212["subscribe",{"topic":"patterns"}]')
    assert (event.type, event.ack, event.data[0]) == (2, 12, "subscribe")
    assert decode(b'0/admin,{"a":1}').namespace == "/admin"
    for bad in (b"", b"9", b"2", b'2{"a":1}', b"2[1]", b"2not json",
                b'299999999999["x"]', b'51-["x",{"_placeholder":true,"num":0}]'):
        with pytest.raises(BadPacket):
            decode(bad)


def test_original_frame_carries_the_id_and_the_offset() -> None:
    """
    The original shape, TickStock's id beside it, and the id as the offset
    (or not, when asked; never for a tick).
    """
    event = parse_event(PATTERNS, orjson.dumps(
        {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.9, "timestamp": 12.5}), "7-1", 1.0)
    name, body, offset = orjson.loads(legacy_frame(event)[2:])
    assert (name, body["id"], offset, body["event"]["timestamp"]) == (
        "pattern_alert", "7-1", "7-1", 12.5)
    assert len(orjson.loads(legacy_frame(event, offset=False)[2:])) == 2
    assert id_key(offset) == (7, 1)
    tick = parse_event("tickstock.data.ticks", orjson.dumps(
        {"symbol": "AAPL", "price": 1.5, "volume": 10}), "6-0", 1.0)
    name, body = orjson.loads(legacy_frame(tick)[2:])  # a tick's id is no resume point
    assert name == "tick_data" and body["id"] == "6-0"
    assert len(orjson.loads(native_frame(tick, "t")[2:])) == 2


def test_the_socketio_parts_provide_their_interfaces(server: SocketIOServer) -> None:
    """verifyObject on the session, the records (memory and Redis) and the engine's report."""
    client = Polling(server)
    client.connect(user="alice")
    (session,) = server.engine.sessions.values()
    verifyObject(IClient, session)
    verifyObject(ISessionRecords, server.records)
    verifyObject(ISessionRecords, RedisSessionRecords(RedisLink(server.clock, ADDRESS, 1)))
    verifyObject(IReporting, server.engine)
    assert server.engine.status()["sessions"] == 1


def test_records_expire_in_memory() -> None:
    """A kept record is found until its time is up, then not, and is dropped as others are kept."""
    clock = Clock()
    records = MemorySessionRecords(clock)
    records.keep("a", b"1", 10)
    clock.advance(9)
    assert records.find("a").result == b"1"
    clock.advance(1)
    assert records.find("a").result is None
    records.keep("b", b"2", 10)
    assert records.status() == {"sessions_kept": 1}


@pytest_twisted.ensureDeferred
async def test_records_in_redis_are_kept_and_found(redis_server: RedisServer) -> None:
    """In a real Redis: kept with its time to live, found by pid, None for an unknown pid."""
    link = RedisLink(reactor, parse_redis_url(redis_server.url), deadletter_max=0)
    link.startService()
    try:
        await eventually(lambda: link.connected, 5, "link connected")
        records = RedisSessionRecords(link)
        records.keep("p1", b'{"user":"u","subs":[]}', 30)
        assert await records.find("p1") == b'{"user":"u","subs":[]}'
        assert await records.find("p2") is None
        ttl = redis_server.command("PTTL", "tickstock:socketio:session:p1")
        assert 0 < int(ttl[1:]) <= 30_000  # RESP ":<n>\r\n"
    finally:
        await link.stopService()
    records.keep("p3", b"x", 30)  # Redis away: counted, not raised
    assert records.status() == {"session_records_lost": 1}


def test_a_session_that_ends_after_it_was_recovered_leaves_the_record_alone(
        server: SocketIOServer) -> None:
    """
    The client came back (new session, same pid) before its old session
    timed out: when the old one ends, the record stays the new one's, so a
    later recovery gets the new session's subscriptions.
    """
    old = Polling(server)
    pid = orjson.loads(old.connect(user="alice")[0][2:])["pid"]
    old.post(b'42["subscribe",{"topic":"patterns"}]')
    old.poll()
    server.publish(PATTERNS, symbol="AAPL", pattern="Seen", confidence=0.9)
    (seen,) = [e for e in events(old.poll()) if e[0] == "event"]
    new = Polling(server)
    new.connect(user="alice", pid=pid, offset=seen[2])
    new.post(b'42["subscribe",{"topic":"market_state"}]')
    new.poll()
    server.clock.advance(PING_INTERVAL)
    new.post(b"3")  # the new one answers its ping, the old one does not
    server.clock.advance(PING_TIMEOUT)
    assert list(server.engine.sessions) == [new.sid]
    record = orjson.loads(server.records.find(pid).result)
    assert record["owner"] == new.sid and len(record["subs"]) == 4
