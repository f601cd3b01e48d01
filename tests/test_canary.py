"""
The freshness canary: with a Clock and a loop-back send (a fake Redis path
behind the send function, for the timing rules), and end to end on the
test's Redis, where a daemon whose subscription is silently lost goes not
ready and comes back once it resubscribes.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from tests.test_end_to_end import ready
from tests.test_metrics import scrape
from tests.wsclient import eventually, http_get
from tickstock.ops.canary import RETRY, Canary, canary_channel


class Loopback:
    """A fake path: what is sent comes back when C{deliver()} is called, unless cut."""

    def __init__(self) -> None:
        self.in_flight: list[bytes] = []
        self.cut = False
        self.down = False

    def send(self, channel: str, payload: bytes) -> Deferred[Any]:
        if self.down:
            return fail(ConnectionError("not connected"))
        if not self.cut:
            self.in_flight.append(payload)
        return succeed(1)

    def deliver(self, canary: Canary) -> None:
        receive = canary.intercept(lambda *a: succeed("routed"))
        for payload in self.in_flight:
            receive(canary.channel, payload, None)
        self.in_flight.clear()


def test_fresh_after_a_round_trip_stale_after_three_intervals_then_fast_retries() -> None:
    clock, path = Clock(), Loopback()
    canary = Canary(clock, path.send, canary_channel("n1"), interval=5.0)
    rtts: list[float] = []
    canary.round_trip = rtts.append
    canary.startService()
    assert canary.sent == 1 and not canary.fresh
    assert canary.status()["state"] == "waiting"
    clock.advance(0.01)
    path.deliver(canary)
    assert canary.fresh and rtts == [0.01]

    # Fresh: one canary per interval, not per retry.
    clock.advance(RETRY)
    assert canary.sent == 1
    clock.advance(5.0)
    assert canary.sent == 2
    path.deliver(canary)

    # Deaf: sent, never back. Fresh for three intervals after the last one.
    path.cut = True
    clock.pump([5.0] * 2 + [4.9])
    assert canary.fresh
    clock.advance(0.2)
    assert not canary.fresh
    assert canary.status()["state"] == "stale"
    sent = canary.sent
    clock.advance(5.0)  # the next beat finds it stale
    clock.pump([RETRY] * 4)
    assert canary.sent >= sent + 5  # retrying fast while stale

    # Back: fresh on the first one home, then the slow beat again.
    path.cut = False
    clock.advance(RETRY)
    path.deliver(canary)
    assert canary.fresh
    sent = canary.sent
    clock.pump([RETRY] * 4)
    assert canary.sent == sent
    canary.stopService()
    assert clock.getDelayedCalls() == []


def test_other_canaries_and_old_ones_prove_nothing() -> None:
    """Another daemon's canary on the same channel, an old one read again, junk: ignored."""
    clock, path = Clock(), Loopback()
    canary = Canary(clock, path.send, canary_channel("n1"), interval=1.0)
    other = Canary(clock, path.send, canary_channel("n1"), interval=1.0)
    canary.startService()
    other._beat()
    receive = canary.intercept(lambda *a: succeed("routed"))
    theirs = path.in_flight.pop()
    receive(canary.channel, theirs, None)
    receive(canary.channel, b"{not json", None)
    receive(canary.channel, b'{"nonce": 1}', None)
    assert not canary.fresh and canary.returned == 0

    mine = path.in_flight.pop()
    clock.advance(3.5)
    receive(canary.channel, mine, None)  # sent 3.5 s ago: older than stale_after
    assert not canary.fresh
    canary.stopService()


def test_other_channels_pass_through_and_send_failures_are_counted() -> None:
    clock, path = Clock(), Loopback()
    canary = Canary(clock, path.send, canary_channel("n1"), interval=1.0)
    path.down = True
    canary.startService()
    assert canary.send_failures == 1
    seen: list[Any] = []
    receive = canary.intercept(lambda *a: seen.append(a) or succeed("routed"))
    result: list[Any] = []
    receive("tickstock.events.patterns", b"{}", "k").addCallback(result.append)
    assert seen == [("tickstock.events.patterns", b"{}", "k")] and result == ["routed"]
    canary.stopService()


@pytest_twisted.ensureDeferred
async def test_a_lost_subscription_makes_the_daemon_not_ready_until_it_resubscribes(
        redis_server: Any, daemons: Any) -> None:
    """
    Pub/sub, real Redis: the daemon is ready only once a canary came back.
    The subscriber connection then UNSUBSCRIBEs the canary channel (still
    connected, still answering PINGs: deaf to it). Within three intervals
    /ready answers 503 naming the canary stale and the metric says 0. When
    Redis drops the subscriber (CLIENT KILL), it reconnects, resubscribes,
    and is ready again.
    """
    daemon = daemons(redis=redis_server.url, canary_interval=0.2)
    await ready(daemon)
    canary = daemon.service.canary
    assert canary.returned >= 1
    status, body = await http_get(daemon.port, "/ready")
    assert status == 200 and body["components"]["canary"]["state"] == "fresh"
    assert body["components"]["canary"]["channel"] == canary.channel
    metrics = await scrape(daemon.port)
    assert metrics[("tickstock_canary_fresh", ())] == 1
    assert metrics[("tickstock_canary_round_trip_seconds_count", ())] >= 1
    assert metrics[("tickstock_dependency_up", (("component", "canary"), ("state", "fresh")))] == 1

    source = daemon.service.source
    await source._protocol.unsubscribe(canary.channel)
    assert source.ready  # the connection looks fine
    await eventually(lambda: not daemon.service.readiness()[0], 5, "not ready")
    status, body = await http_get(daemon.port, "/ready")
    assert status == 503 and body["components"]["canary"]["state"] == "stale"
    metrics = await scrape(daemon.port)
    assert metrics[("tickstock_canary_fresh", ())] == 0
    assert metrics[("tickstock_ready", ())] == 0

    redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
    await eventually(lambda: daemon.service.readiness()[0], 10, "ready again")
    assert (await http_get(daemon.port, "/ready"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_in_streams_mode_the_canary_goes_through_the_consumer_group(
        redis_server: Any, daemons: Any) -> None:
    """
    Streams: the canary is XADDed to this node's own stream, read by the
    consumer group with the producer's streams, acknowledged, and trimmed.
    """
    daemon = daemons(redis=redis_server.url, mode="streams", node_id="canary-node",
                     canary_interval=0.2)
    await ready(daemon)
    canary = daemon.service.canary
    assert canary.channel == "tickstock.canary.canary-node"
    await eventually(lambda: canary.returned >= 3, 5, "three canaries back")
    # The acknowledgement follows the delivery by a round-trip.
    await eventually(lambda: redis_server.command("XPENDING", canary.channel, "tickstock")
                     .startswith(b"*4\r\n:0\r\n"), 5, "every canary acknowledged")
    assert daemon.service.router.received == 0  # not producer messages


@pytest_twisted.ensureDeferred
async def test_without_redis_there_is_no_canary(daemons: Any) -> None:
    """The embedded bus cannot go deaf: no canary, and /ready does not wait for one."""
    daemon = daemons()
    assert daemon.service.canary is None
    await ready(daemon)
    assert "canary" not in daemon.service.readiness()[1]["components"]
