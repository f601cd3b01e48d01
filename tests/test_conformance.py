"""
Conformance with the real producer: every message quoted in the original
system's documents, and every shape its producer is known to publish
(docs/producers.md), published through a real redis-server into the
daemon's real service tree and received on a real WebSocket with the
canonical fields; each malformed variant is dead-lettered with its reason.

The seed documents' messages are used as they are written there (their
Python dicts, with C{time.time()} for the timestamp); the other shapes carry
a C{case} field, kept like any extra field, to tell them apart.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
import pytest_twisted

from tests.test_jobs import job_listener  # noqa: F401 - fixture
from tests.wsclient import connect, eventually

NOW = time.time()
ISO = "2025-10-15T20:39:28.236000"
ISO_EPOCH = 1760560768.236
TOPICS = ("patterns", "market_state", "backtests", "health", "ticks", "universe",
          "indicators", "alerts")


def seed_messages() -> list[tuple[str, dict[str, Any]]]:
    """The producer messages of the original system's integration tests, verbatim."""
    pattern_event = {
        'event_type': 'pattern_detected',
        'pattern': 'Doji',
        'symbol': 'AAPL',
        'timestamp': time.time(),
        'confidence': 0.85,
        'source': 'tickstock_pl'
    }
    market_state_changes = [
        {'event_type': 'ranking_change', 'symbol': 'AAPL', 'rank_change': -5},
        {'event_type': 'sector_rotation', 'symbol': 'GOOGL', 'rank_change': 10},
        {'event_type': 'stage_change', 'symbol': 'MSFT', 'rank_change': 0}
    ]
    test_event = {
        'event_type': 'ranking_change',
        'metric': 'rs_rating',
        'symbol': 'TEST',
        'timestamp': time.time()
    }
    return [
        ("tickstock.events.patterns", pattern_event),
        *(("tickstock.events.market_state", {'timestamp': time.time(), 'source': 'tickstock_pl',
                                             **change})
          for change in market_state_changes),
        ("tickstock.events.market_state", test_event),
        ("tickstock.events.market_state", {'event_type': 'ranking_change',
                                           'metric': 'rs_rating', 'symbol': 'TEST001',
                                           'timestamp': time.time()}),
    ]


