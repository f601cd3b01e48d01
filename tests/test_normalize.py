"""
The channel registry (L{tickstock.domain.topics}) and the normalizer
(L{tickstock.ingest.normalize}) as units: each rule of docs/producers.md on its own.
The end-to-end versions through Redis and a WebSocket are in
C{tests/test_conformance.py}; the fuzzed ones in C{tests/test_fuzz.py}.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tickstock.config import ConfigError, load_settings
from tickstock.domain.events import MalformedEvent
from tickstock.domain.topics import DEFAULT_REGISTRY, configure
from tickstock.ingest.normalize import Probe, epoch_seconds, parse_event

NOW = 1_700_000_000.0


def event(channel: str, message: dict[str, Any], registry: Any = DEFAULT_REGISTRY) -> Any:
    return parse_event(channel, orjson.dumps(message), "1-0", NOW, registry)


def refused(channel: str, message: dict[str, Any] | bytes) -> str:
    raw = message if isinstance(message, bytes) else orjson.dumps(message)
    with pytest.raises(MalformedEvent) as caught:
        parse_event(channel, raw, "1-0", NOW)
    return f"{caught.value.kind}: {caught.value}"


@pytest.mark.parametrize(("value", "seconds"), [
    (1_697_400_000, 1_697_400_000.0),
    (1_697_400_000.25, 1_697_400_000.25),
    (1_697_400_000_250, 1_697_400_000.25),
    ("1697400000.5", 1_697_400_000.5),
    ("2025-10-15T20:39:28Z", 1_760_560_768.0),
    ("2025-10-15T22:39:28+02:00", 1_760_560_768.0),
    ("2025-10-15T20:39:28.236000", 1_760_560_768.236),
    ("2025-10-15", 1_760_486_400.0),
])
def test_timestamps_in_every_form_become_epoch_seconds(value: Any, seconds: float) -> None:
    assert epoch_seconds(value) == pytest.approx(seconds)
    data = event("tickstock.events.market_state", {"timestamp": value}).data
    assert data["timestamp"] == pytest.approx(seconds)
    assert ("timestamp_original" in data) == (value != seconds)


@pytest.mark.parametrize("value", ["yesterday", "", -5, 0, True, [1], {"t": 1}, "10:00"])
def test_a_timestamp_that_is_none_of_them_is_refused(value: Any) -> None:
    assert refused("tickstock.events.market_state", {"timestamp": value}).startswith(
        "bad_timestamp: timestamp ")


def test_a_message_without_a_timestamp_gets_its_arrival_time() -> None:
    data = event("tickstock.events.market_state", {"symbol": "AAPL"}).data
    assert data["timestamp"] == NOW and "timestamp_original" not in data


def test_the_payload_is_merged_over_the_outer_fields_inner_winning() -> None:
    got = event("tickstock.events.patterns", {
        "timestamp": 1, "source": "outer", "flow_id": "f",
        "data": {"tier": "t", "source": "middle",
                 "data": {"symbol": "aapl", "pattern_type": "Doji", "confidence": "0.5",
                          "timestamp": 2}}})
    assert got.data == {"timestamp": 2.0, "source": "middle", "flow_id": "f", "tier": "t",
                        "symbol": "AAPL", "pattern_type": "Doji", "pattern": "Doji",
                        "confidence": 0.5}
    assert (got.topic, got.type, got.symbol) == ("patterns", "pattern_detected", "AAPL")


def test_a_canonical_field_wins_over_its_aliases() -> None:
    data = event("tickstock.events.patterns", {"symbol": "A", "ticker": "B", "pattern": "P",
                                               "pattern_name": "Q", "confidence": 1}).data
    assert (data["symbol"], data["pattern"]) == ("A", "P")


def test_market_state_keeps_the_producers_type_and_needs_no_symbol() -> None:
    got = event("tickstock.events.market_state", {"event_type": "breadth", "adv": 1})
    assert (got.type, got.symbol) == ("breadth", None)
    assert event("tickstock.events.market_state", {}).type == "ranking_change"


def test_other_channels_have_one_type_and_keep_the_producers_word() -> None:
    got = event("tickstock.all_ticks", {"event_type": "tick_data", "ticker": "qqq", "price": "1",
                                        "volume": 0})
    assert (got.type, got.data["event_type"], got.symbol, got.latest) == (
        "tick", "tick_data", "QQQ", ("ticks", "QQQ"))


@pytest.mark.parametrize(("word", "state"), [
    ("healthy", "healthy"), ("ok", "healthy"), ("RUNNING", "healthy"), ("warning", "degraded"),
    ("critical", "down"), ("stopped", "down"), ("something new", "degraded"),
])
def test_health_words_map_to_a_known_state_and_are_kept(word: str, state: str) -> None:
    got = event("tickstock.health.status", {"source": "tickstock_pl", "status": word})
    assert (got.data["service"], got.data["status"]) == ("tickstock_pl", state)
    assert got.data.get("status_original") == (None if word == state else word)
    assert got.latest == ("health", "tickstock_pl")


def test_progress_as_a_percentage_and_results_without_completed_at() -> None:
    progress = event("tickstock.events.backtesting.progress", {"job_id": 7, "progress": 40})
    assert (progress.data["progress"], progress.data["status"], progress.job_id) == (
        0.4, "processing", "7")
    result = event("tickstock.events.backtesting.results", {
        "event_type": "backtest_result", "job_id": "j", "status": "completed", "timestamp": 5,
        "results": {"win_rate": 0.5, "total_trades": 4, "roi": 0.1, "sharpe_ratio": 1,
                    "max_drawdown": 0.2}, "processing_time_seconds": 3})
    assert result.data["completed_at"] == 5.0 and result.type == "backtest_result"
    failed = event("tickstock.events.backtesting.results", {"job_id": "j", "status": "failed"})
    assert "results" not in failed.data
    assert refused("tickstock.events.backtesting.results", {"job_id": "j", "results": {
        "win_rate": 1, "roi": 1, "sharpe_ratio": 1}}) == (
        "missing_field: no results.max_drawdown on a completed backtest")


def test_probes_are_not_events() -> None:
    for channel, message in (("tickstock.events.patterns", {"test": "health_check",
                                                            "timestamp": 1}),
                             ("tickstock.events.market_state", {"event_type": "health_check"})):
        with pytest.raises(Probe):
            event(channel, message)
    # A real event that happens to have a "test" field is not a probe.
    assert event("tickstock.events.market_state", {"test": "x", "symbol": "AAPL"}).symbol == "AAPL"


def test_fields_of_other_topics_are_passed_on_as_sent() -> None:
    data = event("tickstock.all_ticks", {"symbol": "A", "price": 1, "volume": 1,
                                         "confidence": 7, "pattern": 3}).data
    assert (data["confidence"], data["pattern"]) == (7, 3)


def test_reasons_say_exactly_what_was_wrong() -> None:
    assert refused("nowhere", {}) == "unknown_channel: no channel is configured for 'nowhere'"
    assert refused("tickstock.events.patterns", {"data": {"pattern": "D", "confidence": 1}}) \
        == "missing_field: no symbol after unwrapping data on tickstock.events.patterns"
    assert refused("tickstock.events.patterns", {"symbol": "AAPL", "pattern": "D"}) \
        == "missing_field: no confidence on tickstock.events.patterns"
    assert refused("tickstock.events.patterns", {"symbol": "A", "pattern": "D",
                                                 "confidence": 1, "event_id": ""}) \
        == "bad_field: event_id must be a string of 1-64 chars"
    assert refused("tickstock.events.patterns", b'{"a":' * 40 + b"1" + b"}" * 40) \
        == "too_deep: nested deeper than 32 levels"


def test_redis_names_and_patterns_find_their_channel() -> None:
    registry = DEFAULT_REGISTRY
    assert registry.by_redis_name("tickstock.ticks.BRK.B").name == "tickstock.data.ticks"
    assert registry.by_redis_name("tickstock:patterns:detected").name \
        == "tickstock.events.patterns"
    assert registry.by_redis_name("tickstock.ticksX") is None
    assert "tickstock.ticks.*" in registry.patterns
    assert "tickstock.ticks.*" not in registry.names and "tickstock.all_ticks" in registry.names
    assert "tickstock.db.events" not in registry.names


def test_a_toml_table_overrides_a_channel_or_adds_one() -> None:
    registry = configure({
        "tickstock.events.patterns": {"aliases": {"symbol": ["stock"]}},
        "acme.signals": {"topic": "patterns", "redis": ["acme:signals"], "unwrap": ["payload"],
                         "required": ["symbol", "pattern", "confidence"]},
    })
    assert event("tickstock.events.patterns", {"stock": "ibm", "pattern": "D",
                                               "confidence": 1}, registry).symbol == "IBM"
    added = event("acme:signals", {"payload": {"symbol": "X", "pattern": "D", "confidence": 0}},
                  registry)
    assert (added.channel, added.topic, added.type) == ("acme.signals", "patterns",
                                                        "acme_signals")
    assert configure({}) is DEFAULT_REGISTRY


def test_every_wrong_table_is_one_line() -> None:
    with pytest.raises(ValueError) as caught:
        configure({
            "tickstock.events.patterns": {"colour": "red"},
            "new.one": {"redis": ["x"]},
            "other": {"topic": "weather"},
            "third": {"topic": "ticks", "redis": ["tickstock.all_ticks"]},
            "fourth": {"topic": "ticks", "redis": ["bad name"]},
        })
    assert str(caught.value).splitlines() == [
        "[channels.'tickstock.events.patterns']: unknown field 'colour'",
        "[channels.'new.one']: a new channel needs a topic",
        "[channels.other]: topic must be one of patterns, market_state, backtests, health, "
        "ticks, universe, indicators, alerts; got 'weather'",
        "[channels.fourth]: redis names are 1-128 of A-Za-z0-9_.:-*",
        "[channels.third]: Redis name 'tickstock.all_ticks' already feeds tickstock.data.ticks",
    ]


def test_the_config_file_channels_reach_the_settings(tmp_path: Any) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[tickstock]\nmode = "pubsub"\n\n[channels."tickstock.events.patterns"]\n'
                    'aliases = { symbol = ["stock"] }\n')
    settings = load_settings({}, {}, str(good))
    assert settings.channels.get("tickstock.events.patterns").aliases == {"symbol": ("stock",)}
    bad = tmp_path / "bad.toml"
    bad.write_text('[channels.x]\nredis = ["y"]\n')
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {}, str(bad))
    assert "--config: [channels.x]: a new channel needs a topic" in str(caught.value)
