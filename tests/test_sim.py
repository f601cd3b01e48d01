"""
Tests for L{tickstock.sim.producer}: the producer simulator's events,
backtests, jobs and pacing.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from collections import Counter
from datetime import date
from itertools import pairwise
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, task

from tickstock.sim import producer as sim
from tickstock.sim.producer import (
    Backtester,
    JobRunner,
    MarketSimulator,
    Producer,
    default_symbols,
)

SYMBOL = re.compile(r"^[A-Z0-9.-]{1,10}$")
JOB = {"job_type": "backtest", "job_id": "job-1", "user_id": "alice", "symbols": ["AAPL", "MSFT"],
       "start_date": "2023-01-01", "end_date": "2023-12-31", "patterns": ["Doji"],
       "timestamp": 1700000000.0}


class Recorder:
    """A publish callable that keeps every (channel, decoded payload) it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def __call__(self, channel: str, payload: bytes) -> None:
        assert isinstance(payload, bytes)
        self.sent.append((channel, orjson.loads(payload)))

    def on(self, channel: str) -> list[Any]:
        """The decoded messages sent on C{channel}, in order."""
        return [m for c, m in self.sent if c == channel]


def make_sim(seed: int = 1, n: int = 30) -> MarketSimulator:
    """A simulator over the first C{n} default symbols, seeded for reproducibility."""
    return MarketSimulator(default_symbols(n), random.Random(seed))


def number(value: Any) -> bool:
    """True for a finite int or float (bool excluded), as the contract requires."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def all_finite(value: Any) -> bool:
    """True if every number nested anywhere in C{value} is finite."""
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def assert_contract(channel: str, event: dict[str, Any]) -> None:
    """Check one producer message against docs/contract.md §1."""
    assert all_finite(event) and orjson.loads(orjson.dumps(event)) == event
    assert number(event["timestamp"])
    assert isinstance(event["event_id"], str) and 0 < len(event["event_id"]) <= 64
    if "symbol" in event:
        assert SYMBOL.match(event["symbol"])
    kind = event["event_type"]
    if channel == sim.TICKS:
        assert kind == "tick" and number(event["price"]) and event["price"] > 0
        assert isinstance(event["volume"], int) and event["volume"] > 0
    elif channel == sim.PATTERNS_CHANNEL:
        assert kind == "pattern_detected" and event["pattern"] in sim.PATTERNS
        assert number(event["confidence"]) and 0.5 <= event["confidence"] <= 1.0
        assert event["timeframe"] in ("1min", "5min", "daily") and event["price"] > 0
    elif channel == sim.MARKET_STATE:
        assert kind in ("ranking_change", "sector_rotation", "stage_change")
        assert isinstance(event["symbol"], str) and isinstance(event["metric"], str)
        assert kind != "ranking_change" or isinstance(event["rank_change"], int)
    elif channel == sim.HEALTH:
        assert kind == "health" and event["service"] == "tickstockpl"
        assert event["status"] in ("healthy", "degraded", "down") and event["uptime_s"] >= 0
    else:
        assert sim.UNIVERSE_CHANNELS[kind] == channel
        for symbols in (event.get("symbols", []), list(event.get("correlations", {}))):
            assert all(SYMBOL.match(s) for s in symbols)


def test_default_symbols() -> None:
    """Real tickers come first, synthetic SYMnnnn ones after, all unique and well-formed."""
    assert default_symbols(3) == ["AAPL", "MSFT", "NVDA"]
    many = default_symbols(10000)
    assert len(set(many)) == 10000 and all(SYMBOL.match(s) for s in many)
    assert default_symbols(101)[-1] == "SYM0101"
    for bad in (0, 10001):
        with pytest.raises(ValueError):
            default_symbols(bad)


def test_every_kind_meets_the_contract() -> None:
    """Each event maker, and the weighted mix, produces messages with the contract's fields."""
    s = make_sim()
    makers = [s.tick, s.pattern, s.market_state, s.health, s.universe, s.next_event]
    seen: Counter[str] = Counter()
    for i in range(3000):
        channel, event = makers[i % len(makers)](1000.0 + i)
        assert_contract(channel, event)
        assert event["timestamp"] == 1000.0 + i
        seen[channel] += 1
    assert set(seen) == {sim.TICKS, sim.PATTERNS_CHANNEL, sim.MARKET_STATE, sim.HEALTH,
                         *sim.UNIVERSE_CHANNELS.values()}