# (Redis channel, message, topic, canonical fields the event must have)
SHAPES: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    ("tickstock.events.patterns",
     {"event_type": "pattern_detected", "source": "tickstock_pl", "timestamp": NOW,
      "pattern": "Hammer", "symbol": "msft", "confidence": 0.7, "details": {"k": 1},
      "case": "flat"},
     "patterns", {"symbol": "MSFT", "pattern": "Hammer", "confidence": 0.7, "timestamp": NOW,
                  "details": {"k": 1}}),
    ("tickstock.events.patterns",
     {"event_type": "pattern_detected", "source": "tickstock_pl", "timestamp": NOW,
      "case": "nested",
      "data": {"symbol": "NVDA", "pattern": "BullFlag", "confidence": 0.81, "current_price": 480.5,
               "price_change": 1.2, "timestamp": int(NOW * 1000), "expires_at": NOW + 3600,
               "indicators": {"relative_strength": 1.4, "relative_volume": 2.1},
               "source": "intraday", "description": "flag", "action": "buy",
               "stop_loss": 470.0, "target_price": 500.0}},
     "patterns", {"symbol": "NVDA", "pattern": "BullFlag", "confidence": 0.81,
                  "timestamp": int(NOW * 1000) / 1000, "timestamp_original": int(NOW * 1000),
                  "source": "intraday", "stop_loss": 470.0,
                  "indicators": {"relative_strength": 1.4, "relative_volume": 2.1}}),
    ("tickstock.events.patterns",
     {"event_type": "pattern_detected", "source": "tickstock_pl", "flow_id": "f-1",
      "timestamp": ISO, "case": "doubly",
      "data": {"flow_id": "f-1", "tier": "daily",
               "data": {"pattern_type": "Engulfing", "symbol": "AMD", "confidence": 0.66,
                        "current_price": 150.0, "indicators": {"rsi": 55},
                        "metadata": {"bars": 20}}}},
     "patterns", {"symbol": "AMD", "pattern": "Engulfing", "confidence": 0.66,
                  "timestamp": ISO_EPOCH, "timestamp_original": ISO, "tier": "daily",
                  "flow_id": "f-1", "metadata": {"bars": 20}}),
    ("tickstock.events.patterns",
     {"event_type": "pattern_detected", "pattern_name": "Doji", "symbol": "IBM",
      "confidence": 0.5, "timestamp": "2025-10-15T20:39:28Z", "case": "pattern_name"},
     "patterns", {"symbol": "IBM", "pattern": "Doji", "timestamp": 1760560768.0}),
    ("tickstock.events.patterns",
     {"pattern": "Doji", "symbol": "ORCL", "confidence": 0.5,
      "timestamp": "2025-10-15T22:39:28+02:00", "case": "offset"},
     "patterns", {"symbol": "ORCL", "timestamp": 1760560768.0}),
    ("tickstock:patterns:detected",
     {"type": "pattern_detected", "case": "detection",
      "detection": {"symbol": "TSLA", "pattern_type": "Breakout", "confidence": 0.9,
                    "timeframe": "5m", "timestamp": NOW, "bar_data": {"close": 250.0}}},
     "patterns", {"symbol": "TSLA", "pattern": "Breakout", "timeframe": "5m",
                  "bar_data": {"close": 250.0}}),
    ("tickstock:patterns:streaming",
     {"type": "streaming_pattern", "case": "streaming",
      "detection": {"symbol": "META", "pattern_type": "Doji", "confidence": 0.6}},
     "patterns", {"symbol": "META", "pattern": "Doji"}),
    ("tickstock.events.market_state",
     {"event_type": "breadth_update", "source": "tickstock_pl", "timestamp": NOW,
      "advancers": 300, "case": "no_symbol"},
     "market_state", {"advancers": 300}),
    ("tickstock.health.status",
     {"event_type": "system_health", "source": "tickstock_pl", "timestamp": NOW,
      "status": "warning", "metrics": {"cpu_usage": 50, "memory_usage": 40, "active_jobs": 1,
                                        "queue_depth": 3}, "case": "health"},
     "health", {"service": "tickstock_pl", "status": "degraded", "status_original": "warning",
                "metrics": {"cpu_usage": 50, "memory_usage": 40, "active_jobs": 1,
                            "queue_depth": 3}}),
    ("tickstock:streaming:health",
     {"type": "streaming_health", "timestamp": NOW, "case": "streaming_health",
      "data": {"source": "streaming_engine", "status": "ok", "active_symbols": 50}},
     "health", {"service": "streaming_engine", "status": "healthy"}),
    ("tickstock:streaming:session_started",
     {"type": "session_started", "timestamp": NOW, "case": "session",
      "data": {"session_id": "s-1", "symbols": 50, "source": "streaming_session"}},
     "health", {"service": "streaming_session", "status": "healthy", "session_id": "s-1"}),
    ("tickstock.all_ticks",
     {"event_type": "tick_data", "ticker": "QQQ", "price": 401.5, "volume": 100,
      "timestamp": NOW, "source": "polygon", "market_status": "open", "case": "tick_data"},
     "ticks", {"symbol": "QQQ", "price": 401.5, "volume": 100, "market_status": "open"}),
    ("tickstock.ticks.SPY",
     {"event_type": "tick_data", "ticker": "SPY", "price": 501.25, "volume": 10,
      "timestamp": NOW, "source": "polygon", "case": "tick_per_symbol"},
     "ticks", {"symbol": "SPY", "price": 501.25}),
    ("tickstock:market:ticks",
     {"type": "market_tick", "symbol": "DIA", "price": 390.0, "volume": 5, "timestamp": NOW,
      "source": "polygon", "case": "market_tick"},
     "ticks", {"symbol": "DIA", "price": 390.0, "volume": 5}),
    ("tickstock:indicators:streaming",
     {"type": "streaming_indicator", "case": "indicator",
      "calculation": {"symbol": "AAPL", "indicator": "RSI", "value": 61.5, "timestamp": NOW,
                      "timeframe": "1m", "metadata": {"period": 14}}},
     "indicators", {"symbol": "AAPL", "indicator": "RSI", "value": 61.5, "timeframe": "1m"}),
    ("tickstock:indicators:streaming",
     {"event": "indicator_calculated", "case": "indicator_values",
      "calculation": {"indicator_type": "MACD", "symbol": "MSFT",
                      "values": {"macd": 1.2, "signal": 0.8}}},
     "indicators", {"symbol": "MSFT", "indicator": "MACD", "values": {"macd": 1.2, "signal": 0.8}}),
    ("tickstock:alerts:critical",
     {"type": "indicator_alert", "case": "alert",
      "alert": {"symbol": "NFLX", "alert_type": "rsi_overbought", "timestamp": NOW,
                "data": {"rsi": 82}}},
     "alerts", {"symbol": "NFLX", "alert_type": "rsi_overbought"}),
    ("tickstock.universe.updated",
     {"timestamp": "2025-09-02T10:00:01.000000", "service": "etf_universe_manager",
      "event_type": "theme_updated", "theme": "ai_leaders", "symbol_count": 12,
      "action": "refresh", "cache_key": "etf_ai", "case": "theme_updated"},
     "universe", {"theme": "ai_leaders", "cache_key": "etf_ai",
                  "timestamp": 1756807201.0}),
    ("tickstock.cache.sync_complete",
     {"service": "cache_entries_synchronizer", "event_type": "universe_synchronized",
      "universe": "sp500", "change_count": 3, "actions": ["add", "remove"],
      "case": "universe_synchronized"},
     "universe", {"universe": "sp500", "change_count": 3}),
    ("tickstock:universe:updated",
     {"event": "universe_updated", "timestamp": NOW, "source": "pl", "version": "1",
      "case": "envelope", "payload": {"universe": "nasdaq100", "added": ["ARM"]}},
     "universe", {"universe": "nasdaq100", "added": ["ARM"], "version": "1"}),
]

