"""
The current values shared by the nodes (L{tickstock.history.redis.current}),
against a real Redis over real connections; the flush timer runs on a
Clock. What a daemon that starts later serves from them is in
tests/test_snapshot.py.
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


@pytest.fixture
def nodes(redis_server: Any) -> Iterator[Callable[..., Any]]:
    """
    Started CurrentValues, each a node's, on its own link to the test's
    Redis and its own Clock; with what each was primed with.
    """
    started: list[tuple[CurrentValues, RedisLink]] = []

    async def start(max_keys: int = 100) -> tuple[CurrentValues, Clock, list[Any]]:
        link = RedisLink(reactor, parse_redis_url(redis_server.url), 0, reply_timeout=2.0)
        clock, primed = Clock(), []
        current = CurrentValues(clock, link, max_keys)  # its script loads as the link connects
        current.prime = primed.append
        link.startService()
        # Loading retries on the Clock while the link connects: connected first.
        await eventually(lambda: link.connected, 10, "the link to connect")
        current.startService()
        started.append((current, link))
        return current, clock, primed

    yield start
    for current, link in started:
        if current.running:
            pytest_twisted.blockon(current.stopService())
        pytest_twisted.blockon(link.stopService())


async def kept(link_owner: CurrentValues) -> dict[Any, Any]:
    """The hash as Redis holds it: each key (decoded) to [id, channel, type, topic, data]."""
    reply = await link_owner._link.execute("HGETALL", CURRENT_KEY)
    return {tuple(orjson.loads(reply[i])): orjson.loads(reply[i + 1])
            for i in range(0, len(reply), 2)}


@pytest_twisted.ensureDeferred
async def test_a_node_that_starts_is_primed_with_what_the_others_noted(nodes) -> None:
    """
    One node notes ticks and a heartbeat; once per FLUSH they are written,
    the newest per key. A node that starts later is primed with them all,
    oldest first, each with its key, and is ready only then.
    """
    one, clock, primed = await nodes()
    await eventually(lambda: one.ready, 10, "the first node loaded (nothing)")
    assert primed == [[]] and one.status()["state"] == "loaded"
    one.note(tick("AAA", 10.0, "5-0", 100.0))
    one.note(tick("AAA", 11.0, "6-0", 101.0))
    one.note(health("engine", "healthy", "7-0", 102.0))
    one.note(tick("BBB", 20.0, "8-0", 103.0))
    assert await kept(one) == {}  # not before the flush
    clock.advance(FLUSH)
    await eventually(lambda: one.written == 3, 10, "three values written")
    values = await kept(one)
    assert values[("ticks", "AAA")][0] == "6-0" and values[("ticks", "AAA")][4]["price"] == 11.0
    assert set(values) == {("ticks", "AAA"), ("ticks", "BBB"), ("health", "engine")}

    two, _, later = await nodes()
    await eventually(lambda: two.ready, 10, "the second node loaded")
    [events] = later
    assert [(e.id, e.latest) for e in events] == [
        ("6-0", ("ticks", "AAA")), ("7-0", ("health", "engine")), ("8-0", ("ticks", "BBB"))]
    assert events[0].data["price"] == 11.0 and events[0].symbol == "AAA"
    assert events[1].data["status"] == "healthy" and two.status()["loaded"] == 3


@pytest_twisted.ensureDeferred
async def test_an_older_value_from_another_node_does_not_replace_a_newer(nodes) -> None:
    """
    Two nodes count different ticks of one symbol and write at different
    times: the value received last stays, whichever node writes last.
    Must-deliver and job events are never noted.
    """
    one, clock_one, _ = await nodes()
    two, clock_two, _ = await nodes()
    await eventually(lambda: one.ready and two.ready, 10, "both loaded")
    one.note(tick("AAA", 12.0, "9-0", 105.0))
    clock_one.advance(FLUSH)
    await eventually(lambda: one.written == 1, 10, "the newer written")
    two.note(tick("AAA", 11.0, "8-0", 104.0))
    two.note(parse_event("tickstock.events.patterns", json.dumps(
        {"symbol": "AAA", "pattern": "Doji", "confidence": 0.9}).encode(), "8-1", 104.0))
    two.note(parse_event("tickstock.events.backtesting.progress", json.dumps(
        {"job_id": "j1", "progress": 0.5}).encode(), "8-2", 104.0))
    assert two.status()["pending"] == 1
    clock_two.advance(FLUSH)
    await two._link.execute("PING")  # answered after the write sent before it
    assert two.written == 0 and two.write_failures == 0
    values = await kept(one)
    assert list(values) == [("ticks", "AAA")] and values[("ticks", "AAA")][4]["price"] == 12.0


@pytest_twisted.ensureDeferred
async def test_past_the_most_kept_the_least_recently_updated_go(nodes) -> None:
    """Redis keeps max_keys values at most: the key updated longest ago goes first."""
    one, clock, _ = await nodes(max_keys=2)
    await eventually(lambda: one.ready, 10, "loaded")
    one.note(tick("AAA", 1.0, "1-0", 100.0))
    one.note(tick("BBB", 2.0, "2-0", 101.0))
    one.note(tick("CCC", 3.0, "3-0", 102.0))
    clock.advance(FLUSH)
    await eventually(lambda: one.written == 3, 10, "written")
    assert set(await kept(one)) == {("ticks", "BBB"), ("ticks", "CCC")}
    assert await one._link.execute("ZCARD", ORDER_KEY) == 2


@pytest_twisted.ensureDeferred
async def test_what_cannot_be_read_is_skipped_and_a_write_lost_is_kept_for_the_next(
        nodes, redis_server) -> None:
    """
    A value not written by TickStock is counted and skipped; a write that
    fails (Redis is gone) keeps its values for the next flush, unless a
    newer one was noted meanwhile.
    """
    redis_server.command("HSET", CURRENT_KEY, "not json", "[1]", '["ticks","ZZZ"]', "{}")
    one, clock, primed = await nodes()
    await eventually(lambda: one.ready, 10, "loaded")
    assert primed == [[]] and one.status()["unreadable"] == 2
    one.note(tick("AAA", 1.0, "1-0", 100.0))
    redis_server.stop()
    clock.advance(FLUSH)
    await eventually(lambda: one.write_failures == 1, 10, "the write failed")
    one.note(tick("BBB", 2.0, "2-0", 101.0))
    assert one.status()["pending"] == 2


@pytest_twisted.ensureDeferred
async def test_a_key_of_another_type_loads_nothing_and_the_node_is_ready(
        nodes, redis_server) -> None:
    """Someone else's key of that name: nothing is primed, and the node serves."""
    redis_server.command("SET", CURRENT_KEY, "mine")
    one, _, primed = await nodes()
    await eventually(lambda: one.ready, 10, "ready")
    assert primed == [] and one.loaded == 0


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
