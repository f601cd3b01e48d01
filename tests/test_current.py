"""
The current values shared by the nodes (L{tickstock.history.redis.current}),
against a real Redis over real connections, each node's values in a real
L{Latest}; the flush timer runs on a Clock. What a daemon that starts later
serves from them is in tests/test_snapshot.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from tests.wsclient import eventually
from tickstock.config import parse_redis_url
from tickstock.connections.redis import RedisLink
from tickstock.deliver.latest import Latest
from tickstock.domain.events import Event
from tickstock.history.redis.current import CURRENT_KEY, FLUSH, ORDER_KEY, CurrentValues
from tickstock.ingest.normalize import parse_event


def tick(symbol: str, price: float, event_id: str, at: float) -> Event:
    return parse_event("tickstock.data.ticks", json.dumps(
        {"symbol": symbol, "price": price, "volume": 1}).encode(), event_id, at)


def health(service: str, status: str, event_id: str, at: float) -> Event:
    return parse_event("tickstock.health.status", json.dumps(
        {"service": service, "status": status}).encode(), event_id, at)


class Priming(Latest):
    """A node's Latest that also records what it was primed with."""

    def __init__(self, max_keys: int = 100) -> None:
        super().__init__(max_keys)
        self.primed: list[list[Event]] = []

    def prime(self, events: list[Event]) -> None:
        self.primed.append(events)
        super().prime(events)


@pytest.fixture
def nodes(redis_server: Any) -> Iterator[Callable[..., Any]]:
    """
    Started CurrentValues, each a node's, on its own link to the test's
    Redis, with its own Latest and Clock.
    """
    started: list[tuple[CurrentValues, RedisLink]] = []

    async def start(max_keys: int = 100) -> tuple[CurrentValues, Clock, Priming]:
        link = RedisLink(reactor, parse_redis_url(redis_server.url), 0, reply_timeout=2.0)
        clock, latest = Clock(), Priming()
        current = CurrentValues(clock, link, max_keys)  # its script loads as the link connects
        current.latest = latest
        link.startService()
        # Loading retries on the Clock while the link connects: connected first.
        await eventually(lambda: link.connected, 10, "the link to connect")
        current.startService()
        started.append((current, link))
        await eventually(lambda: current.ready, 10, "the values loaded")
        return current, clock, latest

    yield start
    for current, link in started:
        if current.running:
            pytest_twisted.blockon(current.stopService())
        pytest_twisted.blockon(link.stopService())


async def kept(current: CurrentValues) -> dict[Any, Any]:
    """The hash as Redis holds it: each key (decoded) to [id, channel, type, topic, data]."""
    reply = await current._link.execute("HGETALL", CURRENT_KEY)
    return {tuple(orjson.loads(reply[i])): orjson.loads(reply[i + 1])
            for i in range(0, len(reply), 2)}


async def flush(current: CurrentValues, clock: Clock) -> None:
    """One flush, and its write answered (a PING behind it on the same connection)."""
    clock.advance(FLUSH)
    await current._link.execute("PING")


@pytest_twisted.ensureDeferred
async def test_a_node_that_starts_is_primed_with_what_the_others_had(nodes) -> None:
    """
    Once per FLUSH a node writes the values that changed in its Latest:
    the newest per key, not a job's progress, nothing twice. A node that
    starts later is primed with them all, oldest first, each with its key,
    and is ready only then.
    """
    one, clock, latest = await nodes()
    assert latest.primed == [[]] and one.status()["state"] == "loaded"
    latest.keep(tick("AAA", 10.0, "5-0", 100.0))
    latest.keep(tick("AAA", 11.0, "6-0", 101.0))
    latest.keep(health("engine", "healthy", "7-0", 102.0))
    latest.keep(tick("BBB", 20.0, "8-0", 103.0))
    latest.keep(parse_event("tickstock.events.backtesting.progress", json.dumps(
        {"job_id": "j1", "progress": 0.5}).encode(), "8-2", 104.0))
    assert await kept(one) == {}  # not before the flush
    await flush(one, clock)
    assert one.written == 3
    values = await kept(one)
    assert values[("ticks", "AAA")][0] == "6-0" and values[("ticks", "AAA")][4]["price"] == 11.0
    assert set(values) == {("ticks", "AAA"), ("ticks", "BBB"), ("health", "engine")}
    await flush(one, clock)
    assert one.written == 3  # nothing changed: nothing written
    latest.keep(tick("BBB", 21.0, "9-0", 105.0))
    await flush(one, clock)
    assert one.written == 4 and (await kept(one))[("ticks", "BBB")][4]["price"] == 21.0

    two, _, later = await nodes()
    [events] = later.primed
    assert [(e.id, e.latest) for e in events] == [
        ("6-0", ("ticks", "AAA")), ("7-0", ("health", "engine")), ("9-0", ("ticks", "BBB"))]
    assert events[0].data["price"] == 11.0 and events[0].symbol == "AAA"
    assert events[1].data["status"] == "healthy" and two.status()["loaded"] == 3
    assert {e.symbol: e.data["price"] for e in later.of("ticks")} == {"AAA": 11.0, "BBB": 21.0}


