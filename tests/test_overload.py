"""
An overloaded daemon does not close its clients at once: it sheds ticks
first and takes in less (L{tickstock.overload}), and closes only a client
that stopped reading (L{tickstock.web.stream}).
"""

from __future__ import annotations

import socket
from typing import Any

import orjson
import pytest_twisted
from twisted.internet.task import Clock

from tests.test_end_to_end import pattern, publish, ready
from tests.wsclient import connect, eventually
from tickstock.events import Event
from tickstock.overload import LATE_AFTER, LATE_HOLD, Overload
from tickstock.throttle import BEHIND_INTERVAL, TickThrottle

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
