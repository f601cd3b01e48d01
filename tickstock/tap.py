"""
C{twistd tickstock}: command-line options and the service tree. The only
module that picks concrete classes (embedded bus or Redis, memory store).
"""

from __future__ import annotations

import gc
import os
import random
import re
import signal
import socket
import sys
import tempfile
from functools import partial
from typing import Any, Callable

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python import usage

from tickstock.config import OPTIONS, ConfigError, Settings, load_settings
from tickstock.canary import canary_channel
from tickstock.events import CHANNELS, CONTROL_CHANNEL, JOBS_CHANNEL
from tickstock.logs import JSONLines, LogFormat, log_format, twistd_log_file
from tickstock.store import STORED_TOPICS
from tickstock.universes import UPDATED_CHANNEL


class Options(usage.Options):
    """Every option of L{tickstock.config.OPTIONS}, plus C{--config}."""

    optParameters = [["config", "c", None, "TOML config file (also TICKSTOCK_CONFIG)."]] + [
        [option.cli[2:], None, None, f"{option.help} [default: {option.default}]"]
        for option in OPTIONS
        if not option.flag
    ]
    optFlags = [[option.cli[2:], None, option.help] for option in OPTIONS if option.flag]

    def parseOptions(self, options: list[str] | None = None) -> None:
        # Kept for --workers: each worker is started with the same options.
        self.raw_args = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self) -> None:
        flags = {option.name: self[option.cli[2:]] or None for option in OPTIONS}
        try:
            self.settings = load_settings(flags, os.environ, self["config"])
            _check_endpoint(self.settings.listen)
        except ConfigError as error:
            # One line, no usage dump and no traceback: say what is wrong.
            sys.stderr.write(f"tickstock: {error}\n")
            raise SystemExit(2) from None


def _check_endpoint(description: str) -> None:
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except Exception as error:
        raise ConfigError(
            f"--listen: not a Twisted endpoint string ({error}): {description!r}"
        ) from None