@pytest_twisted.ensureDeferred
async def test_an_older_value_from_another_node_does_not_replace_a_newer(nodes) -> None:
    """
    Two nodes saw different ticks of one symbol last (one is behind) and
    write at different times: the value received last stays, whichever
    node writes last; a value primed from Redis is not written back.
    """
    one, clock_one, latest_one = await nodes()
    two, clock_two, latest_two = await nodes()
    latest_one.keep(tick("AAA", 12.0, "9-0", 105.0))
    await flush(one, clock_one)
    assert one.written == 1
    latest_two.keep(tick("AAA", 11.0, "8-0", 104.0))
    await flush(two, clock_two)
    assert two.written == 0 and two.write_failures == 0
    values = await kept(one)
    assert list(values) == [("ticks", "AAA")] and values[("ticks", "AAA")][4]["price"] == 12.0

    three, clock_three, _ = await nodes()
    await flush(three, clock_three)
    assert three.written == 0


@pytest_twisted.ensureDeferred
async def test_past_the_most_kept_the_least_recently_updated_go(nodes) -> None:
    """Redis keeps max_keys values at most: the key updated longest ago goes first."""
    one, clock, latest = await nodes(max_keys=2)
    latest.keep(tick("AAA", 1.0, "1-0", 100.0))
    latest.keep(tick("BBB", 2.0, "2-0", 101.0))
    latest.keep(tick("CCC", 3.0, "3-0", 102.0))
    await flush(one, clock)
    assert one.written == 3
    assert set(await kept(one)) == {("ticks", "BBB"), ("ticks", "CCC")}
    assert await one._link.execute("ZCARD", ORDER_KEY) == 2


@pytest_twisted.ensureDeferred
async def test_what_cannot_be_read_is_skipped_and_a_write_lost_is_written_again(
        nodes, redis_server) -> None:
    """
    A value not written by TickStock is counted and skipped. A write that
    fails (Redis is gone) is written again by the next flush once Redis is
    back, or its newer value is.
    """
    redis_server.command("HSET", CURRENT_KEY, "not json", "[1]", '["ticks","ZZZ"]', "{}",
                         '["ticks",["ZZZ"]]', '["1-0","c","tick","ticks",{}]')
    one, clock, latest = await nodes()
    assert latest.primed == [[]] and one.status()["unreadable"] == 3
    latest.keep(tick("AAA", 1.0, "1-0", 100.0))
    latest.keep(tick("BBB", 2.0, "2-0", 100.0))
    redis_server.kill()
    clock.advance(FLUSH)
    await eventually(lambda: one.write_failures == 1, 10, "the write failed")
    latest.keep(tick("BBB", 3.0, "3-0", 101.0))
    redis_server.start()
    await eventually(lambda: one._link.connected, 20, "the link back")
    await flush(one, clock)
    values = await kept(one)
    assert {key[1]: value[4]["price"] for key, value in values.items()} == {"AAA": 1.0, "BBB": 3.0}


@pytest_twisted.ensureDeferred
async def test_a_key_of_another_type_loads_nothing_and_the_node_is_ready(
        nodes, redis_server) -> None:
    """Someone else's key of that name: nothing is primed, and the node serves."""
    redis_server.command("SET", CURRENT_KEY, "mine")
    one, _, latest = await nodes()
    assert latest.primed == [] and one.loaded == 0


def test_primed_values_never_replace_live_ones_and_go_first() -> None:
    """
    Latest.prime keeps a primed value only where nothing came live since
    the node started; primed values are the least recently updated, so
    they are the first to go when the bound is reached.
    """
    latest = Latest(max_keys=3)
    latest.keep(tick("AAA", 50.0, "20-0", 200.0))
    latest.prime([tick("AAA", 40.0, "10-0", 100.0), tick("BBB", 41.0, "11-0", 101.0),
                  health("engine", "healthy", "12-0", 102.0)])
    assert {e.symbol: e.data["price"] for e in latest.of("ticks")} == {"AAA": 50.0, "BBB": 41.0}
    assert [e.data["service"] for e in latest.of("health")] == ["engine"]
    latest.keep(tick("CCC", 60.0, "21-0", 201.0))  # full: the oldest primed one goes
    assert {e.symbol for e in latest.of("ticks")} == {"AAA", "CCC"}
    assert [e.data["service"] for e in latest.of("health")] == ["engine"]
