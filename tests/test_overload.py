"""
An overloaded daemon does not close its clients at once: it sheds ticks
first and takes in less (L{tickstock.deliver.overload}), and closes only a client
that stopped reading (L{tickstock.web.websocket}).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import orjson
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tests.test_end_to_end import pattern, publish, ready
from tests.test_units import ADDRESS, RecordingClient, make_gateway
from tests.wsclient import connect, eventually
from tickstock.deliver.gateway import GAP_CLOSES_PER_SECOND, GAP_SPREAD
from tickstock.deliver.overload import LATE_AFTER, LATE_HOLD, Overload
from tickstock.deliver.throttle import BEHIND_INTERVAL, TickThrottle
from tickstock.domain.events import Event
from tickstock.ingest.pubsub import STEER_INTERVAL, RedisPubSubSource, output_memory

PATTERNS = "tickstock.events.patterns"


def event(arrived: float, event_id: str = "1000-0") -> Event:
    return Event(id=event_id, channel=PATTERNS, topic="patterns", type="pattern_detected",
                 data={}, received_at=arrived)


def test_late_events_make_the_daemon_behind_for_a_while() -> None:
    """
    An event that reaches the live path more than L{LATE_AFTER} seconds after
    it arrived makes the daemon behind for L{LATE_HOLD} seconds; on-time
    events do not. Without a receive time, the id's time is the arrival.
    """
    clock = Clock()
    clock.advance(1000)
    overload = Overload(clock)
    overload.arrived(event(1000 - LATE_AFTER))
    assert not overload() and overload.late == 0
    overload.arrived(event(0, event_id=f"{int((1000 - LATE_AFTER - 0.01) * 1000)}-7"))
    assert overload() and overload.late == 1
    clock.advance(LATE_HOLD - 0.01)
    assert overload()
    clock.advance(0.01)
    assert not overload()


def test_more_stored_events_waiting_for_the_live_path_than_allowed_make_it_behind() -> None:
    """
    Events this process stored count until the live path takes them, or a
    later one (the history delivers in id order: an earlier one it skipped
    is not coming); past C{most_waiting} the daemon is behind. Ticks are not
    counted (from pub/sub they skip the history).
    """
    overload = Overload(Clock(), most_waiting=2)
    for n in range(1, 4):
        overload.stored(event(0, f"{n}-0"))
    overload.stored(Event(id="4-0", channel="tickstock.data.ticks", topic="ticks", type="tick",
                          data={}, symbol="AAPL"))
    assert overload()
    overload.arrived(event(0, "2-0"))
    assert not overload() and overload.late == 0
    overload.stored(event(0, "5-0"))
    overload.stored(event(0, "6-0"))
    assert overload()
    overload.arrived(event(0, "7-0"))
    assert not overload()
    assert not Overload(Clock())()  # no bound: never behind for this


def test_most_clients_backlogged_make_the_daemon_behind() -> None:
    clients_behind = [False]
    overload = Overload(Clock(), lambda: clients_behind[0])
    assert not overload()
    clients_behind[0] = True
    assert overload()


def test_ticks_are_shed_first_while_behind() -> None:
    """
    While the daemon is behind, a symbol's ticks go out at most once per
    L{BEHIND_INTERVAL} (the newest one), instead of C{--tick-rate} times a
    second; once it has caught up, at the configured rate again.
    """
    clock, sent, behind = Clock(), [], [True]
    throttle = TickThrottle(clock, 10, sent.append, behind=lambda: behind[0])

    def tick(n: int) -> Event:
        return Event(id=f"{n}-0", channel="tickstock.data.ticks", topic="ticks", type="tick",
                     data={"n": n}, symbol="AAPL", latest=("ticks", "AAPL"))

    for n in range(40):  # 4 s of ticks at 10 a second
        throttle(tick(n))
        clock.advance(0.1)
    assert [e.data["n"] for e in sent] == [0, 10, 20, 30]
    assert BEHIND_INTERVAL == 1.0
    behind[0] = False
    clock.advance(1)
    for n in range(40, 50):
        throttle(tick(n))
        clock.advance(0.1)
    # The newest tick that waited goes out at its turn, then every tick.
    assert [e.data["n"] for e in sent][4:] == [39, *range(40, 50)]


class FakeSubscriber:
    """
    A fake txredisapi subscriber protocol and its transport (no socket):
    answers CLIENT ID and SUBSCRIBE, leaves PINGs unanswered (their replies
    would wait behind what it does not read), records pauses and aborts.
    """

    def __init__(self) -> None:
        self.transport = self
        self.paused = self.aborted = False

    def subscribe(self, channel: str) -> Deferred[Any]:
        return succeed(["subscribe", channel, 1])

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return succeed(7) if args == ("CLIENT", "ID") else Deferred()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def abortConnection(self) -> None:
        self.aborted = True


def test_the_pubsub_subscriber_stops_reading_while_the_daemon_is_behind() -> None:
    """
    With a fake subscriber connection and a fake C{ask} standing in for the
    command link (it answers CONFIG GET and CLIENT LIST as Redis 7 does):
    while the daemon is behind, the subscriber reads nothing, so Redis holds
    the messages, until Redis holds half its lower pub/sub limit (8 MB
    here): then it reads again, shedding latest-only events, and stops
    again once Redis holds less. Once the daemon has caught up it reads on
    and asks no more. A backlog Redis does not tell is never held, and the
    heartbeat does not take the paused connection for a hung Redis.
    """
    clock, omem, asked, refused, behind = Clock(), [0], [], [False], [False]

    def ask(*command: Any) -> Deferred[Any]:
        asked.append(command[0])
        if command[0] == "CONFIG":
            return succeed(["client-output-buffer-limit",
                            "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60"])
        if refused[0]:
            return fail(ConnectionError("NOPERM"))
        return succeed(f"id=7 addr=127.0.0.1:5 qbuf=0 obl=0 oll=9 omem={omem[0]} tot-mem=1")

    source = RedisPubSubSource(clock, ADDRESS, ask=ask, ping_interval=1.0, ping_timeout=3.0)
    source.running = True
    source.daemon_behind = lambda: behind[0]
    protocol = FakeSubscriber()
    source._connected(protocol)
    source._heartbeat.start(1.0, now=False)
    source._read(100, None)
    assert not protocol.paused and asked == []  # keeping up: nothing to ask

    behind[0], omem[0] = True, 100_000
    source._read(100, None)
    assert protocol.paused and source.status()["paused"] and source.pauses == 1
    clock.advance(STEER_INTERVAL)
    assert protocol.paused and asked == ["CONFIG", "CLIENT", "CLIENT"]
    omem[0] = 4_194_304
    clock.advance(STEER_INTERVAL)
    assert not protocol.paused and source.behind and source.fell_behind == 1
    omem[0] = 4_194_303
    clock.advance(STEER_INTERVAL)
    assert protocol.paused and source.pauses == 2
    for _ in range(round(5 / STEER_INTERVAL)):  # 5 s paused: longer than the PING timeout
        clock.advance(STEER_INTERVAL)
    assert protocol.paused and not protocol.aborted

    behind[0] = False
    clock.advance(STEER_INTERVAL)
    assert not protocol.paused and not source.status()["paused"]
    count = len(asked)
    clock.advance(1.0)
    assert len(asked) == count

    behind[0], refused[0] = True, True
    source._read(100, None)
    clock.advance(STEER_INTERVAL)
    assert not protocol.paused and source.pauses == 2
    refused[0] = False
    clock.advance(STEER_INTERVAL)
    assert protocol.paused and source.pauses == 3
    source._disconnected(protocol, Failure(ConnectionDone()))
    assert not source.paused
    source._heartbeat.stop()
    assert clock.getDelayedCalls() == []


def test_a_live_gap_closes_its_clients_spread_out_and_sends_them_nothing_more() -> None:
    """
    With recording fake connections: when live delivery of a topic skipped
    events, each of its clients gets nothing more at once (so the last id
    it saw is before the gap, and its resume replays the gap) and is closed
    with 4001 at a random moment over clients / L{GAP_CLOSES_PER_SECOND}
    seconds (at most L{GAP_SPREAD}), not all at once.
    """
    clock = Clock()
    gateway = make_gateway(clock)
    clients = [RecordingClient() for _ in range(400)]
    for n, client in enumerate(clients):
        gateway.opened(client)
        gateway.receive(client, orjson.dumps({"op": "hello", "user": f"u{n}"}))
        gateway.receive(client, b'{"op":"subscribe","id":"p","topic":"patterns"}')
    broadcaster = gateway._broadcaster
    assert broadcaster.deliver(event(0, "1-0")) == 400
    for client in broadcaster.clients_of("patterns"):
        gateway.missed_live(client)
        gateway.missed_live(client)  # once is enough
    assert broadcaster.deliver(event(0, "2-0")) == 0
    assert all(len(client.sent) == 1 for client in clients)
    spread = len(clients) / GAP_CLOSES_PER_SECOND
    assert spread < GAP_SPREAD
    clock.advance(spread / 2)
    closed = sum(client.closed is not None for client in clients)
    assert 0 < closed < len(clients)
    clock.advance(spread / 2)
    assert {client.closed for client in clients} == {(4001, "live events were missed; resume")}
    assert gateway.live_gaps_closed == 400 and not gateway.connections


# ---------------------------------------------------------------- end to end

SUBSCRIPTIONS = 4
"""Each reader's overlapping subscriptions: every event reaches it four
times, more than it reads in a reactor turn, so its socket fills though it
reads."""


def small_buffers(client: Any, daemon: Any) -> None:
    """
    Loopback's socket buffers grow to megabytes: shrink both ends of this
    connection to 64 kB, as on a slow network link, so the daemon's writes
    fill them within a few dozen events. (Smaller than loopback's segment
    size, a receive window would stall the sender on TCP's persist timer.)
    """
    client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    port = client.transport.getHost().port
    for conn in daemon.service.gateway.connections:
        if conn.transport.getPeer().port == port:
            conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            return
    raise AssertionError("no server side for this client")


@pytest_twisted.ensureDeferred
async def test_only_the_client_that_stopped_reading_is_closed(redis_server, daemons):
    """
    Real sockets, one daemon on Redis: three clients read, one stops reading
    (its transport is paused, so it reads nothing from its socket). A flood
    of events comes faster than the daemon can write them out: each reader
    gets every event four times (four subscriptions) through small socket
    buffers, so frames wait for the readers too, past
    C{--client-queue-limit}. Only the client that stopped reading is
    closed, with 4001, once its socket took nothing for
    C{--ws-ping-timeout}; every reader stays connected and gets every event
    of every subscription, in order.
    """
    limit = 20
    daemon = daemons(redis=redis_server.url, client_queue_limit=limit, ws_ping_timeout=1)
    await ready(daemon)
    readers = [await connect(daemon.port, hello=daemon.hello(f"reader{n}")) for n in range(3)]
    stuck = await connect(daemon.port, hello=daemon.hello("stuck"))
    for client in (*readers, stuck):
        small_buffers(client, daemon)
        for n in range(SUBSCRIPTIONS):
            reply = await client.request(
                {"op": "subscribe", "id": f"s{n}", "topic": "patterns"}, "subscribed")
            assert reply["op"] == "subscribed", reply
    server_side = {conn.user: conn for conn in daemon.service.gateway.connections}
    stuck.transport.pauseProducing()

    total, pad = 300, "x" * 4000
    for n in range(total):
        publish(redis_server, PATTERNS, pattern(n=n, pad=pad))

    most_waiting = 0

    def delivered() -> bool:
        nonlocal most_waiting
        for n in range(3):
            most_waiting = max(most_waiting, server_side[f"reader{n}"]._must)
        return all(len(r.events()) == total * SUBSCRIPTIONS for r in readers)

    await eventually(delivered, 20, "every reader got every event")
    assert most_waiting > limit  # the readers were past the bound: the daemon was behind
    await eventually(lambda: daemon.service.gateway.slow_consumers_closed == 1, 5,
                     "the stalled client closed")
    assert dict(daemon.service.gateway.slow_consumers) == {"stopped reading": 1}
    for reader in readers:
        assert reader.close_code is None
        for n in range(SUBSCRIPTIONS):
            assert [e["data"]["n"] for e in reader.events(f"s{n}")] == list(range(total))
    stuck.transport.resumeProducing()
    code, _ = await stuck.closed
    assert code in (4001, 1006)
    assert set(daemon.service.gateway.connections) == {server_side[f"reader{n}"] for n in range(3)}
    health = daemon.service.health()[1]
    assert health["overload"]["slow_consumers_closed"] == {"stopped reading": 1}
    assert orjson.dumps(health)  # the body stays JSON


def publish_all(redis: Any, payloads: list[dict[str, Any]]) -> None:
    """PUBLISH each on one pipelined connection, replies off."""
    from tests.flood import resp

    with socket.create_connection(("127.0.0.1", redis.port)) as sock:
        sock.sendall(resp(b"CLIENT", b"REPLY", b"OFF") + b"".join(
            resp(b"PUBLISH", PATTERNS.encode(), orjson.dumps(p)) for p in payloads))


@pytest_twisted.ensureDeferred
async def test_a_pubsub_daemon_behind_lets_redis_hold_its_input_up_to_half_the_limit(
        redis_server, daemons):
    """
    A real Redis (its pub/sub output limit 2 MB, so half is 1 MB) and one
    pub/sub daemon, with its overload signal set by the test: while the
    daemon is behind, the subscriber reads nothing, and Redis holds what
    comes (first in the socket buffers, about 4 MB here, then in its
    output buffer; what the socket buffers take differs by host, so the test
    publishes a megabyte at a time until it does), until it holds 1 MB; then the
    subscriber reads only what keeps Redis under that, and Redis never drops it. Once the daemon
    has caught up, it reads the rest: its client gets every event, in
    order.
    """
    redis_server.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 8mb 2mb 60")
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    service, source = daemon.service, daemon.service.source
    client = await connect(daemon.port, hello=daemon.hello("reader"))
    await client.request({"op": "subscribe", "id": "p", "topic": "patterns"}, "subscribed")
    asked, held, ask = [], [], source._ask

    def asking(*command: Any) -> Deferred[Any]:
        asked.append(command[0])
        d = ask(*command)
        if command[0] == "CLIENT":
            d.addCallback(lambda reply: held.append(output_memory(reply)) or reply)
        return d
    source._ask = asking
    behind = [True]
    source.daemon_behind = lambda: behind[0]

    pad = "x" * 1000
    publish(redis_server, PATTERNS, pattern(n=0, pad=pad))  # read: then it stops reading
    await eventually(lambda: source.paused, 5, "the subscriber stopped reading")
    publish_all(redis_server, [pattern(n=n, pad=pad) for n in range(1, 100)])
    await eventually(lambda: asked.count("CLIENT") >= 3, 5, "Redis asked three times")
    assert service.router.received == 1 and source.fell_behind == 0

    total = 100
    while not source.fell_behind:  # socket buffers differ by host: publish until Redis holds
        assert total < 64_000, (f"Redis never held half its limit: it held {held[-5:]}, "
                                f"read {service.router.received} of {total}")
        publish_all(redis_server, [pattern(n=n, pad=pad) for n in range(total, total + 1000)])
        total += 1000
        with contextlib.suppress(AssertionError):
            await eventually(lambda: source.fell_behind > 0, 1)
    await eventually(lambda: source.paused, 30, "reading what kept Redis under half, then pausing")
    # Once more if the socket drained before Redis refilled it (a busy host).
    assert source.fell_behind >= 1 and service.router.received < total
    assert held[-1] < 1024 * 1024 <= max(held)
    assert source.status()["gaps"] == 0 and source.connections == 1  # never dropped

    behind[0] = False
    await eventually(lambda: len(client.events("p")) == total, 60, "every event")
    assert [e["data"]["n"] for e in client.events("p")] == list(range(total))
    assert client.close_code is None and not source.paused
    assert source.status()["gaps"] == 0 and source.connections == 1
