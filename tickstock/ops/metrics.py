"""
C{/metrics} in the Prometheus text format. Counters and gauges are read at
scrape time from the numbers the components already keep for C{/health} and
C{/ready}, so the delivery path pays nothing for them; only the histograms
are observed as things happen: delivery latency (once per event, not per
client), API latency (once per request) and reactor lag (once a second).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from tickstock.deliver.overload import LATE_AFTER
from tickstock.domain.events import Event
from tickstock.web.site import REFUSED_STATUS
from tickstock.web.websocket import BACKLOGGED_AFTER

LAG_INTERVAL = 1.0
# Delivery is milliseconds; the upper buckets catch a stalled reactor.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# States in which a dependency is doing its job.
UP_STATES = frozenset({"ready", "ok", "connected", "subscribed", "reading", "tailing", "embedded",
                       "fresh", "loaded"})


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(family: Any, counts: Mapping[str, float]) -> Any:
    for label, value in sorted(counts.items()):
        family.add_metric([str(label)], value)
    return family


def _states(components: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(component, state) for each dependency in a C{/ready} body, nested ones too."""
    for name, status in components.items():
        if isinstance(status, dict):
            if isinstance(status.get("state"), str):
                yield prefix + name, status["state"]
            yield from _states({k: v for k, v in status.items() if isinstance(v, dict)},
                               f"{prefix}{name}_")