# (Redis channel, message, the dead letter's reason)
MALFORMED: list[tuple[str, dict[str, Any] | bytes, str]] = [
    ("tickstock.events.patterns",
     {"event_type": "pattern_detected", "data": {"data": {"pattern": "Doji", "confidence": 0.5}}},
     "missing_field: no symbol after unwrapping data.data on tickstock.events.patterns"),
    ("tickstock.events.patterns",
     {"pattern": "Doji", "symbol": "AAPL", "confidence": 0.5, "timestamp": "yesterday"},
     "bad_timestamp: timestamp 'yesterday' not understood"),
    ("tickstock.events.patterns", {"pattern": "Doji", "symbol": "AAPL", "confidence": 3},
     "bad_field: confidence 3 is not a number 0..1"),
    ("tickstock.events.patterns", {"pattern": "Doji", "symbol": "NOT/A/SYMBOL", "confidence": 1},
     "bad_field: symbol 'NOT/A/SYMBOL' is not 1-10 of A-Z 0-9 . -"),
    ("tickstock.all_ticks", {"ticker": "AAPL", "price": -1, "volume": 1},
     "bad_field: price -1 is not a positive number"),
    ("tickstock.health.status", {"status": "ok"},
     "missing_field: no service on tickstock.health.status"),
    ("tickstock:indicators:streaming", {"calculation": {"symbol": "AAPL", "indicator": "RSI"}},
     "missing_field: no value or values after unwrapping calculation on "
     "tickstock:indicators:streaming"),
    ("tickstock:alerts:indicators", {"alert": {"symbol": "AAPL"}},
     "missing_field: no alert_type after unwrapping alert on tickstock:alerts:indicators"),
    ("tickstock.events.patterns", b"{not json", "not_json"),
    ("tickstock.events.patterns", b"[1, 2]", "not_object: expected a JSON object, got list"),
]


def publish(redis: Any, channel: str, payload: dict[str, Any] | bytes,
            mode: str = "pubsub") -> None:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    if mode == "streams":
        redis.command("XADD", channel, "*", "data", raw)
    else:
        redis.command("PUBLISH", channel, raw)


def has(data: dict[str, Any], expected: dict[str, Any]) -> bool:
    return all(data.get(k) == pytest.approx(v) if isinstance(v, float) else data.get(k) == v
               for k, v in expected.items())


async def subscribed_client(daemon: Any) -> Any:
    client = await connect(daemon.port, hello=daemon.hello("alice"))
    for topic in TOPICS:
        reply = await client.request({"op": "subscribe", "id": topic, "topic": topic},
                                     "subscribed")
        assert reply["op"] == "subscribed", reply
    return client


@pytest.mark.parametrize("mode", ["pubsub", "streams"])
@pytest_twisted.ensureDeferred
async def test_every_known_shape_is_delivered_canonical(redis_server, daemons, mode):
    """
    Each shape of docs/producers.md, on the Redis name the producer uses,
    reaches a subscriber of its topic with the canonical fields, the
    producer's other fields kept and C{timestamp} in epoch seconds. Streams
    are read by exact name: there, the per-symbol tick channel is not one.
    """
    daemon = daemons(redis=redis_server.url, mode=mode)
    await eventually(lambda: daemon.service.readiness()[0], 10, "daemon ready")
    client = await subscribed_client(daemon)
    shapes = [s for s in SHAPES if mode == "pubsub" or s[0] != "tickstock.ticks.SPY"]
    for channel, message, _, _ in shapes:
        publish(redis_server, channel, message, mode)

    def delivered(case: str) -> list[dict[str, Any]]:
        return [e for e in client.events() if e["data"].get("case") == case]

    await eventually(lambda: all(delivered(m["case"]) for _, m, _, _ in shapes), 10,
                     "every shape delivered")
    for _, message, topic, expected in shapes:
        (event,) = delivered(message["case"])
        assert event["sub"] == topic, (message["case"], event)
        assert has(event["data"], expected), (message["case"], event["data"])
        assert isinstance(event["data"]["timestamp"], float), event
        assert event["id"] and event["type"]
    assert sum(daemon.service.router.malformed.values()) == 0


