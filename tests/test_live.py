"""
The live delivery path (L{tickstock.deliver.live}) and the components
C{/ready} is composed of, without a daemon. The broadcaster, throttle,
universes, cache, history and persister here are fakes that record calls.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tickstock.config import parse_redis_url
from tickstock.connections.redis import RedisLink
from tickstock.deliver.live import HandOff, LiveDelivery
from tickstock.deliver.overload import Overload
from tickstock.domain.events import EventIds
from tickstock.domain.interfaces import IComponent
from tickstock.domain.topics import DEFAULT_CHANNELS, Channel, Registry
from tickstock.history.redis import RedisHistory
from tickstock.ingest.normalize import parse_event
from tickstock.ops.canary import Canary

ADDRESS = parse_redis_url("redis://127.0.0.1:1/0")
IDS = EventIds()


def event(channel: str, **data: Any) -> Any:
    return parse_event(channel, orjson.dumps(data), IDS.next(1.0), 1.0)


PATTERN = {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.9, "timestamp": 1.0,
           "event_type": "pattern_detected"}


class Recorder:
    """A fake for every part the live path calls: records each call by name."""

    def __init__(self, reached: int = 1) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.reached = reached

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            if name == "deliver":
                return self.reached
            if name == "clients_of":
                return ["a", "b"]
            return None
        return call

    def __call__(self, *args: Any) -> None:
        self.calls.append(("__call__", args))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def live(reached: int = 1, keep: Any = None) -> tuple[LiveDelivery, dict[str, Any]]:
    parts: dict[str, Any] = {name: Recorder(reached) for name in (
        "ticks", "broadcaster", "universes", "cache", "history", "observed", "missed", "held")}

    def hold_final(deliver: Any) -> Any:
        def held(event: Any) -> None:
            parts["held"](event)
            deliver(event)
        return held

    delivery = LiveDelivery(Overload(Clock()), parts["ticks"], parts["broadcaster"],
                            parts["universes"], parts["cache"], parts["history"], hold_final,
                            parts["observed"], parts["missed"], keep)
    return delivery, parts


def test_a_tick_goes_to_the_throttle_only() -> None:
    delivery, parts = live()
    tick = event("tickstock.data.ticks", symbol="AAPL", price=1.0, volume=1, timestamp=1.0)
    delivery(tick)
    assert parts["ticks"].calls == [("__call__", (tick,))]
    assert parts["broadcaster"].calls == []


def test_a_broadcast_event_reaching_a_client_is_observed() -> None:
    delivery, parts = live()
    pattern = event("tickstock.events.patterns", **PATTERN)
    delivery(pattern)
    assert parts["broadcaster"].calls == [("deliver", (pattern,))]
    assert parts["observed"].calls == [("__call__", (pattern,))]
    assert parts["history"].calls == [] and parts["held"].calls == []


def test_a_targeted_event_waits_for_its_record_and_moves_the_pointer() -> None:
    delivery, parts = live()
    progress = replace(event("tickstock.events.backtesting.progress", job_id="j1",
                             progress=0.5), user="u1")
    delivery(progress)
    assert parts["held"].calls == [("__call__", (progress,))]
    assert parts["history"].calls == [("delivered", ("u1", progress.id))]


def test_an_event_nobody_received_is_not_observed() -> None:
    delivery, parts = live(reached=0)
    progress = replace(event("tickstock.events.backtesting.progress", job_id="j1",
                             progress=0.5), user="u1")
    delivery(progress)
    assert parts["observed"].calls == [] and parts["history"].calls == []


def test_a_universe_update_invalidates_keeps_and_retargets() -> None:
    kept: list[tuple[str, list[Any]]] = []

    def keep(key: str, symbols: list[Any]) -> None:
        kept.append((key, symbols))
        if key == "bad":
            raise ValueError("not symbols")

    delivery, parts = live(keep=keep)
    for key in ("etf_core", "bad"):
        delivery(event("tickstock.universe.updated", universe=key, symbols=["SPY"]))
    assert kept == [("etf_core", ["SPY"]), ("bad", ["SPY"])]
    assert parts["cache"].names() == ["invalidate", "invalidate"]
    assert parts["universes"].names() == ["changed", "changed"]
    assert parts["broadcaster"].names() == ["deliver", "deliver"]


def test_a_gap_tells_each_client_of_the_topic() -> None:
    delivery, parts = live()
    delivery.gap("patterns")
    assert parts["broadcaster"].calls == [("clients_of", ("patterns",))]
    assert parts["missed"].calls == [("__call__", ("a",)), ("__call__", ("b",))]


def test_the_hand_off_stores_ticks_stored_topics_and_job_events_only() -> None:
    persister = Recorder()
    quiet = Channel("tickstock.events.quiet", "patterns", "pattern_detected", stored=False)
    registry = Registry((*DEFAULT_CHANNELS, quiet))
    hand_off = HandOff(Overload(Clock()), persister, registry)
    tick = event("tickstock.data.ticks", symbol="AAPL", price=1.0, volume=1, timestamp=1.0)
    pattern = event("tickstock.events.patterns", **PATTERN)
    health = event("tickstock.health.status", status="ok", service="p")
    for each in (tick, pattern, health, replace(pattern, channel=quiet.name)):
        hand_off(each)
    assert persister.calls == [("add_tick", (tick,)), ("add_event", (pattern,))]


def test_every_ready_component_provides_its_interface() -> None:
    clock = Clock()
    link = RedisLink(clock, ADDRESS, 1)
    for component in (link, RedisHistory(clock, ADDRESS, link, 10, 60, 10),
                      Canary(clock, lambda channel, payload: None, "c", 1.0)):
        verifyObject(IComponent, component)
    assert link.status() == {"state": "connecting"} and not link.ready
