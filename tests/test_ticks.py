"""
Live ticks (L{tickstock.deliver.ticks}) behind their interfaces: the router hands a
pub/sub tick to L{LiveTicks}, which delivers it at once and claims it in one
batch per reactor turn. The claims here are a fake L{IClaims} (the real
one, Redis, is tested in test_resume with two daemons); time is a Clock.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from tickstock.deliver.ticks import CLAIM_BATCH, LiveTicks
from tickstock.domain.events import Event, id_key
from tickstock.domain.interfaces import IClaims
from tickstock.history.memory import MemoryHistory
from tickstock.ingest.memory import MemoryBus
from tickstock.ingest.router import Router

TICKS = "tickstock.data.ticks"
PATTERNS = "tickstock.events.patterns"


@implementer(IClaims)
class FakeClaims:
    """Answers each claim call when the test says, with the keys it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], Deferred[list[int]]]] = []

    def claim(self, keys: list[Any]) -> Deferred[list[int]]:
        d: Deferred[list[int]] = Deferred()
        self.calls.append((keys, d))
        return d


def tick(symbol: str, n: int) -> bytes:
    return orjson.dumps({"symbol": symbol, "price": 10 + n, "volume": n,
                         "timestamp": 1_700_000_000 + n})


def setup() -> tuple[Clock, MemoryHistory, FakeClaims, list[Event], list[Event], Router,
                     LiveTicks]:
    clock = Clock()
    clock.advance(1_700_000_000)
    history = MemoryHistory(clock, 100, 3600, 100)
    claims = FakeClaims()
    live: list[Event] = []
    persisted: list[Event] = []
    ticks = LiveTicks(clock, history, live.append, claims)
    router = Router(clock, history, MemoryBus(), stored=persisted.append, ticks=ticks)
    return clock, history, claims, live, persisted, router, ticks


def test_a_tick_goes_live_at_once_and_is_persisted_only_where_claimed():
    clock, history, claims, live, persisted, router, _ = setup()
    for n in range(3):
        assert router.receive(TICKS, tick("AAPL", n), key=f"k{n}") is None
    assert [e.data["volume"] for e in live] == [0, 1, 2]
    assert claims.calls == [] and router.in_flight == 3
    clock.advance(0)
    [(keys, answer)] = claims.calls
    assert keys == ["k0", "k1", "k2"]
    answer.callback([1, 0, 1])
    assert [e.data["volume"] for e in persisted] == [0, 2]
    assert (router.routed, router.duplicates, router.in_flight) == (2, 1, 0)


def test_claims_are_batched_and_a_failed_claim_is_counted_not_persisted():
    clock, _, claims, live, persisted, router, _ = setup()
    for n in range(CLAIM_BATCH + 1):
        router.receive(TICKS, tick("AAPL", n), key=n)
    clock.advance(0)
    assert [len(keys) for keys, _ in claims.calls] == [CLAIM_BATCH, 1]
    claims.calls[0][1].callback([1] * CLAIM_BATCH)
    claims.calls[1][1].errback(ConnectionError("redis went away"))
    assert len(live) == CLAIM_BATCH + 1
    assert len(persisted) == CLAIM_BATCH
    assert (router.routed, router.failed, router.in_flight) == (CLAIM_BATCH, 1, 0)


def test_tick_ids_order_between_stored_events_and_resume_gets_the_newest_per_symbol():
    """
    Ticks take ids after the last stored event delivered; a stored event
    after them sorts after them; a replay gives, per symbol, only the newest
    tick, and only if it is newer than the resume point.
    """
    clock, history, claims, live, _, router, ticks = setup()
    router.receive(PATTERNS, orjson.dumps({"symbol": "AAPL", "pattern": "Doji",
                                           "confidence": 0.5, "timestamp": 1}))
    stored = history.position
    router.receive(TICKS, tick("AAPL", 1), key="a")
    clock.advance(0.001)
    router.receive(TICKS, tick("MSFT", 2), key="b")
    seen = live[-1].id
    clock.advance(0.001)
    router.receive(TICKS, tick("AAPL", 3), key="c")
    router.receive(PATTERNS, orjson.dumps({"symbol": "AAPL", "pattern": "Doji",
                                           "confidence": 0.5, "timestamp": 2}))
    keys = [id_key(stored), *(id_key(e.id) for e in live), id_key(history.position)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)

    assert [e.data["volume"] for e in ticks.replay("0-0", None)] == [2, 3]
    assert [e.data["volume"] for e in ticks.replay(seen, None)] == [3]
    assert ticks.replay(seen, frozenset({"MSFT"})) == []
    assert ticks.replay(live[-1].id, None) == []


def test_without_claims_every_tick_is_this_process_own():
    """The embedded bus: one process, nothing to claim (its key is None)."""
    clock = Clock()
    history = MemoryHistory(clock, 100, 3600, 100)
    persisted: list[Event] = []
    ticks = LiveTicks(clock, history, lambda event: None, None)
    router = Router(clock, history, MemoryBus(), stored=persisted.append, ticks=ticks)
    router.receive(TICKS, tick("AAPL", 1))
    assert len(persisted) == 1 and router.routed == 1 and router.in_flight == 0