def test_given_symbol_and_price_walk() -> None:
    """A given symbol is used, and its price moves by small geometric steps."""
    s = make_sim()
    start = s.prices["AAPL"]
    assert 20 <= start <= 500
    prices = [s.tick(0.0, "AAPL")[1]["price"] for _ in range(100)]
    assert all(abs(b / a - 1) < 0.01 for a, b in pairwise([start, *prices]))
    assert len(set(prices)) > 50
    assert s.pattern(0.0, "AAPL")[1]["price"] == round(s.prices["AAPL"], 4)


def test_event_mix_and_unique_ids() -> None:
    """next_event() draws ticks ~70% and patterns ~15%, and never repeats an event id."""
    s = make_sim()
    events = [s.next_event(float(i)) for i in range(10000)]
    kinds = Counter(e["event_type"] for _, e in events)
    assert 0.67 < kinds["tick"] / 10000 < 0.73
    assert 0.13 < kinds["pattern_detected"] / 10000 < 0.17
    assert len({e["event_id"] for _, e in events}) == 10000


def test_same_seed_same_events() -> None:
    """Two simulators with the same seed emit identical streams; another seed differs."""
    a, b, c = make_sim(7), make_sim(7), make_sim(8)
    stream_a = [a.next_event(float(i)) for i in range(500)]
    assert stream_a == [b.next_event(float(i)) for i in range(500)]
    assert stream_a != [c.next_event(float(i)) for i in range(500)]


def test_simulator_rejects_bad_symbols() -> None:
    """Symbols outside the contract's alphabet are refused up front."""
    for symbols in ([], ["aapl"], ["TOOLONGSYMBOL"]):
        with pytest.raises(ValueError):
            MarketSimulator(symbols, random.Random(0))


def test_backtest_results_shape() -> None:
    """A backtest yields finite metrics in range, rounded to 4 places, with trades counted."""
    r = Backtester().run(JOB)
    assert set(r) == {"win_rate", "roi", "sharpe_ratio", "max_drawdown", "trades", "symbols"}
    assert all(number(v) for v in r.values()) and r["symbols"] == 2 and r["trades"] > 0
    assert 0 <= r["win_rate"] <= 1 and r["max_drawdown"] >= 0 and r["roi"] > -1
    assert all(round(v, 4) == v for v in r.values())


def test_backtest_deterministic_and_input_sensitive() -> None:
    """Equal inputs give equal results; other ranges, symbols or seeds give other results."""
    base = Backtester(0).run(JOB)
    assert Backtester(0).run(dict(JOB)) == base
    for change in ({"start_date": "2022-01-01", "end_date": "2022-12-31"},
                   {"end_date": "2023-06-30"}, {"symbols": ["NVDA", "MSFT"]}):
        assert Backtester(0).run({**JOB, **change}) != base
    assert Backtester(1).run(JOB) != base


def test_backtest_bars_agree_across_ranges() -> None:
    """Bars are business days only, and a day's return is the same in overlapping ranges."""
    bt = Backtester()
    a = {b[0]: b for b in bt.bars("AAPL", date(2020, 1, 1), date(2020, 12, 31))}
    b = {b[0]: b for b in bt.bars("AAPL", date(2020, 6, 1), date(2021, 3, 1))}
    assert all(d.weekday() < 5 for d in (*a, *b))
    common = sorted(set(a) & set(b))
    assert len(common) > 100
    for d0, d1 in pairwise(common):
        assert a[d1][4] / a[d0][4] == pytest.approx(b[d1][4] / b[d0][4])
    for _, o, h, lo, c, v in a.values():
        assert lo <= min(o, c) <= max(o, c) <= h and v > 0


def test_backtest_edge_cases_and_cap() -> None:
    """Weekend-only ranges give zeros; huge jobs are capped to 50 symbols and 10 years."""
    weekend = Backtester().run({**JOB, "start_date": "2023-01-07", "end_date": "2023-01-08"})
    assert weekend == {"win_rate": 0.0, "roi": 0.0, "sharpe_ratio": 0.0, "max_drawdown": 0.0,
                       "trades": 0, "symbols": 2}
    huge = {**JOB, "symbols": default_symbols(80), "start_date": "1990-01-01",
            "end_date": "2023-12-31"}
    capped = {**JOB, "symbols": default_symbols(50),
              "start_date": date.fromordinal(date(2023, 12, 31).toordinal() - 3653).isoformat(),
              "end_date": "2023-12-31"}
    assert Backtester().run(huge) == Backtester().run(capped)
    with pytest.raises(ValueError):
        Backtester().run({**JOB, "start_date": "2024-01-01"})