class _Collector:
    """Reads the daemon's C{health()} and C{readiness()} bodies at each scrape."""

    def __init__(self, health: Callable[[], tuple[bool, dict[str, Any]]],
                 readiness: Callable[[], tuple[bool, dict[str, Any]]],
                 extra: Callable[[], dict[str, Any]]) -> None:
        self._health = health
        self._readiness = readiness
        self._extra = extra

    def collect(self) -> Iterable[Metric]:
        _, h = self._health()
        ready, r = self._readiness()
        x = self._extra()
        events = h["events"]
        yield _gauge("tickstock_clients", "Connected WebSocket clients.", h["clients"])
        yield _labelled(GaugeMetricFamily("tickstock_subscriptions", "Subscriptions by topic.",
                                          labels=["topic"]), x["subscriptions_by_topic"])
        yield _labelled(CounterMetricFamily(
            "tickstock_events_received", "Producer messages received, by channel.",
            labels=["channel"]), x["received_by_channel"])
        yield _counter("tickstock_events_routed", "Events stored in the history and routed.",
                       events["routed"])
        dropped = CounterMetricFamily("tickstock_events_dropped",
                                      "Producer messages not routed, by reason.", labels=["reason"])
        _labelled(dropped, {"duplicate": events["duplicates"],
                            "store_failure": events["store_failures"],
                            **{f"job_{k}": v for k, v in events["job_events_dropped"].items()}})
        yield dropped
        deadlettered = CounterMetricFamily(
            "tickstock_events_deadlettered", "Producer messages that could not be normalized "
            "(kept in the dead-letter list), by channel and reason.", labels=["channel", "reason"])
        for (channel, reason), value in sorted(x["deadlettered"].items()):
            deadlettered.add_metric([channel, reason], value)
        yield deadlettered
        yield _labelled(CounterMetricFamily(
            "tickstock_probes", "The producer's liveness probes received (not delivered), by "
            "channel.", labels=["channel"]), x["probes"])
        yield _labelled(CounterMetricFamily(
            "tickstock_events_shed", "Producer messages shed under overload (too many on "
            "their way to the history), by channel.", labels=["channel"]), events["shed"])
        yield _gauge("tickstock_events_in_flight", "Events on their way to the history.",
                     events["in_flight"])
        yield _counter("tickstock_events_delivered", "Event frames written to client sockets.",
                       events["delivered"])
        yield _counter("tickstock_targeted_unrouted", "Targeted events with no user.",
                       events["unrouted_targeted"])
        yield _labelled(CounterMetricFamily(
            "tickstock_handshakes_refused", "WebSocket handshakes refused, by reason.",
            labels=["reason"]), h["handshakes_refused"])
        refused = CounterMetricFamily(
            "tickstock_http_refused", "HTTP requests refused before any resource answered "
            "(WebSocket handshakes; requests too large to read or malformed), by reason and "
            "status.", labels=["reason", "status"])
        counts = {**h["handshakes_refused"], **h["http_refused"]}
        for reason, status in sorted(REFUSED_STATUS.items()):
            refused.add_metric([reason, str(status)], counts.get(reason, 0))
        yield refused
        jobs = h["jobs"]
        yield _counter("tickstock_jobs_no_producer", "Backtests refused because no producer "
                       "received them (pub/sub).", jobs["no_producer"])
        yield _counter("tickstock_job_records_late", "Final job events delivered before their "
                       "record was written (the store did not answer within a second).",
                       jobs.get("records_late", 0))
        yield _counter("tickstock_events_redelivered", "Stream entries read again that the "
                       "history had stored: made again in the store, not delivered again.",
                       events["redelivered"])
        yield _counter("tickstock_slow_consumers_closed",
                       "Clients closed because they stopped reading (or read slower than "
                       "their events come, for long).", h["slow_consumers_closed"])
        overload = h["overload"]
        yield _gauge("tickstock_overloaded", "1 while the daemon is behind (events reach "
                     "delivery late, too many stored events wait for it, or most clients have "
                     "frames waiting): ticks are shed first, a Redis source reads less.",
                     1 if overload["behind"] else 0)
        yield _counter("tickstock_events_late", "Events that reached live delivery more than "
                       f"{LATE_AFTER:g} s after they arrived.", overload["late_events"])
        yield _gauge("tickstock_clients_backlogged", "Clients with frames waiting for over "
                     f"{BACKLOGGED_AFTER:g} s though they read.", overload["clients_backlogged"])
        yield _counter("tickstock_live_gaps_closed", "Clients closed to resume after the live "
                       "feed fell behind the history.", h["live_gaps_closed"])
        yield _counter("tickstock_ticks_conflated", "Ticks replaced by a newer one before "
                       "they were sent (--tick-rate).", h["ticks_conflated"])
        yield _labelled(CounterMetricFamily("tickstock_client_errors",
                                            "Client requests refused, by error code.",
                                            labels=["code"]), x["client_errors"])
        yield _counter("tickstock_history_catchups", "Subscriptions that resumed with a replay.",
                       x["catchups"])

        yield _gauge("tickstock_ready", "1 while /ready answers 200.", 1 if ready else 0)
        up = GaugeMetricFamily("tickstock_dependency_up",
                               "1 while a dependency is in a working state.",
                               labels=["component", "state"])
        for component, state in _states(r["components"]):
            up.add_metric([component, state], 1 if state in UP_STATES else 0)
        yield up
        reconnects = CounterMetricFamily("tickstock_dependency_connections",
                                         "Connections made to a dependency (1 + reconnects).",
                                         labels=["component"])
        for component, status in r["components"].items():
            if isinstance(status, dict) and isinstance(status.get("connections"), int):
                reconnects.add_metric([component], status["connections"])
        yield reconnects
        canary = r["components"].get("canary")
        if canary is not None:
            yield _gauge("tickstock_canary_fresh", "1 while the freshness canary comes back "
                         "through Redis in time.", 1 if canary["state"] == "fresh" else 0)
            if canary["age_s"] is not None:
                yield _gauge("tickstock_canary_age_seconds", "Seconds since a canary last came "
                             "back.", canary["age_s"])
            yield _counter("tickstock_canary_sent", "Canaries published.", canary["sent"])
            yield _counter("tickstock_canary_returned", "Canaries that came back.",
                           canary["returned"])

        jwks = r["components"].get("jwks")
        if jwks is not None:
            yield _gauge("tickstock_jwks_keys", "Signing keys of the identity provider in use.",
                         jwks["keys"])
            if jwks["age_s"] is not None:
                yield _gauge("tickstock_jwks_age_seconds", "Seconds since the JWKS was last "
                             "fetched successfully.", jwks["age_s"])
            yield _counter("tickstock_jwks_fetch_failures", "JWKS fetches that failed (the "
                           "keys fetched before stay in use).", jwks["failures"])

        persist = h["persist"]
        yield _counter("tickstock_bars_written", "1-minute bars written to the store.",
                       persist["bars_written"])
        yield _counter("tickstock_events_written", "Events written to the store.",
                       persist["events_written"])
        yield _counter("tickstock_store_write_failures", "Store writes that failed (retried).",
                       persist["write_failures"])
        yield _gauge("tickstock_store_pending", "Bars and events waiting to be written.",
                     persist["pending"])
        yield _gauge("tickstock_store_spool_files", "Spilled files waiting to be written.",
                     persist["spool_files"])

        api = h["api"]
        requests = CounterMetricFamily("tickstock_api_requests", "REST requests answered.",
                                       labels=["route", "status"])
        for route, statuses in api["requests"].items():
            for status, n in statuses.items():
                requests.add_metric([route, status], n)
        yield requests
        cache = api["cache"]
        yield _counter("tickstock_api_cache_hits", "API answers served from the cache.",
                       cache["hits"])
        yield _counter("tickstock_api_cache_misses", "API answers computed.", cache["misses"])
        yield _gauge("tickstock_api_cache_hit_ratio", "Hits / (hits + misses) since start.",
                     cache["ratio"])
        jobs = h["jobs"]
        yield _counter("tickstock_jobs_submitted", "Backtest jobs accepted.", jobs["submitted"])
        yield _counter("tickstock_jobs_timed_out", "Backtest jobs failed for want of progress.",
                       jobs["timed_out"])


