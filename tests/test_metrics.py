"""
C{/metrics}: the exposition parses with prometheus_client's own parser and
moves as events flow through a real daemon on the test's Redis; the reactor
lag histogram is checked against a Clock.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from tests.test_end_to_end import pattern, publish, ready
from tests.test_resume import PATTERNS
from tests.wsclient import connect, eventually, http_get, http_request
from tickstock.ops.metrics import Metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return samples(body.decode() if isinstance(body, bytes) else body)


@pytest_twisted.ensureDeferred
async def test_metrics_parse_and_move_when_events_flow(redis_server: Any, daemons: Any) -> None:
    """
    A client subscribed to AAPL patterns, 5 events for it, one malformed
    message and one REST request later: the counters, the gauges and the
    histograms say so.
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    before = await scrape(daemon.port)
    assert before[("tickstock_clients", ())] == 0
    assert before[("tickstock_ready", ())] == 1
    assert before[("tickstock_delivery_seconds_count", ())] == 0

    client = await connect(daemon.port, hello=daemon.hello("alice"))
    await client.request({"op": "subscribe", "id": "p", "topic": "patterns",
                          "filter": {"symbols": ["AAPL"]}}, "subscribed")
    for n in range(5):
        publish(redis_server, PATTERNS, pattern("AAPL", n=n))
    publish(redis_server, PATTERNS, b"{not json")
    await eventually(lambda: len(client.events("p")) == 5, 10, "five events")
    token = daemon.hello("alice")["token"]
    status, _, _ = await http_request(daemon.port, b"GET", "/api/symbols", token)
    assert status == 200

    registry = daemon.service.metrics.registry
    await eventually(lambda: registry.get_sample_value("tickstock_reactor_lag_seconds_count") >= 1,
                     5, "a reactor lag sample")
    after = await scrape(daemon.port)
    assert after[("tickstock_clients", ())] == 1
    assert after[("tickstock_subscriptions", (("topic", "patterns"),))] == 1
    assert after[("tickstock_events_received_total", (("channel", PATTERNS),))] == 6
    assert after[("tickstock_events_deadlettered_total",
                  (("channel", PATTERNS), ("reason", "not_json")))] == 1
    assert after[("tickstock_events_routed_total", ())] >= 5
    assert after[("tickstock_events_delivered_total", ())] - before[(
        "tickstock_events_delivered_total", ())] == 5
    assert after[("tickstock_delivery_seconds_count", ())] == 5
    assert 0 < after[("tickstock_delivery_seconds_sum", ())] < 5
    assert after[("tickstock_api_requests_total", (("route", "symbols"), ("status", "200")))] == 1
    assert after[("tickstock_api_request_seconds_count",
                  (("route", "symbols"), ("status", "200")))] == 1
    up = {labels: v for (name, labels), v in after.items() if name == "tickstock_dependency_up"}
    assert up and all(v == 1 for v in up.values()), up
    assert after[("tickstock_reactor_lag_seconds_count", ())] >= 1

    redis_server.kill()
    await eventually(lambda: not daemon.service.readiness()[0], 15, "not ready")
    down = await scrape(daemon.port)
    assert down[("tickstock_ready", ())] == 0
    assert any(v == 0 for (name, _), v in down.items() if name == "tickstock_dependency_up")


def test_reactor_lag_is_how_late_the_timer_fires() -> None:
    """
    With a Clock: a timer due in 1 s that runs 1.5 s later observes 0.5 s.
    The daemon's report functions are stand-ins: this reads the histogram alone.
    """
    clock = Clock()

    def empty() -> tuple[bool, dict[str, Any]]:
        return True, {}

    metrics = Metrics(clock, empty, empty, dict)
    metrics.startService()
    clock.advance(1.0)
    clock.advance(1.5)
    metrics.stopService()
    lag = {s.name: s.value for family in metrics.reactor_lag.collect() for s in family.samples}
    assert (lag["tickstock_reactor_lag_seconds_count"], lag["tickstock_reactor_lag_seconds_sum"]) \
        == (2, 0.5)