class TickStock(MultiService):
    """
    The daemon: every part, started in order (links to the producer first,
    the web server last) and stopped in reverse, each after the one before
    has finished stopping. Its attributes are the parts, for probes and
    tests.
    """

    _log = Logger()

    def stopService(self) -> Deferred[None]:
        # MultiService stops every child at once; shutdown needs an order:
        # the port, then the clients, then what was read is finished and
        # acknowledged, and only then do the Redis connections close.
        Service.stopService(self)
        d: Deferred[Any] = succeed(None)
        for service in reversed(list(self)):
            d.addCallback(lambda _, service=service: service.stopService())
            d.addErrback(lambda f, service=service: self._log.failure(
                "stopping {service!r} failed", f, service=service))
        return d.addCallback(lambda _: None)

    def __init__(self, settings: Settings, reactor: IReactorCore,
                 worker: int | None = None) -> None:
        """
        @param worker: this process's index when it is one of C{--workers}:
            it then serves the listening socket its parent handed it.
        """
        super().__init__()
        from tickstock.broadcast import Broadcaster
        from tickstock.auth import JWTAuthenticator, anonymous
        from tickstock.gateway import Gateway
        from tickstock.jobs import Jobs
        from tickstock.router import Router
        from tickstock.web.site import JSONStatus, build_site
        from tickstock.web.stream import StreamFactory
        from tickstock.web.api import build_api
        from tickstock.metrics import Metrics, MetricsResource
        from tickstock.cache import MemoryCache, RedisCache
        from tickstock.throttle import TickThrottle
        from tickstock.ratelimit import RateLimit
        from tickstock.universes import Universes
        from autobahn.twisted.resource import WebSocketResource

        self.settings = settings
        self.worker = worker
        self._clock = reactor
        self._started_at = reactor.seconds()
        behind: Callable[[], bool] = lambda: False  # noqa: E731
        if settings.redis is None:
            from tickstock.bus.memory import MemoryBus
            from tickstock.history.memory import MemoryHistory

            bus = MemoryBus(settings.deadletter_max)
            self.source, self.link = bus, bus
            self.history = MemoryHistory(
                reactor, settings.history_max, settings.history_max_age,
                settings.history_user_max,
            )
        else:
            from tickstock.bus.redis import RedisLink, RedisPubSubSource
            from tickstock.bus.streams import RedisStreamSource
            from tickstock.history.redis import RedisHistory

            streams = settings.mode == "streams"
            self.link = RedisLink(reactor, settings.redis, settings.deadletter_max,
                                  streams=streams)
            node = node_id(settings, worker)
            canary = (canary_channel(node),) if settings.canary_interval else ()
            if streams:
                self.source = RedisStreamSource(reactor, settings.redis, node,
                                                extra_streams=canary)
            else:
                source = self.source = RedisPubSubSource(
                    reactor, settings.redis, settings.redis_ping_interval,
                    settings.redis_ping_timeout, channels=(*CHANNELS, *canary),
                    ask=self.link.execute,
                )
                behind = lambda: source.behind  # noqa: E731
            self.history = RedisHistory(
                reactor, settings.redis, self.link, settings.history_max,
                settings.history_max_age, settings.history_user_max,
                store_window=settings.store_window,
            )
            self.link.setServiceParent(self)
            self.history.setServiceParent(self)
        self._add_store(reactor, settings, worker)
        if settings.redis is not None:
            # After the store: stopped before it, so what the source still
            # hands over is flushed to the store at shutdown.
            self.source.setServiceParent(self)

        self.stream = StreamFactory(
            allowed_origins=settings.allowed_origins,
            max_message_size=settings.max_message_size,
            queue_limit=settings.client_queue_limit,
            ping_interval=settings.ws_ping_interval,
            ping_timeout=settings.ws_ping_timeout,
            handshake_timeout=settings.handshake_timeout,
            max_per_ip=settings.max_connections_per_ip,
        )
        self.broadcaster = Broadcaster(self.stream.prepareMessage)
        self.ticks = TickThrottle(reactor, settings.tick_rate, self.broadcaster.deliver,
                                  partial(self.broadcaster.watched, "ticks"))
        self.universes = Universes(self.store, self.broadcaster)
        authenticate = anonymous if settings.jwt_secret is None else JWTAuthenticator(
            settings.jwt_secret, audience=settings.jwt_audience, issuer=settings.jwt_issuer
        )
        self.live_ticks = None
        if settings.mode != "streams":
            from tickstock.ticks import LiveTicks

            self.live_ticks = LiveTicks(reactor, self.history, self.ticks,
                                        None if settings.redis is None else self.history)
        self.router = Router(reactor, self.history, self.link, stored=self._persist,
                             behind=behind, ticks=self.live_ticks)
        # TickStock's own job events (a cancel, a timeout) are never shed.
        self.jobs = Jobs(reactor, self.store, self.history, self.link,
                         lambda channel, raw: self.router.receive(channel, raw, sheddable=False),
                         settings.jobs_per_user, settings.job_timeout, settings.job_patterns)
        self.jobs.setServiceParent(self)
        self.gateway = Gateway(
            reactor, self.broadcaster, self.history, authenticate,
            settings.max_subscriptions, settings.hello_timeout,
            universes=self.universes, store=self.store, catchup_max=settings.catchup_max,
            jobs=self.jobs, rate=RateLimit(reactor, settings.client_rate, settings.client_burst),
            max_per_user=settings.max_connections_per_user, ticks=self.live_ticks,
        )
        self.stream.gateway = self.gateway
        self.canary = None
        if settings.redis is not None and settings.canary_interval:
            self.canary = self._add_canary(reactor, settings, worker)
        self.source.listen(self.canary.intercept(self.router.receive) if self.canary
                           else self.router.receive)
        self.history.listen(self._live)
        if settings.redis is not None:
            self.history.on_gap(self._missed_live)

        if settings.demo or settings.redis is None:
            self._add_simulator(reactor, settings)

        self.cache = (MemoryCache(reactor) if settings.redis is None
                      else RedisCache(self.link, reactor))
        self.metrics = Metrics(reactor, self.health, self.readiness, self._metrics_extra)
        self.metrics.setServiceParent(self)
        if self.canary is not None:
            self.canary.round_trip = self.metrics.canary_round_trip
        self.api = build_api(self.store, self.cache, authenticate, settings.api_cache_ttl,
                             clock=reactor, timeout=settings.postgres_timeout, jobs=self.jobs,
                             observe=self.metrics.api_request,
                             rate=RateLimit(reactor, settings.api_rate, settings.api_burst),
                             cors_origins=settings.cors_origins)
        site = build_site(
            WebSocketResource(self.stream),
            JSONStatus(self.health), JSONStatus(self.readiness),
            timeout=settings.handshake_timeout, api=self.api,
            metrics=MetricsResource(self.metrics),
        )
        # Stopped in reverse: the port closes first, then clients are told to go.
        ClientDrain(self.gateway, reactor, SHUTDOWN_GRACE).setServiceParent(self)
        if worker is not None:
            from tickstock.workers import LISTEN_FD, AdoptedPort

            AdoptedPort(reactor, LISTEN_FD, site).setServiceParent(self)
        else:
            # strports: a port already in use stops twistd with an error at start.
            strports.service(settings.listen, site, reactor=reactor).setServiceParent(self)

    def _add_store(self, reactor: Any, settings: Settings, worker: int | None) -> None:
        """The system of record, and the persister that batches writes to it."""
        from tickstock.persist import Persister

        if settings.postgres:
            from tickstock.store.postgres import PostgresStore

            self.store = PostgresStore(reactor, settings.postgres, settings.postgres_readonly,
                                       settings.postgres_timeout)
            self.store.setServiceParent(self)
        else:
            from tickstock.sim import UNIVERSES, default_symbols
            from tickstock.store.memory import MemoryStore

            # The demo's universes: no producer writes cache_entries here.
            symbols = default_symbols(max(settings.sim_symbols, 10))
            # As many events as the history keeps: every one is a Python
            # object the garbage collector walks, on the delivery thread.
            self.store = MemoryStore(reactor, max_events=settings.history_max, universes={
                key: {"type": _demo_universe_type(key),
                      "symbols": symbols[n::len(UNIVERSES)] or symbols[:1]}
                for n, key in enumerate(UNIVERSES)
            })
        node = node_id(settings, worker)
        spool = settings.spool_dir or os.path.join(tempfile.gettempdir(), "tickstock-spool")
        self.persister = Persister(
            reactor, self.store, f"{node}:{int(reactor.seconds() * 1000)}",
            settings.flush_interval, settings.pending_max,
            os.path.join(spool, re.sub(r"[^A-Za-z0-9_.-]", "_", node)),
        )
        self.persister.setServiceParent(self)

    def _add_canary(self, reactor: IReactorCore, settings: Settings, worker: int | None) -> Any:
        """The freshness canary, sent the way the producer sends (CONTRACT §1)."""
        from tickstock.canary import Canary

        if settings.mode == "streams":
            def send(channel: str, payload: bytes) -> Deferred[Any]:
                return self.link.execute("XADD", channel, "MAXLEN", "~", CANARY_STREAM_MAX,
                                         "*", "data", payload)
        else:
            def send(channel: str, payload: bytes) -> Deferred[Any]:
                return self.link.execute("PUBLISH", channel, payload)

        canary = Canary(reactor, send, canary_channel(node_id(settings, worker)),
                        settings.canary_interval)
        canary.setServiceParent(self)
        return canary

    def _persist(self, event: Any) -> None:
        """An event this process stored: into bars, the event history, or its job's record."""
        if event.topic == "ticks":
            self.persister.add_tick(event)
        elif event.topic in STORED_TOPICS or event.topic == "backtests":
            self.persister.add_event(event)

    def _add_simulator(self, reactor: IReactorCore, settings: Settings) -> None:
        from tickstock.sim import (
            Backtester, JobRunner, MarketSimulator, OutageQuietPublish, Producer, default_symbols,
        )

        publish = OutageQuietPublish(self.link.publish)
        runner = JobRunner(reactor, publish, Backtester())
        producer = None
        if settings.sim_rate > 0:
            simulator = MarketSimulator(default_symbols(settings.sim_symbols), random.Random())
            producer = Producer(reactor, publish, simulator, settings.sim_rate)
        if settings.redis is None:
            self.link.on(JOBS_CHANNEL, runner.handle_job)
            self.link.on(CONTROL_CHANNEL, runner.handle_control)
        else:
            from tickstock.bus.redis import RedisPubSubSource

            jobs = RedisPubSubSource(reactor, settings.redis,
                                     channels=[JOBS_CHANNEL, CONTROL_CHANNEL])
            jobs.listen(lambda channel, payload, key: runner.handle_job(payload)
                        if channel == JOBS_CHANNEL else runner.handle_control(payload))
            jobs.setServiceParent(self)
        SimulatorService(producer, runner).setServiceParent(self)

    def _live(self, event: Any) -> None:
        if event.topic == "ticks":
            self.ticks(event)
            return
        if event.topic == "universe":
            self._universe_changed(event)
        if self.broadcaster.deliver(event):
            self.metrics.delivered(event)
            if event.user is not None:
                self.history.delivered(event.user, event.id)

    def _universe_changed(self, event: Any) -> None:
        if event.channel in (UPDATED_CHANNEL, "tickstock.cache.sync_complete"):
            self.cache.invalidate()
        if not self.settings.postgres and event.channel == UPDATED_CHANNEL:
            # Embedded store: the event's own symbol list is the universe.
            key, symbols = event.data.get("universe"), event.data.get("symbols")
            if isinstance(key, str) and isinstance(symbols, list):
                try:
                    self.store.set_universe(key, _demo_universe_type(key), symbols)
                except ValueError:
                    pass
        self.universes.changed(event)

    def _missed_live(self, topic: str) -> None:
        for client in self.broadcaster.clients_of(topic):
            self.gateway.missed_live(client)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness, with the counters an operator looks at first."""
        return True, {
            "status": "ok",
            "auth": "none" if self.settings.jwt_secret is None else "token",
            "pid": os.getpid(),
            "worker": self.worker,
            "uptime_s": round(self._clock.seconds() - self._started_at, 3),
            "clients": len(self.gateway.connections),
            "subscriptions": self.broadcaster.subscriptions,
            "events": {
                "received": self.router.received,
                "routed": self.router.routed,
                "duplicates": self.router.duplicates,
                "store_failures": self.router.failed,
                "malformed": dict(self.router.malformed),
                "shed": dict(self.router.shed),
                "in_flight": self.router.in_flight,
                "job_events_dropped": dict(self.router.refused),
                "delivered": self.broadcaster.delivered,
                "unrouted_targeted": self.broadcaster.unrouted,
            },
            "handshakes_refused": {"origin": self.stream.refused_origins,
                                   "per_ip": self.stream.refused_per_ip},
            "slow_consumers_closed": self.gateway.slow_consumers_closed,
            "conflated": self.stream.conflated,
            "live_gaps_closed": self.gateway.live_gaps_closed,
            "heartbeat_timeouts": self.gateway.heartbeat_timeouts,
            "ticks_conflated": self.ticks.conflated,
            "universe_refreshes": self.universes.refreshes,
            "persist": self.persister.status(),
            "jobs": self.jobs.stats(),
            "api": self.api.stats(),
        }

    def _metrics_extra(self) -> dict[str, Any]:
        """What /metrics shows beyond the /health body."""
        return {"subscriptions_by_topic": +self.broadcaster.by_topic,
                "received_by_channel": self.router.received_by_channel,
                "client_errors": self.gateway.errors, "catchups": self.gateway.catchups}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when producer messages can arrive (and, with Redis, be sent)."""
        components: dict[str, Any] = {"source": self.source.status(),
                                      "store": self.store.status()}
        ok = bool(self.source.ready) and bool(self.store.ready)
        if self.settings.redis is not None:
            link_ok = self.link.connected
            components["link"] = {"state": "connected" if link_ok else "connecting"}
            components["history"] = self.history.status()
            ok = ok and link_ok and self.history.ready
        if self.canary is not None:
            components["canary"] = self.canary.status()
            ok = ok and self.canary.fresh
        return ok, {"ready": ok, "mode": self.settings.mode, "components": components}