@pytest_twisted.ensureDeferred
async def test_the_seed_documents_messages_are_delivered(redis_server, daemons, job_listener):
    """
    The original system's own test messages: a pattern event, market-state
    changes (with and without a timestamp), backtest progress without a
    timestamp and a result with C{completed_at}, for a job submitted over
    the WebSocket; its C{health_check} probe is counted, not delivered.
    """
    daemon = daemons(redis=redis_server.url)
    await eventually(lambda: daemon.service.readiness()[0], 10, "daemon ready")
    client = await subscribed_client(daemon)
    accepted = await client.request({"op": "submit_backtest", "id": "r", "params": {
        "symbols": ["AAPL"], "start_date": "2024-01-01", "end_date": "2024-01-31",
        "patterns": ["Doji"]}}, "job_accepted")
    job_id = accepted["job_id"]
    messages = seed_messages()
    for channel, message in messages:
        publish(redis_server, channel, message)
    publish(redis_server, "tickstock.events.market_state",
            {'event_type': 'health_check', 'timestamp': time.time()})
    for update in ({'job_id': job_id, 'progress': 0.25, 'status': 'processing'},
                   {'job_id': job_id, 'progress': 0.50, 'status': 'processing'}):
        publish(redis_server, "tickstock.events.backtesting.progress", update)
    publish(redis_server, "tickstock.events.backtesting.results", {
        'job_id': job_id,
        'results': {'win_rate': 0.65, 'roi': 0.12, 'sharpe_ratio': 1.8, 'max_drawdown': 0.05},
        'completed_at': time.time()
    })
    await eventually(lambda: len(client.events("patterns")) == 1
                     and len(client.events("market_state")) == 5
                     and any(e["type"] == "backtest_result" for e in client.events("backtests")),
                     10, "the seed messages")
    (alert,) = client.events("patterns")
    assert has(alert["data"], {"pattern": "Doji", "symbol": "AAPL", "confidence": 0.85,
                               "source": "tickstock_pl"})
    states = client.events("market_state")
    assert [e["type"] for e in states] == ["ranking_change", "sector_rotation", "stage_change",
                                           "ranking_change", "ranking_change"]
    assert [e["data"]["symbol"] for e in states] == ["AAPL", "GOOGL", "MSFT", "TEST", "TEST001"]
    assert states[0]["data"]["rank_change"] == -5
    backtests = client.events("backtests")
    assert backtests[-1]["data"]["results"]["roi"] == 0.12
    assert all(isinstance(e["data"]["timestamp"], float) for e in backtests)
    assert daemon.service.router.probes == {"tickstock.events.market_state": 1}
    assert sum(daemon.service.router.malformed.values()) == 0


@pytest_twisted.ensureDeferred
async def test_malformed_variants_are_dead_lettered_with_their_reason(redis_server, daemons):
    """
    What cannot be normalized reaches nobody and lands in the dead-letter
    list with a reason that says exactly what was wrong; a good message
    published after them still arrives.
    """
    daemon = daemons(redis=redis_server.url)
    await eventually(lambda: daemon.service.readiness()[0], 10, "daemon ready")
    client = await subscribed_client(daemon)
    for channel, message, _ in MALFORMED:
        publish(redis_server, channel, message)
    publish(redis_server, "tickstock.events.patterns",
            {"pattern": "Doji", "symbol": "AAPL", "confidence": 0.5, "case": "after"})
    await eventually(lambda: client.events(), 10, "the good event")

    def dead_letters() -> list[dict[str, Any]]:
        reply = redis_server.command("LRANGE", "tickstock:deadletter", "0", "-1")
        return [orjson.loads(line) for line in reply.split(b"\r\n") if line.startswith(b"{")]

    await eventually(lambda: len(dead_letters()) == len(MALFORMED), 10, "every dead letter")
    letters = list(reversed(dead_letters()))  # oldest first, as published
    for (channel, _, reason), letter in zip(MALFORMED, letters, strict=True):
        assert letter["channel"] == channel
        assert letter["reason"] == reason or (
            letter["reason"].startswith(reason + ":") and reason == "not_json"), letter
    assert [e["data"]["case"] for e in client.events()] == ["after"]
    assert sum(daemon.service.router.malformed.values()) == len(MALFORMED)