def test_job_runner_progress_then_result() -> None:
    """A job publishes 0.25, 0.5, 0.75, 1.0 one interval apart, then the computed result."""
    clock, rec = task.Clock(), Recorder()
    runner = JobRunner(clock, rec, Backtester(3), step_interval=0.5)
    assert runner.handle_job(orjson.dumps(JOB)) == "job-1"
    for step in range(4):
        assert len(rec.sent) == step
        clock.advance(0.5)
    progress = rec.on(sim.PROGRESS)
    assert [p["progress"] for p in progress] == [0.25, 0.5, 0.75, 1.0]
    assert [p["status"] for p in progress] == ["running"] * 3 + ["completed"]
    assert [p["timestamp"] for p in progress] == [0.5, 1.0, 1.5, 2.0]
    [result] = rec.on(sim.RESULTS)
    assert rec.sent[-1][0] == sim.RESULTS
    assert result["results"] == Backtester(3).run(JOB)
    assert (result["job_id"], result["user_id"], result["completed_at"]) == ("job-1", "alice", 2.0)
    for _, event in rec.sent:
        assert event["event_type"] in ("backtest_progress", "backtest_result")
        assert number(event["timestamp"]) and len(event["event_id"]) <= 64
        assert 0 <= event.get("progress", 0) <= 1
    assert len({e["event_id"] for _, e in rec.sent}) == 5
    assert clock.getDelayedCalls() == []


def test_job_results_follow_the_job() -> None:
    """Jobs over different ranges get different results; identical jobs identical ones."""
    clock, rec = task.Clock(), Recorder()
    runner = JobRunner(clock, rec, Backtester(), step_interval=1.0)
    jobs = [{**JOB, "job_id": "a"}, {**JOB, "job_id": "b"},
            {**JOB, "job_id": "c", "start_date": "2021-01-01", "end_date": "2021-12-31"}]
    for job in jobs:
        runner.handle_job(orjson.dumps(job))
    clock.pump([1.0] * 4)
    results = {r["job_id"]: r["results"] for r in rec.on(sim.RESULTS)}
    assert results["a"] == results["b"] != results["c"]


def test_cancel_stops_remaining_steps() -> None:
    """Cancelling after two steps publishes a final 'cancelled' progress and nothing more."""
    clock, rec = task.Clock(), Recorder()
    runner = JobRunner(clock, rec, Backtester(), step_interval=0.5)
    runner.handle_job(orjson.dumps(JOB))
    clock.pump([0.5, 0.5])
    assert runner.handle_control(orjson.dumps({"action": "cancel", "job_id": "job-1"}))
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert [(p["progress"], p["status"]) for p in rec.on(sim.PROGRESS)] == [
        (0.25, "running"), (0.5, "running"), (0.5, "cancelled")]
    assert rec.on(sim.RESULTS) == []
    assert not runner.handle_control(orjson.dumps({"action": "cancel", "job_id": "job-1"}))
    assert runner.rejected == 0
    assert not runner.handle_control(b"{not json")
    assert not runner.handle_control(orjson.dumps({"action": "pause", "job_id": "x"}))
    assert runner.rejected == 2


@pytest.mark.parametrize("payload", [
    b"not json", b"[1, 2]", b"null",
    orjson.dumps({k: v for k, v in JOB.items() if k != "job_id"}),
    orjson.dumps({**JOB, "job_type": "optimize"}),
    orjson.dumps({**JOB, "job_id": 7}),
    orjson.dumps({**JOB, "symbols": []}),
    orjson.dumps({**JOB, "symbols": ["aapl"]}),
    orjson.dumps({**JOB, "symbols": "AAPL"}),
    orjson.dumps({**JOB, "start_date": "yesterday"}),
    orjson.dumps({**JOB, "start_date": "2024-02-01", "end_date": "2024-01-01"}),
    orjson.dumps({**JOB, "patterns": "Doji"}),
])
def test_malformed_jobs_are_counted_and_ignored(payload: bytes) -> None:
    """A malformed job message is counted in rejected and schedules or publishes nothing."""
    clock, rec = task.Clock(), Recorder()
    runner = JobRunner(clock, rec, Backtester())
    assert runner.handle_job(payload) is None
    assert runner.rejected == 1 and clock.getDelayedCalls() == []
    clock.advance(10)
    assert rec.sent == []