SHUTDOWN_GRACE = 3.0
CANARY_STREAM_MAX = 100


def _demo_universe_type(key: str) -> str:
    return "etf_universe" if key.startswith("etf") else "stock_universe"


def node_id(settings: Settings, worker: int | None = None) -> str:
    """
    This daemon's stream consumer name: C{--node-id}, else host name and
    listen port, which stay the same across restarts, so a restarted daemon
    finds what it read but did not acknowledge before it stopped; a worker
    adds its index.
    """
    if settings.node_id:
        name = settings.node_id
    else:
        parts = settings.listen.split(":")
        port = parts[1] if len(parts) > 1 and parts[1].isdigit() else str(os.getpid())
        name = f"{socket.gethostname()}:{port}"
    return name if worker is None else f"{name}:w{worker}"


class ClientDrain(Service):
    """
    At shutdown, after the port has stopped accepting: close every client
    with 1001 ("going away": reconnect, to another node if there is one) and
    wait for them to go, at most C{grace} seconds.
    """

    def __init__(self, gateway: Any, clock: Any, grace: float) -> None:
        self._gateway = gateway
        self._clock = clock
        self._grace = grace

    def stopService(self) -> Deferred[None]:
        super().stopService()
        from tickstock.gateway import CLOSE_GOING_AWAY

        self._gateway.close_all(CLOSE_GOING_AWAY, "server shutting down; reconnect")
        done: Deferred[None] = Deferred()
        deadline = self._clock.seconds() + self._grace

        def check() -> None:
            if not self._gateway.connections or self._clock.seconds() >= deadline:
                done.callback(None)
            else:
                self._clock.callLater(0.05, check)

        check()
        return done


