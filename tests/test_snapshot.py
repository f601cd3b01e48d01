"""
The current value on subscribe, against a real daemon (C{twistd tickstock}
on the test's Redis, auth on): a new subscription to ticks or health gets
the newest tick of each symbol and the newest heartbeat of each service at
once, marked as snapshots, on C{/ws} and on Socket.IO (python-socketio),
however long ago they came, even for a symbol nobody watched meanwhile,
and on a node that started after them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import socketio
import websocket

from tests.servers import poll
from tests.socketio_stack import SocketIOStack

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocketIOStack]:
    stack = SocketIOStack(tmp_path_factory.mktemp("snapshot"), 1)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


class WS:
    """A /ws client, synchronous: hello, requests, and what it was sent."""

    def __init__(self, stack: SocketIOStack, user: str, n: int = 0) -> None:
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{stack.daemons[n].port}/ws",
                                              timeout=TIMEOUT)
        self.messages: list[dict[str, Any]] = []
        self.send({"op": "hello", "id": "h", "token": stack.token(user)})
        assert self.until(lambda m: m["op"] == "welcome")

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def until(self, done: Any) -> dict[str, Any]:
        """Read until a message C{done} accepts; it."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            self.messages.append(message)
            if done(message):
                return message
        raise AssertionError("no such message in time")

    def current(self, topic: str, filter: dict[str, Any] | None, sub: str) -> dict[str, Any]:
        """Subscribe; the current values that come first (snapshots), by symbol or service."""
        self.send({"op": "subscribe", "id": sub, "topic": topic, "filter": filter})
        reply = self.until(lambda m: m["op"] == "subscribed" and m["id"] == sub)
        count = reply.get("snapshot", 0)
        events = [self.until(lambda m: m["op"] == "event") for _ in range(count)]
        assert all(e["snapshot"] is True and e["sub"] == sub for e in events)
        return {e["data"].get("symbol") or e["data"]["service"]: e["data"] for e in events}

    def close(self) -> None:
        self.ws.close()


def heartbeat(stack: SocketIOStack, service: str, status: str) -> None:
    stack.redis.command("PUBLISH", "tickstock.health.status", json.dumps(
        {"service": service, "status": status, "timestamp": time.time()}))


def test_a_new_subscription_gets_every_current_price_and_heartbeat_at_once(
        stack: SocketIOStack) -> None:
    """
    Ticks for two symbols nobody watches, and heartbeats of two services;
    a client subscribing later is answered with how many current values
    follow, then gets each symbol's newest price and each service's newest
    status, marked as snapshots; then live ticks, unmarked.
    """
    watcher = WS(stack, "watcher")
    watcher.send({"op": "subscribe", "id": "h", "topic": "health"})
    watcher.until(lambda m: m["op"] == "subscribed")
    for price in (10.0, 11.0):
        stack.tick("SNAPA", price)
    stack.tick("SNAPB", 20.0)
    heartbeat(stack, "snap-engine", "healthy")
    heartbeat(stack, "snap-db", "degraded")
    heartbeat(stack, "snap-engine", "degraded")
    watcher.until(lambda m: m["op"] == "event" and m["data"]["service"] == "snap-engine"
                  and m["data"]["status"] == "degraded")
    # The ticks were published before the last heartbeat: handled by now, or soon.
    client = WS(stack, "trader")
    poll(lambda: client.current("ticks", {"symbols": ["SNAPA", "SNAPB"]}, f"t{time.monotonic()}")
         .keys() == {"SNAPA", "SNAPB"}, TIMEOUT, "both symbols' current prices")
    prices = client.current("ticks", {"symbols": ["SNAPA", "SNAPB", "SNAPC"]}, "t")
    assert {symbol: data["price"] for symbol, data in prices.items()} == {
        "SNAPA": 11.0, "SNAPB": 20.0}
    health = client.current("health", None, "hl")
    assert health["snap-engine"]["status"] == "degraded"
    assert health["snap-db"]["status"] == "degraded"
    stack.tick("SNAPA", 12.0)
    live = client.until(lambda m: m["op"] == "event" and m["sub"] == "t")
    assert live["data"]["price"] == 12.0 and "snapshot" not in live
    watcher.close()
    client.close()