def test_redelivered_job_runs_once_and_ids_stay_short() -> None:
    """A job re-sent while running is ignored; event ids stay within 64 chars for long job ids."""
    clock, rec = task.Clock(), Recorder()
    runner = JobRunner(clock, rec, Backtester())
    job = orjson.dumps({**JOB, "job_id": "x" * 100})
    assert runner.handle_job(job) == "x" * 100
    assert runner.handle_job(job) is None and runner.rejected == 0
    clock.pump([0.5] * 4)
    assert len(rec.sent) == 5 and all(len(e["event_id"]) <= 64 for _, e in rec.sent)


def test_job_runner_stop_and_failing_publish() -> None:
    """A raising publish does not break the steps; stop() leaves no delayed calls."""
    clock, calls = task.Clock(), []

    def broken(channel: str, payload: bytes) -> None:
        calls.append(channel)
        raise ConnectionError("redis is down")

    runner = JobRunner(clock, broken, Backtester())
    runner.handle_job(orjson.dumps(JOB))
    clock.pump([0.5] * 4)
    assert calls == [sim.PROGRESS] * 4 + [sim.RESULTS]
    runner.handle_job(orjson.dumps({**JOB, "job_id": "job-2"}))
    runner.handle_job(orjson.dumps({**JOB, "job_id": "job-3"}))
    clock.advance(0.5)
    runner.stop()
    assert clock.getDelayedCalls() == []


def test_failed_backtest_reports_failed() -> None:
    """If the backtest itself raises, the last progress says 'failed' and no result is sent."""

    class Broken(Backtester):
        def run(self, job: Any) -> dict[str, float | int]:
            raise RuntimeError("boom")

    clock, rec = task.Clock(), Recorder()
    JobRunner(clock, rec, Broken()).handle_job(orjson.dumps(JOB))
    clock.pump([0.5] * 4)
    assert rec.on(sim.PROGRESS)[-1]["status"] == "failed" and rec.on(sim.RESULTS) == []


@pytest.mark.parametrize("rate", [5, 1000])
def test_producer_rate(rate: int) -> None:
    """Over N simulated seconds the producer publishes exactly rate * N contract-valid events."""
    clock, rec = task.Clock(), Recorder()
    producer = Producer(clock, rec, make_sim(), rate, batch_interval=0.01)
    producer.start()
    for second in range(1, 4):
        clock.pump([0.01] * 100)
        assert producer.published == len(rec.sent) == rate * second
    assert producer.dropped == 0
    for channel, event in rec.sent:
        assert_contract(channel, event)
    producer.stop()
    assert clock.getDelayedCalls() == []


def test_producer_catches_up_but_caps_backlog() -> None:
    """A late batch sends what is owed, up to one second's worth; older backlog is dropped."""
    clock, rec = task.Clock(), Recorder()
    producer = Producer(clock, rec, make_sim(), 100)
    producer.start()
    clock.advance(0.5)
    assert producer.published == 50
    clock.advance(5.0)
    assert producer.published == 150 and producer.dropped == 400
    producer.stop()
    assert clock.getDelayedCalls() == []


def test_producer_survives_failing_publish() -> None:
    """Raising publishers and failed Deferreds are absorbed; the loop keeps running."""
    clock, attempts = task.Clock(), []

    def flaky(channel: str, payload: bytes) -> object:
        attempts.append(channel)
        if len(attempts) % 2:
            raise ConnectionError("down")
        return defer.fail(ConnectionError("down"))

    producer = Producer(clock, flaky, make_sim(), 10, batch_interval=0.1)
    producer.start()
    clock.pump([0.1] * 10)
    assert len(attempts) == 10 and producer.published == 5
    producer.stop()
    assert clock.getDelayedCalls() == []


def test_publish_one_encodes_once() -> None:
    """publish_one() hands the publisher the event as orjson bytes and counts it."""
    clock, rec = task.Clock(), Recorder()
    producer = Producer(clock, rec, make_sim(), 5)
    event = {"event_type": "tick", "symbol": "AAPL", "price": 1.5, "volume": 100, "timestamp": 1.0}
    producer.publish_one(sim.TICKS, event)
    assert rec.sent == [(sim.TICKS, event)] and producer.published == 1
    with pytest.raises(ValueError):
        Producer(clock, rec, make_sim(), 0)