class SimulatorService(Service):
    """Runs the built-in producer simulator (demo) for as long as the daemon."""

    def __init__(self, producer: Any, runner: Any) -> None:
        self._producer = producer
        self._runner = runner

    def startService(self) -> None:
        super().startService()
        if self._producer is not None:
            self._producer.start()

    def stopService(self) -> None:
        super().stopService()
        if self._producer is not None:
            self._producer.stop()
        self._runner.stop()


GC_THRESHOLDS = (50_000, 20, 100)
"""The cyclic collector's thresholds for the daemon's process. Python's
default (700, 10, 10) runs a young collection every few events and a full one,
which walks every event the embedded store and the history keep, often
enough to pause delivery for tens of milliseconds (p99 at 40,000 deliveries/s:
about 120-160 ms with the default, 20-70 ms with these). Almost nothing on the
delivery path makes cycles; what does is still collected, later."""


def makeService(options: Options) -> MultiService:
    """twistd's entry point."""
    from twisted.internet import reactor

    gc.set_threshold(*GC_THRESHOLDS)

    from tickstock.workers import WORKER_ENV, WorkerPool

    settings = options.settings
    twistd = getattr(options, "parent", None)  # twistd's own options, when run by twistd
    json_logs = log_format(settings.log_format, twistd) == "json"
    service: MultiService
    if WORKER_ENV in os.environ:
        # Ctrl-C reaches the whole process group; the parent relays a stop
        # to its workers, and a second one would stop a stopped reactor.
        reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
        service = TickStock(settings, reactor, worker=int(os.environ[WORKER_ENV]))
    elif settings.workers > 1:
        service = MultiService()
        # Workers log to the parent, which writes their JSON records as they are.
        args = [*options.raw_args, "--log-format", "json"] if json_logs else options.raw_args
        WorkerPool(reactor, settings.listen, settings.workers, args).setServiceParent(service)
    else:
        service = TickStock(settings, reactor)
    if json_logs and twistd is not None and not twistd["syslog"]:
        return LogFormat(service, JSONLines(twistd_log_file(twistd)))
    return service