class Metrics(Service):
    """
    The daemon's registry (its own: nothing global) and the histograms.
    C{health}, C{readiness} and C{extra} are the daemon's report functions.
    """

    def __init__(self, clock: IReactorTime,
                 health: Callable[[], tuple[bool, dict[str, Any]]],
                 readiness: Callable[[], tuple[bool, dict[str, Any]]],
                 extra: Callable[[], dict[str, Any]]) -> None:
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(health, readiness, extra))
        self._delivery = Histogram(
            "tickstock_delivery_seconds", "From an event's arrival (its id time) to its frames "
            "written to every matching client's socket; once per delivered event.",
            registry=self.registry, buckets=LATENCY_BUCKETS)
        self._api = Histogram("tickstock_api_request_seconds", "REST request latency.",
                              ["route", "status"], registry=self.registry,
                              buckets=LATENCY_BUCKETS)
        self.reactor_lag = Histogram("tickstock_reactor_lag_seconds",
                              f"How late a timer set {LAG_INTERVAL:g} s ahead fires: the "
                              "reactor's backlog.", registry=self.registry, buckets=LATENCY_BUCKETS)
        self._canary = Histogram(
            "tickstock_canary_round_trip_seconds", "From publishing a canary to the source "
            "handing it back.", registry=self.registry, buckets=LATENCY_BUCKETS)
        self.canary_round_trip = self._canary.observe
        self._call: IDelayedCall | None = None
        self._due = 0.0

    def delivered(self, event: Event) -> None:
        """Observe C{event}'s delivery latency, now that it was written."""
        arrived = event.received_at or int(event.id.split("-", 1)[0]) / 1000
        self._delivery.observe(max(0.0, self._clock.seconds() - arrived))

    def api_request(self, route: str, status: int, seconds: float) -> None:
        self._api.labels(route, str(status)).observe(seconds)

    def _beat(self) -> None:
        now = self._clock.seconds()
        if self._call is not None:
            self.reactor_lag.observe(max(0.0, now - self._due))
        self._due = now + LAG_INTERVAL
        self._call = self._clock.callLater(LAG_INTERVAL, self._beat)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._call = None
        self._beat()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """C{GET /metrics}."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return self._metrics.exposition()
