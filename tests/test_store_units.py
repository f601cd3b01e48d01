"""
Unit tests of the parts between the store and delivery, each behind its
interface with time on a L{Clock}: the per-symbol tick throttle, universe
filters kept current (over the real L{MemoryStore} and L{Broadcaster}), and
deep catch-up paging (over the real L{MemoryStore}).
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.task import Clock

from tickstock.deliver.broadcast import Broadcaster, Filter
from tickstock.deliver.catchup import deepen
from tickstock.deliver.throttle import TickThrottle
from tickstock.deliver.universes import Universes
from tickstock.domain.errors import BadRequest
from tickstock.domain.events import Event, id_before
from tickstock.domain.stored import Replay
from tickstock.ingest.normalize import parse_event
from tickstock.store.memory import MemoryStore


def now(d: Any) -> Any:
    """The result of a Deferred that has fired (the memory store answers at once)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def tick(symbol: str, n: int) -> Event:
    return parse_event("tickstock.data.ticks", orjson.dumps(
        {"symbol": symbol, "price": 1.0 + n, "volume": 1, "timestamp": 1_700_000_000 + n}),
        f"1-{n}", 0)


def pattern(symbol: str, n: int) -> Event:
    return parse_event("tickstock.events.patterns", orjson.dumps(
        {"symbol": symbol, "pattern": "Doji", "confidence": 0.5, "timestamp": 1_700_000_000}),
        f"1000-{n}", 0)


def test_tick_throttle_sends_the_newest_at_most_rate_per_second() -> None:
    """A burst per symbol: the first at once, then only the newest, one interval later."""
    clock, sent = Clock(), []
    throttle = TickThrottle(clock, 4, sent.append)
    for n in range(10):
        throttle(tick("AAPL", n))
    throttle(tick("MSFT", 100))
    assert [e.id for e in sent] == ["1-0", "1-100"]
    clock.advance(0.2)
    assert [e.id for e in sent] == ["1-0", "1-100"]
    clock.advance(0.05)
    assert [e.id for e in sent][-1] == "1-9" and throttle.conflated == 8
    clock.advance(10)
    throttle(tick("AAPL", 11))
    assert sent[-1].id == "1-11" and len(sent) == 4


def test_ticks_of_symbols_nobody_watches_stop_at_the_throttle() -> None:
    """What the broadcaster's index says nobody wants is neither paced nor delivered."""
    clock, sent = Clock(), []
    broadcaster = Broadcaster(lambda frame: frame)
    throttle = TickThrottle(clock, 4, sent.append,
                            lambda symbol: broadcaster.watched("ticks", symbol))

    class Client:
        user = "u"
        dialect = None

        def frame(self, event: Any, sub_id: str) -> bytes:
            return bytes(event.frame(sub_id))

        def send(self, frame: Any, key: Any = None) -> None:
            pass

    sub = broadcaster.subscribe(Client(), "t", "ticks", Filter(symbols=frozenset({"AAPL"})))
    throttle(tick("AAPL", 1))
    throttle(tick("MSFT", 2))
    assert [e.id for e in sent] == ["1-1"]
    broadcaster.unsubscribe(sub)
    clock.advance(1)
    throttle(tick("AAPL", 3))
    assert [e.id for e in sent] == ["1-1"]
    broadcaster.subscribe(Client(), "all", "ticks", Filter())
    throttle(tick("MSFT", 4))
    assert [e.id for e in sent] == ["1-1", "1-4"]


def test_universes_resolve_and_retarget_subscriptions() -> None:
    """An update event naming a universe re-reads it and retargets its subscriptions."""
    clock = Clock()
    store = MemoryStore(clock, universes={"growth": {"type": "etf_universe", "symbols": ["QQQ"]}})
    frames: list[Any] = []
    broadcaster = Broadcaster(lambda frame: frame)
    universes = Universes(store, broadcaster)

    class Client:
        user = "u"
        dialect = None

        def frame(self, event: Any, sub_id: str) -> bytes:
            return bytes(event.frame(sub_id))

        def send(self, frame: Any, key: Any = None) -> None:
            frames.append(orjson.loads(frame)["data"]["symbol"])

    symbols = now(universes.resolve("growth"))
    assert symbols == {"QQQ"}
    sub = broadcaster.subscribe(Client(), "s", "patterns",
                                Filter(symbols=symbols | {"AAPL"}, universe="growth"))
    universes.track(sub, frozenset({"AAPL"}))
    broadcaster.deliver(pattern("VUG", 1))
    store.set_universe("growth", "etf_universe", ["QQQ", "VUG"])
    universes.changed(parse_event("tickstock.universe.updated", orjson.dumps(
        {"timestamp": 1, "universe": "other"}), "2-0", 0))
    assert universes.refreshes == 0, "an event naming another universe changes nothing"
    universes.changed(parse_event("tickstock.universe.updated", orjson.dumps(
        {"timestamp": 1}), "2-1", 0))
    assert sub.filter.symbols == {"QQQ", "VUG", "AAPL"}
    for symbol in ("VUG", "AAPL", "SPY"):
        broadcaster.deliver(pattern(symbol, 2))
    assert frames == ["VUG", "AAPL"]
    universes.untrack(sub)
    broadcaster.unsubscribe(sub)
    failure = now(universes.resolve("nope").addErrback(lambda f: f))
    assert isinstance(failure.value, BadRequest) and failure.value.code == "unknown_universe"


def test_deep_catch_up_pages_until_the_gap_is_filled() -> None:
    """
    2,500 stored events, a history that dropped all up to the 2,400th:
    read in pages, in order; recovered only when the newest dropped event
    is in the store; capped at the limit, saying where it stopped.
    """
    store = MemoryStore(Clock())
    events = [pattern("AAPL" if n % 2 else "MSFT", n) for n in range(2500)]
    now(store.write([], events))
    kept = [e for e in events[2401:] if e.symbol == "AAPL"]
    replay = Replay(kept, {"from": "1000-10", "to": "1000-2400", "count": 2390})

    def run(limit: int, symbols: Any = ("AAPL",)) -> Replay:
        return now(deepen(replay, store, "patterns", "1000-10", symbols, limit))

    full = run(10_000)
    assert full.missed is None
    ids = [e.id for e in full.events]
    assert ids == [f"1000-{n}" for n in range(11, 2500) if n % 2]
    capped = run(100)
    assert len(capped.events) == 100 + len(kept)
    assert capped.missed["from"] == "1000-209" and capped.missed["to"] == "1000-2400"
    empty = MemoryStore(Clock())
    assert now(
        deepen(replay, empty, "patterns", "1000-10", None, 100)).missed == replay.missed
    assert now(
        deepen(replay, store, "ticks", "1000-10", None, 100)) is replay
    assert id_before("5-0") == f"4-{2**63 - 1}" and id_before("5-3") == "5-2"