def test_a_node_that_starts_later_has_every_current_value_once_ready(
        stack: SocketIOStack) -> None:
    """
    A rarely traded symbol's tick and a service's heartbeat, then a node
    that starts after both (a rolling restart, a node added): once ready,
    it answers a new subscription with both at once, from the current
    values the first node shared in Redis.
    """
    watcher = WS(stack, "watcher")
    watcher.send({"op": "subscribe", "id": "t", "topic": "ticks",
                  "filter": {"symbols": ["SNAPRARE"]}})
    watcher.until(lambda m: m["op"] == "subscribed")
    stack.tick("SNAPRARE", 42.0)
    heartbeat(stack, "snap-rare", "degraded")
    watcher.until(lambda m: m["op"] == "event")
    watcher.close()
    poll(lambda: b"42" in stack.redis.command("HGET", "tickstock:current", '["ticks","SNAPRARE"]')
         and b"degraded" in stack.redis.command("HGET", "tickstock:current",
                                                '["health","snap-rare"]'),
         TIMEOUT, "both shared (within a second)")
    late = WS(stack, "trader", stack.add_daemon())
    prices = late.current("ticks", {"symbols": ["SNAPRARE"]}, "t")
    assert {symbol: data["price"] for symbol, data in prices.items()} == {"SNAPRARE": 42.0}
    assert late.current("health", None, "h")["snap-rare"]["status"] == "degraded"
    late.close()


def test_socketio_tickers_get_their_current_prices_first(stack: SocketIOStack) -> None:
    """
    The original front end's subscribe_tickers gets tick_data for each
    symbol's current price at once (marked snapshot), without an offset
    argument: a snapshot's id is no point to recover from.
    """
    watcher = WS(stack, "watcher")
    watcher.send({"op": "subscribe", "id": "t", "topic": "ticks", "filter": {"symbols": ["SNAPS"]}})
    watcher.until(lambda m: m["op"] == "subscribed")
    stack.tick("SNAPS", 30.0)
    watcher.until(lambda m: m["op"] == "event")  # the daemon has it
    watcher.close()
    seen: list[tuple[Any, ...]] = []
    sio = socketio.Client(reconnection=False)
    sio.on("tick_data", lambda *args: seen.append(args))
    sio.connect(stack.url(), auth={"token": stack.token("sio-trader")},
                transports=["websocket"], wait_timeout=TIMEOUT)
    try:
        sio.call("subscribe_tickers", {"tickers": ["SNAPS"]}, timeout=TIMEOUT)
        poll(lambda: bool(seen), TIMEOUT, "the current SNAPS price")
        (args,) = seen
        assert len(args) == 1  # no offset
        body = args[0]
        assert body["type"] == "tick_data" and body["snapshot"] is True
        assert body["event"]["data"]["price"] == 30.0
    finally:
        sio.disconnect()
        if sio.eio.http is not None:
            sio.eio.http.close()


def test_current_values_are_bounded_and_the_least_recently_updated_go() -> None:
    """
    At most max_keys current values are kept, all topics together; the key
    updated longest ago goes first; must-deliver events are not kept.
    """
    from tickstock.deliver.latest import Latest
    from tickstock.ingest.normalize import parse_event

    def tick(symbol: str, n: int) -> Any:
        return parse_event("tickstock.data.ticks", json.dumps(
            {"symbol": symbol, "price": n, "volume": 1}).encode(), f"{n}-0", 1.0)

    latest = Latest(max_keys=2)
    latest.keep(tick("AAA", 1))
    latest.keep(tick("BBB", 2))
    latest.keep(tick("AAA", 3))  # AAA is now the newest
    latest.keep(tick("CCC", 4))  # BBB goes
    assert [(e.symbol, e.id) for e in latest.of("ticks")] == [("AAA", "3-0"), ("CCC", "4-0")]
    assert [e.id for e in latest.of("ticks", frozenset({"CCC", "BBB", "AAA"}))] == ["3-0", "4-0"]
    assert latest.of("ticks", frozenset({"BBB"})) == []
    latest.keep(parse_event("tickstock.events.patterns", json.dumps(
        {"symbol": "AAA", "pattern": "Doji", "confidence": 0.9}).encode(), "5-0", 1.0))
    assert latest.of("patterns") == []