# ---------------------------------------------------------------- the upstream dialect

NOW = 1_760_000_000.25
UPSTREAM_SHAPES = {
    "tick_data on its symbol and all_ticks", "market_tick",
    "pattern flat", "pattern under data", "pattern under data.data",
    "pattern detection on tickstock:patterns:streaming",
    "pattern detection on tickstock:patterns:detected",
    "name pattern", "name pattern_name", "name pattern_type",
    "market_state with symbol", "market_state without symbol", "market_state under data",
    "market_state of another type", "system_health with source, no service",
    "health word warning", "tickstock:streaming:health", "tickstock:processing:status payload",
    "tickstock:streaming:session_started", "tickstock:streaming:session_stopped",
    "indicator value", "indicator values", "tickstock:alerts:indicators",
    "tickstock:alerts:critical", "universe theme_updated", "universe universe_synchronized",
    "tickstock:cache:sync_complete payload", "tickstock:universe:updated payload",
    "probe test", "probe health_check",
}


def shapes_of(channels: tuple[str, ...], message: dict[str, Any]) -> set[str]:
    """The shapes of the issue "The real producer" that one message has, read off it."""
    channel, shapes = channels[0], set()
    payload = message.get("data") or message.get("detection") or {}
    if isinstance(payload.get("data"), dict):
        payload = payload["data"]
    for name in ("pattern", "pattern_name", "pattern_type"):
        if name in message or name in payload:
            shapes.add(f"name {name}")
    if "test" in message:
        shapes.add("probe test")
    elif message.get("event_type") == "health_check":
        shapes.add("probe health_check")
    elif channel.startswith("tickstock.ticks."):
        assert channels == (channel, "tickstock.all_ticks")
        assert channel == f"tickstock.ticks.{message['ticker']}"
        shapes.add("tick_data on its symbol and all_ticks")
    elif channel == "tickstock:market:ticks":
        assert message["type"] == "market_tick" and "symbol" in message
        shapes.add("market_tick")
    elif channel == sim.PATTERNS_CHANNEL:
        shapes.add("pattern flat" if "data" not in message else
                   "pattern under data.data" if "data" in message["data"] else
                   "pattern under data")
    elif channel.startswith("tickstock:patterns:"):
        shapes.add(f"pattern detection on {channel}")
    elif channel == sim.MARKET_STATE:
        fields = message.get("data", message)
        shapes.add("market_state with symbol" if "symbol" in fields else
                   "market_state without symbol")
        if message["event_type"] not in ("ranking_change", "sector_rotation", "stage_change"):
            shapes.add("market_state of another type")
        if "data" in message:
            shapes.add("market_state under data")
    elif channel == sim.HEALTH:
        if "source" in message and "service" not in message:
            shapes.add("system_health with source, no service")
        if message["status"] == "warning":
            shapes.add("health word warning")
    elif channel == "tickstock:indicators:streaming":
        shapes.add("indicator values" if "values" in message["calculation"] else
                   "indicator value")
    elif channel in ("tickstock.universe.updated", "tickstock.cache.sync_complete"):
        shapes.add(f"universe {message['event_type']}")
    elif "payload" in message:
        shapes.add(f"{channel} payload")
    else:
        shapes.add(channel)
    return shapes


def time_forms(message: dict[str, Any]) -> set[str]:
    """How the timestamps anywhere in C{message} are written (C{none}: it has none)."""
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "timestamp" in node:
                found.append(node["timestamp"])
            for value in node.values():
                walk(value)

    walk(message)
    forms = set()
    for value in found:
        if isinstance(value, float):
            forms.add("epoch_s")
        elif isinstance(value, int):
            forms.add("epoch_ms" if value > 10**11 else "epoch_s_int")
        elif value.endswith("Z"):
            forms.add("iso_z")
        elif re.search(r"[+-]\d\d:\d\d$", value):
            forms.add("iso_offset")
        else:
            forms.add("iso_naive")
    return forms or {"none"}