@pytest_twisted.ensureDeferred
async def test_one_tick_on_its_symbol_channel_and_on_all_ticks_counts_once(
        redis_server, daemons):
    """
    The producer publishes each tick on C{tickstock.ticks.<SYMBOL>} and on
    C{tickstock.all_ticks}: the two copies are one tick in the bars, and a
    second, identical tick later is a second one.
    """
    daemon = daemons(redis=redis_server.url)
    await eventually(lambda: daemon.service.readiness()[0], 10, "daemon ready")
    tick = {"event_type": "tick_data", "ticker": "AAPL", "price": 190.0, "volume": 7,
            "timestamp": NOW, "source": "polygon"}
    for _ in range(2):
        publish(redis_server, "tickstock.ticks.AAPL", tick)
        publish(redis_server, "tickstock.all_ticks", tick)
    router = daemon.service.router
    await eventually(lambda: router.received == 4 and router.in_flight == 0, 10, "all read")
    assert router.routed == 2 and router.duplicates == 2


@pytest_twisted.ensureDeferred
async def test_the_embedded_demo_speaks_the_upstream_dialect(daemons):
    """
    C{--sim-dialect upstream}: the built-in simulator publishes the real
    producer's shapes into the embedded bus; every one is understood.
    """
    daemon = daemons(sim_dialect="upstream", sim_rate=400)
    await eventually(lambda: daemon.service.readiness()[0], 10, "daemon ready")
    client = await subscribed_client(daemon)
    wanted = {"patterns", "market_state", "health", "ticks", "universe", "indicators", "alerts"}
    await eventually(lambda: wanted <= {e["sub"] for e in client.events()}, 15,
                     "events of every topic")
    router = daemon.service.router
    assert router.routed > 0 and dict(router.malformed) == {}


@pytest_twisted.ensureDeferred
async def test_a_row_the_producer_inserts_is_delivered_once_and_in_the_history(
        redis_server, postgres, postgres_cluster, daemons):
    """
    The seed's own SQL, run on a connection of its own under a producer's
    role, reaches a WebSocket subscriber once (with an event id, filtered by
    symbol) from each of two daemons' listeners together, and shows once in
    C{/api/patterns}.
    """
    import psycopg2
    from psycopg2.extensions import parse_dsn

    from tests.test_producer_sql import SEED_INSERT, add_producer
    from tests.wsclient import http_get

    dsn = add_producer(postgres_cluster, parse_dsn(postgres)["dbname"], "conformance_producer")
    a = daemons(redis=redis_server.url, postgres=postgres)
    b = daemons(redis=redis_server.url, postgres=postgres)
    for daemon in (a, b):
        await eventually(lambda daemon=daemon: daemon.service.readiness()[0]
                         and daemon.service.producer_rows.listening, 10, "daemon listening")
    client = await connect(a.port, hello=a.hello("alice"))
    await client.request({"op": "subscribe", "id": "p", "topic": "patterns",
                          "filter": {"symbols": ["AAPL"]}}, "subscribed")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.execute(SEED_INSERT)
        cursor.execute(SEED_INSERT.replace("'AAPL'", "'MSFT'"))
    await eventually(lambda: client.events("p"), 10, "the producer's row delivered")
    await eventually(lambda: a.service.router.received + b.service.router.received == 4, 10,
                     "both rows read by both daemons")
    await eventually(lambda: a.service.router.in_flight + b.service.router.in_flight == 0, 5)
    (event,) = client.events("p")
    assert event["id"] and event["type"] == "pattern_detected"
    assert has(event["data"], {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.85,
                               "source": "postgres"})
    assert event["data"]["event_id"].startswith("pg:")
    assert a.service.router.routed + b.service.router.routed == 2
    token = a.hello("alice")["token"]
    status, body = await http_get(a.port, "/api/patterns?symbol=AAPL",
                                  {b"authorization": [f"Bearer {token}".encode()]})
    assert status == 200, body
    assert [(p["symbol"], p["pattern"], p["confidence"]) for p in body["patterns"]] == [
        ("AAPL", "Doji", 0.85)]
