"""
The WebSocket endpoint over an in-memory transport: the real site (the
HTTP upgrade at C{/ws}), Autobahn server protocol, gateway and delivery
path on one side, an Autobahn client on the other, the bytes moved by
C{twisted.test.iosim}'s pump and time kept by a L{Clock}.

Why in memory: each test is deterministic, binds no port and waits on no
wall clock, so a heartbeat timeout or a stalled reader of several seconds
costs nothing, and backpressure is what the test says the socket holds.
Autobahn's timers are put on the Clock per factory (L{ClockTimer}), never
by replacing txaio's process-wide loop.

What stays with the real-socket tests (tests/test_protocol.py,
test_delivery.py, test_attacks.py, test_fuzz.py, ...): the daemon as
C{twistd tickstock} composes it (options, service tree, simulator, Redis),
the kernel's socket buffers and L{ClientProtocol._write}'s direct socket
write, TLS, raw and invalid frames, and Autobahn's own timers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.test import iosim

from tickstock.deliver.auth import anonymous
from tickstock.deliver.broadcast import Broadcaster
from tickstock.deliver.gateway import CLOSE_POLICY, CLOSE_SLOW_CONSUMER, Gateway
from tickstock.deliver.latest import Latest
from tickstock.domain.events import id_key
from tickstock.history.memory import MemoryHistory
from tickstock.ingest.memory import MemoryBus
from tickstock.ingest.router import Router
from tickstock.web.site import JSONStatus, build_site
from tickstock.web.websocket import SWEEP, ClientProtocol, StreamFactory

MAX_MESSAGE = 1024
QUEUE_LIMIT = 3
PING_INTERVAL = 10.0
PING_TIMEOUT = 5.0
STALL = 4.0
HELLO_TIMEOUT = 2.0
PATTERNS = "tickstock.events.patterns"
HEALTH = "tickstock.health.status"


class ClockTimer:
    """
    A fake of Autobahn's per-factory timer (txaio's batched timer, which
    runs on txaio's process-wide loop) on the test's L{Clock}: each call is
    a plain C{callLater}, without the batching into 0.2 s buckets.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def call_later(self, delay: float, fun: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> IDelayedCall:
        return self._clock.callLater(delay, fun, *args, **kwargs)


class Socket(iosim.FakeTransport):
    """
    A fake of the server's TCP connection: iosim's transport with a send
    buffer. While the peer reads, the pump takes all that is written; once
    it stops, writes stay here, and past C{room} bytes the producer (the
    connection) is paused, as Twisted pauses it past its buffer size.
    Reading again drains the buffer and resumes the producer.
    """

    def __init__(self, protocol: Any, room: int) -> None:
        super().__init__(protocol, isServer=True,
                         peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.room = room
        self.reading = True
        self.paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if (not self.reading and not self.paused and self.producer is not None
                and self.streamingProducer and sum(map(len, self.stream)) > self.room):
            self.paused = True
            self.producer.pauseProducing()

    def getOutBuffer(self) -> bytes | None:
        if not self.reading:
            return None
        data = super().getOutBuffer()
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()
        return data


class Client(WebSocketClientProtocol):
    """An Autobahn client recording what it is sent and how it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []
        self.opened = False
        self.closed: tuple[bool, int | None] | None = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(orjson.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code)

    def send(self, message: dict[str, Any] | bytes) -> None:
        self.sendMessage(message if isinstance(message, bytes) else orjson.dumps(message))

    def of(self, op: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["op"] == op]


class Server:
    """
    The embedded delivery path, composed as tap composes it without Redis
    but with fewer parts (no tick pacing, jobs, universes or rate limit):
    the memory bus feeds the router, which stores into the memory history,
    whose events the broadcaster fans out to the connections (and the
    latest-only ones' current values are kept for new subscriptions); the gateway
    answers requests, and the site serves the WebSocket at C{/ws}.
    """

    def __init__(self, clock: Clock, room: int) -> None:
        self.clock = clock
        self.room = room
        self.factory = StreamFactory(
            allowed_origins=(), max_message_size=MAX_MESSAGE, queue_limit=QUEUE_LIMIT,
            ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT, handshake_timeout=5.0,
            stall_timeout=STALL, clock=clock,
        )
        self.factory._batched_timer = ClockTimer(clock)
        self.history = MemoryHistory(clock, 100, 3600, 100)
        self.bus = MemoryBus()
        self.bus.listen(Router(clock, self.history, self.bus).receive)
        self.broadcaster = Broadcaster(self.factory.prepareMessage)
        self.latest = Latest()
        self.history.listen(self.latest.keep)
        self.history.listen(self.broadcaster.deliver)
        self.gateway = Gateway(clock, self.broadcaster, self.history, anonymous,
                               max_subscriptions=3, hello_timeout=HELLO_TIMEOUT,
                               latest=self.latest)
        self.factory.gateway = self.gateway
        status = JSONStatus(lambda: (True, {}))
        self.site = build_site(WebSocketResource(self.factory), status, status, timeout=30.0)
        self.site.reactor = clock

    def publish(self, channel: str, **data: Any) -> None:
        """What the producer publishes, through the bus."""
        self.bus.publish(channel, orjson.dumps(data))


class Connection:
    """One client connected to the server through an iosim pump."""

    def __init__(self, server: Server) -> None:
        self.clock = server.clock
        factory = WebSocketClientFactory("ws://tickstock.test/ws", reactor=self.clock)
        factory.protocol = Client
        factory._batched_timer = ClockTimer(self.clock)
        self.client: Client = factory.buildProtocol(None)
        channel = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.socket = Socket(channel, server.room)
        self.pump = iosim.connect(channel, self.socket, self.client,
                                  iosim.makeFakeClient(self.client), clock=self.clock)

    @property
    def protocol(self) -> ClientProtocol:
        """The server's side, which took the transport over from the HTTP channel."""
        assert isinstance(self.socket.protocol, ClientProtocol)
        return self.socket.protocol

    def request(self, message: dict[str, Any] | bytes) -> list[dict[str, Any]]:
        """Send one message; everything the server sent back meanwhile."""
        before = len(self.client.messages)
        self.client.send(message)
        self.pump.flush()
        return self.client.messages[before:]

    def advance(self, seconds: float, *others: Connection) -> None:
        """Let C{seconds} pass in steps, every connection pumped at each."""
        for _ in range(round(seconds / SWEEP)):
            self.clock.advance(SWEEP)
            for connection in (self, *others):
                connection.pump.flush()


def make_server(room: int = 65536) -> Server:
    """A server whose sockets pause their connection past C{room} unread bytes."""
    clock = Clock()
    clock.advance(1_700_000_000)
    return Server(clock, room)


@pytest.fixture
def server() -> Server:
    return make_server()


def greeted(server: Server, user: str = "alice") -> Connection:
    connection = Connection(server)
    assert connection.client.opened
    (welcome,) = connection.request({"op": "hello", "id": "h", "user": user})
    assert welcome["op"] == "welcome" and welcome["user"] == user
    return connection


def test_handshake_hello_and_welcome(server: Server) -> None:
    """
    The upgrade through the site opens the socket, the connection is the
    gateway's and the transport's producer (no longer the HTTP channel's),
    and hello is answered with welcome (id, user, session); ping then works.
    """
    connection = Connection(server)
    assert connection.client.opened and connection.client.closed is None
    assert list(server.gateway.connections) == [connection.protocol]
    assert connection.socket.producer is connection.protocol
    (welcome,) = connection.request({"op": "hello", "id": "h", "user": "alice"})
    assert welcome["op"] == "welcome" and welcome["id"] == "h"
    assert welcome["user"] == "alice" and welcome["session"]
    assert connection.protocol.user == "alice"
    assert connection.request({"op": "ping", "id": "p"}) == [{"op": "pong", "id": "p"}]


def test_no_hello_in_time_closes_with_1008(server: Server) -> None:
    """A client that never says hello is closed with 1008 after the hello timeout."""
    connection = Connection(server)
    connection.advance(HELLO_TIMEOUT - SWEEP)
    assert connection.client.closed is None
    connection.advance(SWEEP)
    assert connection.client.closed == (True, CLOSE_POLICY)
    assert not server.gateway.connections


def test_subscribed_events_are_delivered_and_others_not(server: Server) -> None:
    """
    A subscription gets the events that match its filter, framed with its
    id, in id order; another symbol's events are not sent.
    """
    connection = greeted(server)
    assert connection.request({"op": "subscribe", "id": "s1", "topic": "patterns",
                               "filter": {"symbols": ["AAPL"]}}) == [
        {"op": "subscribed", "id": "s1"}]
    before = len(connection.client.messages)
    server.publish(PATTERNS, symbol="AAPL", pattern="Doji", confidence=0.9)
    server.publish(PATTERNS, symbol="MSFT", pattern="Doji", confidence=0.9)
    server.publish(PATTERNS, symbol="AAPL", pattern="Hammer", confidence=0.7)
    connection.pump.flush()
    events = connection.client.messages[before:]
    assert [(e["op"], e["sub"], e["type"], e["data"]["symbol"], e["data"]["pattern"])
            for e in events] == [("event", "s1", "pattern_detected", "AAPL", "Doji"),
                                 ("event", "s1", "pattern_detected", "AAPL", "Hammer")]
    assert id_key(events[0]["id"]) < id_key(events[1]["id"])


def test_malformed_messages_are_answered_and_change_nothing(server: Server) -> None:
    """
    Bad JSON, a binary frame and a bad filter each get one error reply;
    the connection stays open, its subscription stays, and events still
    come.
    """
    connection = greeted(server)
    connection.request({"op": "subscribe", "id": "s1", "topic": "patterns"})
    assert server.broadcaster.subscriptions == 1
    (error,) = connection.request(b"{not json")
    assert error["op"] == "error" and error["code"] == "bad_json" and error["id"] is None
    before = len(connection.client.messages)
    connection.client.sendMessage(b"\x00\x01", isBinary=True)
    connection.pump.flush()
    (error,) = connection.client.messages[before:]
    assert error["code"] == "bad_request" and error["message"].startswith("binary")
    (error,) = connection.request({"op": "subscribe", "id": "s2", "topic": "patterns",
                                   "filter": {"symbols": ["aapl"]}})
    assert error["code"] == "bad_filter" and error["id"] == "s2"
    assert connection.client.closed is None
    assert server.broadcaster.subscriptions == 1
    assert server.gateway.errors == {"bad_json": 1, "bad_filter": 1}
    server.publish(PATTERNS, symbol="AAPL", pattern="Doji", confidence=0.9)
    connection.pump.flush()
    assert connection.client.messages[-1]["sub"] == "s1"


def test_oversized_message_closes_with_1009(server: Server) -> None:
    """
    A message up to --max-message-size is read; one over it closes the
    connection with 1009, unanswered, and the gateway forgets it.
    """
    connection = greeted(server)
    envelope = len(orjson.dumps({"op": "ping", "id": "x", "pad": ""}))
    fits = {"op": "ping", "id": "x", "pad": "y" * (MAX_MESSAGE - envelope)}
    assert connection.request(fits) == [{"op": "pong", "id": "x"}]
    assert connection.request({**fits, "pad": fits["pad"] + "y"}) == []
    assert connection.client.closed == (True, 1009)
    assert not server.gateway.connections


def test_a_client_that_stops_answering_pings_is_dropped(server: Server) -> None:
    """
    A client that reads answers the server's pings and stays; one that
    stopped reading answers none and is dropped after the ping timeout,
    counted, with its subscriptions.
    """
    alive, dead = greeted(server, "alive"), greeted(server, "dead")
    dead.request({"op": "subscribe", "id": "s", "topic": "patterns"})
    dead.socket.reading = False
    alive.advance(PING_INTERVAL + PING_TIMEOUT - SWEEP, dead)
    assert dead.client.closed is None and server.gateway.heartbeat_timeouts == 0
    alive.advance(SWEEP, dead)
    assert server.gateway.heartbeat_timeouts == 1
    assert dead.client.closed is not None and not dead.client.closed[0]
    assert list(server.gateway.connections) == [alive.protocol]
    assert server.broadcaster.subscriptions == 0
    alive.advance(3 * PING_INTERVAL)
    assert alive.client.closed is None and server.gateway.heartbeat_timeouts == 1
    assert alive.request({"op": "ping", "id": "p"}) == [{"op": "pong", "id": "p"}]


def test_a_paused_connection_queues_conflates_and_drains_in_order() -> None:
    """
    While the client does not read and its socket is full, must-deliver
    events all wait and latest-only ones keep the newest per key; reading
    again, they come in event-id order and the connection stays.
    """
    server = make_server(room=0)
    connection = greeted(server)
    connection.request({"op": "subscribe", "id": "p", "topic": "patterns"})
    connection.request({"op": "subscribe", "id": "h", "topic": "health"})
    before = len(connection.client.messages)
    connection.socket.reading = False
    for n in range(QUEUE_LIMIT):
        server.publish(PATTERNS, symbol="AAPL", pattern=f"P{n}", confidence=0.9)
        server.publish(HEALTH, service="sim", status="healthy", n=f"s{n}")
        server.publish(HEALTH, service="db", status="healthy", n=f"d{n}")
    connection.pump.flush()
    assert connection.socket.paused and len(connection.client.messages) == before
    connection.socket.reading = True
    connection.pump.flush()
    got = [(e["sub"], e["data"].get("pattern") or e["data"]["n"])
           for e in connection.client.messages[before:]]
    # The first frame went to the socket before it was full; the rest waited.
    assert got == [("p", "P0"), ("p", "P1"), ("p", "P2"), ("h", "s2"), ("h", "d2")]
    ids = [id_key(e["id"]) for e in connection.client.messages[before:]]
    assert ids == sorted(ids)
    assert server.factory.conflated == 2 * (QUEUE_LIMIT - 1)
    assert connection.client.closed is None and not connection.socket.paused


def test_a_stalled_reader_past_the_queue_bound_closes_with_4001() -> None:
    """
    Past the queue bound, a client whose socket takes nothing for the
    stall timeout is closed with 4001 (reconnect and resume); one that
    reads again before then is not.
    """
    server = make_server(room=0)
    connection = greeted(server)
    connection.request({"op": "subscribe", "id": "p", "topic": "patterns"})
    connection.socket.reading = False
    for n in range(QUEUE_LIMIT + 2):
        server.publish(PATTERNS, symbol="AAPL", pattern=f"P{n}", confidence=0.9)
    connection.advance(STALL - SWEEP)
    assert server.gateway.slow_consumers_closed == 0
    connection.socket.reading = True
    connection.pump.flush()
    assert [e["data"]["pattern"] for e in connection.client.of("event")] == [
        f"P{n}" for n in range(QUEUE_LIMIT + 2)]

    connection.socket.reading = False
    for n in range(QUEUE_LIMIT + 2):
        server.publish(PATTERNS, symbol="AAPL", pattern=f"Q{n}", confidence=0.9)
    connection.advance(STALL)
    assert server.gateway.slow_consumers_closed == 1
    connection.socket.reading = True
    connection.pump.flush()
    assert connection.client.closed == (True, CLOSE_SLOW_CONSUMER)
    assert not server.gateway.connections


def test_an_open_connection_keeps_nothing_of_its_handshake(server: Server) -> None:
    """
    Once open, the connection holds none of Autobahn's handshake leftovers
    (headers, request and response bytes) and a list for Autobahn's send
    queue: what an idle connection costs (bench/latency.py --idle). It still
    delivers, and Autobahn's own frames (a ping) still go out.
    """
    connection = greeted(server)
    protocol = connection.protocol
    assert protocol.http_headers is None and protocol.http_request_data is None
    assert isinstance(protocol.send_queue, list) and not protocol.send_queue
    connection.request({"op": "subscribe", "id": "s1", "topic": "patterns"})
    server.publish(PATTERNS, symbol="AAPL", pattern="Doji", confidence=0.9)
    connection.pump.flush()
    assert connection.client.messages[-1]["data"]["pattern"] == "Doji"
    connection.advance(PING_INTERVAL + SWEEP)
    assert connection.client.closed is None


def test_a_new_subscription_gets_each_current_value_first(server: Server) -> None:
    """
    Subscribing to a latest-only topic answers with how many current values
    follow, then the newest event of each key it covers (one per service),
    marked as a snapshot, oldest first; live events follow unmarked. A
    resumed subscription gets its replay instead, and no snapshot.
    """
    server.publish(HEALTH, service="engine", status="healthy", n=1)
    server.publish(HEALTH, service="db", status="degraded", n=2)
    server.publish(HEALTH, service="engine", status="degraded", n=3)
    connection = greeted(server)
    subscribed, *snapshot = connection.request(
        {"op": "subscribe", "id": "h", "topic": "health"})
    assert subscribed == {"op": "subscribed", "id": "h", "snapshot": 2}
    assert [(e["data"]["service"], e["data"]["n"], e.get("snapshot")) for e in snapshot] == [
        ("db", 2, True), ("engine", 3, True)]
    server.publish(HEALTH, service="db", status="healthy", n=4)
    connection.pump.flush()
    live = connection.client.messages[-1]
    assert live["data"]["n"] == 4 and "snapshot" not in live
    assert connection.request({"op": "subscribe", "id": "p", "topic": "patterns"}) == [
        {"op": "subscribed", "id": "p"}]  # must-deliver topics have no current value

    resumed = Connection(server)
    resumed.request({"op": "hello", "id": "h", "user": "bob", "resume": {"last_id": live["id"]}})
    assert resumed.request({"op": "subscribe", "id": "h", "topic": "health"}) == [
        {"op": "subscribed", "id": "h", "recovered": True, "replayed": 0}]


def test_a_new_backtests_subscription_gets_the_current_progress_of_each_job(
        server: Server) -> None:
    """
    Progress another tab of the user already had has left the offline
    queue: a new tab's backtests subscription still gets each job's newest
    progress, marked as a snapshot, and nothing of other users' jobs.
    """
    progress = "tickstock.events.backtesting.progress"
    server.history.own("j1", "alice")
    server.history.own("j2", "bob")
    first = greeted(server, "alice")
    first.request({"op": "subscribe", "id": "b", "topic": "backtests"})
    for n, job in ((1, "j1"), (2, "j2"), (3, "j1")):
        server.publish(progress, job_id=job, progress=n / 10, status="running")
    first.pump.flush()
    had = [m for m in first.client.messages if m["op"] == "event"]
    assert [m["data"]["progress"] for m in had] == [0.1, 0.3]
    server.history.delivered("alice", had[-1]["id"])  # as the daemon's live delivery says
    second = greeted(server, "alice")
    subscribed, *events = second.request({"op": "subscribe", "id": "b", "topic": "backtests"})
    assert subscribed == {"op": "subscribed", "id": "b"}
    assert [(e["data"]["job_id"], e["data"]["progress"], e["snapshot"]) for e in events] == [
        ("j1", 0.3, True)]