def test_every_upstream_message_normalizes_and_every_shape_occurs() -> None:
    """
    Over a few thousand draws, every message of the upstream dialect, on
    each Redis channel it is published on, normalizes to an event (or is a
    probe): none is refused; its timestamp, in whatever form, is the draw's
    time; and every shape and every timestamp form of the issue occurs.
    """
    from tickstock.ingest.normalize import Probe, parse_event

    upstream = sim.UpstreamSimulator(default_symbols(30), random.Random(5))
    shapes: Counter[str] = Counter()
    forms: set[str] = set()
    topics: Counter[str] = Counter()
    for i in range(4000):
        now = NOW + i * 0.01
        channels, raw = upstream.next_message(now)
        message = orjson.loads(raw)
        shape = shapes_of(channels, message)
        shapes.update(shape)
        forms |= time_forms(message)
        probe = bool(shape & {"probe test", "probe health_check"})
        for channel in channels:
            try:
                event = parse_event(channel, raw, "1-0", now + 5)
            except Probe:
                assert probe, message
                continue
            assert not probe, message
            topics[event.topic] += 1
            assert "event_id" not in message
            stamped = "none" not in time_forms(message)
            assert event.data["timestamp"] == pytest.approx(now if stamped else now + 5, abs=1)
    assert set(shapes) == UPSTREAM_SHAPES, set(shapes) ^ UPSTREAM_SHAPES
    assert forms == set(sim.TIME_FORMS)
    assert set(topics) == {"patterns", "market_state", "health", "ticks", "universe",
                           "indicators", "alerts"}
    assert 0.55 < (topics["ticks"] - shapes["tick_data on its symbol and all_ticks"]) / 4000 < 0.65


def test_upstream_ticks_are_one_message_each() -> None:
    """
    The producer counts a tick once, though a C{tick_data} goes out twice
    (the same bytes on its symbol's channel and on all_ticks); with
    per-symbol channels off (streams mode) it goes to all_ticks only.
    """
    for per_symbol in (True, False):
        clock, sent = task.Clock(), []
        upstream = sim.UpstreamSimulator(default_symbols(5), random.Random(2), per_symbol)
        producer = Producer(clock, lambda c, p, sent=sent: sent.append((c, p)), upstream, 1000)
        producer.start()
        clock.pump([0.01] * 100)
        producer.stop()
        assert producer.published == 1000
        pairs = [(a, b) for a, b in pairwise(sent) if a[0].startswith("tickstock.ticks.")]
        assert all(b == ("tickstock.all_ticks", a[1]) for a, b in pairs)
        assert len(sent) == 1000 + len(pairs) and (len(pairs) > 200) == per_symbol


def test_upstream_jobs_answer_in_upstream_shapes_and_a_cancel_on_both_channels_once() -> None:
    """
    The upstream job runner reads TickStock's job message (C{type},
    C{parameters}, C{source}): progress without timestamp, event id or user,
    and a result without C{completed_at}, which TickStock normalizes (the
    result's time is its timestamp); a cancel sent on both channels ends the
    job with one C{cancelled} progress.
    """
    from tickstock.ingest.normalize import parse_event

    clock, rec = task.Clock(), Recorder()
    clock.advance(NOW)
    runner = JobRunner(clock, rec, Backtester(3), step_interval=0.5, upstream=True)
    job = {**JOB, "type": "backtest_job", "source": "tickstock",
           "parameters": {"initial_capital": 50_000, "commission_rate": 0.001}}
    del job["job_type"]
    assert runner.handle_job(orjson.dumps(job)) == "job-1"
    assert runner.handle_job(orjson.dumps({**job, "job_id": "job-2"})) == "job-2"
    clock.pump([0.5] * 4)
    progress = [p for p in rec.on(sim.PROGRESS) if p["job_id"] == "job-1"]
    assert [(p["progress"], p["status"]) for p in progress] == [
        (0.25, "processing"), (0.5, "processing"), (0.75, "processing"), (1.0, "completed")]
    assert [p["processed_symbols"] for p in progress] == [1, 1, 2, 2]
    for p in progress:
        assert {"timestamp", "event_id", "user_id", "event_type"}.isdisjoint(p)
        event = parse_event(sim.PROGRESS, orjson.dumps(p), "1-0", 5.0)
        assert event.data["timestamp"] == 5.0 and event.job_id == "job-1"
    result = rec.on(sim.RESULTS)[0]
    assert "completed_at" not in result and result["status"] == "completed"
    figures = Backtester(3).run(JOB)
    assert result["results"]["win_rate"] == figures["win_rate"]
    assert result["results"]["total_trades"] == figures["trades"]
    assert result["results"]["duration_days"] == 364
    event = parse_event(sim.RESULTS, orjson.dumps(result), "1-0", 5.0)
    assert event.data["completed_at"] == event.data["timestamp"] == NOW + 2.0

    rec.sent.clear()
    runner.handle_job(orjson.dumps({**job, "job_id": "job-3"}))
    clock.advance(0.5)
    cancel = orjson.dumps({"action": "cancel", "job_id": "job-3", "user_id": "alice",
                           "reason": "cancelled", "timestamp": NOW})
    assert runner.handle_control(cancel) and not runner.handle_control(cancel)
    clock.advance(10)
    assert [(p["progress"], p["status"]) for p in rec.on(sim.PROGRESS)] == [
        (0.25, "processing"), (0.25, "cancelled")]
    assert runner.rejected == 0


def test_an_upstream_backtest_that_fails_says_so_in_its_result() -> None:
    class Broken(Backtester):
        def run(self, job: Any) -> dict[str, float | int]:
            raise RuntimeError("no data")

    clock, rec = task.Clock(), Recorder()
    JobRunner(clock, rec, Broken(), upstream=True).handle_job(orjson.dumps(JOB))
    clock.pump([0.5] * 4)
    (result,) = rec.on(sim.RESULTS)
    assert (result["status"], result["error"]) == ("failed", "no data")
    assert "results" not in result


def test_the_cli_dialect_option() -> None:
    from tickstock.cli.sim import parse_args

    assert parse_args(["--redis", "redis://127.0.0.1"]).dialect == "tickstock"
    assert parse_args(["--redis", "redis://127.0.0.1", "--dialect", "upstream"]).dialect == \
        "upstream"
    with pytest.raises(SystemExit):
        parse_args(["--redis", "redis://127.0.0.1", "--dialect", "flask"])


@pytest_twisted.ensureDeferred
async def test_a_daemon_fed_by_the_upstream_dialect_delivers_and_refuses_nothing(
        redis_server, daemons):
    """
    C{tickstock-sim --dialect upstream}, a process of its own, feeds a real
    daemon through a real redis-server: a WebSocket client gets patterns,
    ticks, health and the other topics, and a backtest it submits (with
    upstream's parameters) runs to its result; probes are counted, and not
    one message is dead-lettered.
    """
    from tests.wsclient import connect, eventually

    daemon = daemons(redis=redis_server.url)
    await eventually(lambda: daemon.service.readiness()[0], 15, "the daemon ready")
    client = await connect(daemon.port, hello=daemon.hello("alice"))
    topics = ("patterns", "ticks", "health", "market_state", "indicators", "alerts", "universe",
              "backtests")
    for topic in topics:
        await client.request({"op": "subscribe", "id": topic, "topic": topic}, "subscribed")
    program = os.path.join(os.path.dirname(sys.executable), "tickstock-sim")
    simulator = subprocess.Popen(
        [program, "--redis", redis_server.url, "--dialect", "upstream", "--rate", "300",
         "--symbols", "5", "--seed", "11", "--step-interval", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await eventually(lambda: redis_server.command(
            "PUBSUB", "NUMSUB", "tickstock.jobs.backtest").endswith(b":1\r\n"), 15,
            "the simulator listening for jobs")
        accepted = await client.request({"op": "submit_backtest", "id": "r", "params": {
            "symbols": ["AAPL", "MSFT"], "start_date": "2023-01-02", "end_date": "2023-06-30",
            "parameters": {"initial_capital": 25_000, "stop_loss_pct": 0.05}}}, "job_accepted")
        assert accepted["op"] == "job_accepted", accepted
        await eventually(lambda: all(client.events(t) for t in topics), 30,
                         "an event of every topic")
        await eventually(lambda: any(e["type"] == "backtest_result"
                                     for e in client.events("backtests")), 15, "the result")
        await eventually(lambda: sum(daemon.service.router.probes.values()) > 0, 15, "a probe")
    finally:
        simulator.kill()
        simulator.wait()
    (result,) = [e for e in client.events("backtests") if e["type"] == "backtest_result"]
    assert result["data"]["job_id"] == accepted["job_id"]
    assert set(result["data"]["results"]) >= {"win_rate", "roi", "sharpe_ratio", "max_drawdown"}
    tick = client.events("ticks")[-1]["data"]
    assert tick["symbol"] in default_symbols(5) and tick["price"] > 0
    assert isinstance(client.events("patterns")[-1]["data"]["timestamp"], float)
    assert daemon.service.router.malformed == {}
    assert redis_server.command("LLEN", "tickstock:deadletter") == b":0\r\n"
