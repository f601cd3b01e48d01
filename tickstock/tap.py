"""
C{twistd tickstock}: command-line options and the service tree. The only
module that picks concrete classes (embedded bus or Redis, memory store).
"""

from __future__ import annotations

import errno
import gc
import os
import random
import re
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from typing import Any, NoReturn

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError, VerifyError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore
from twisted.logger import Logger
from twisted.python import usage

from tickstock.config import OPTIONS, ConfigError, Settings, check_settings, describe
from tickstock.deliver.universes import MEMBERSHIP_CHANNELS, UPDATED_CHANNEL
from tickstock.domain.topics import (
    BACKTESTS,
    CONTROL_CHANNEL,
    JOBS_CHANNEL,
    STORED_TOPICS,
    TICKS,
    UNIVERSE,
)
from tickstock.ops.canary import canary_channel
from tickstock.ops.logs import JSONLines, LogFormat, log_format, twistd_log_file


class Options(usage.Options):
    """Every option of L{tickstock.config.OPTIONS}, plus C{--config}."""

    optParameters = [["config", "c", None, "TOML config file (also TICKSTOCK_CONFIG)."]] + [
        [option.cli[2:], None, None, f"{option.help} [default: {option.default}]"]
        for option in OPTIONS
        if not option.flag
    ]
    optFlags = [[option.cli[2:], None, option.help] for option in OPTIONS if option.flag] + [
        ["check-config", None, "Check the config file, environment and flags, print the "
         "effective settings (secrets masked) and exit: 0 if they are right, else 2 after "
         "every problem. Binds no port and connects to nothing."],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        # Kept for --workers: each worker is started with the same options.
        self.raw_args = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self) -> None:
        flags: dict[str, Any] = {}
        for option in OPTIONS:
            given = self[option.cli[2:]]
            if given:
                # usage.Options gives a flag as the integer 1, not True.
                flags[option.name] = True if option.flag else given
        checked = check_settings(flags, os.environ, self["config"])
        problems = list(checked.problems)
        if "listen" not in checked.wrong:
            problems.extend(_endpoint_problems(checked.settings.listen))
        if problems:
            # One line each, no usage dump and no traceback: say what is wrong.
            sys.stderr.writelines(f"tickstock: {problem}\n" for problem in problems)
            raise SystemExit(2)
        if self["check-config"]:
            sys.stdout.write("tickstock: the configuration is valid; the effective settings:\n")
            sys.stdout.writelines(f"  {line}\n" for line in describe(checked))
            raise SystemExit(0)
        self.settings = checked.settings


def _endpoint_problems(description: str) -> list[str]:
    """
    What is wrong with a C{--listen} endpoint string, found without binding:
    parsing an C{ssl:} one reads its key and certificate.
    """
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except OSError as error:
        return [f"--listen: cannot read {error.filename}: {error.strerror}"]
    except Exception as error:
        # pyOpenSSL's errors, and Twisted's when the key is not the certificate's.
        if type(error).__module__.startswith("OpenSSL") or isinstance(error, VerifyError):
            return [f"--listen: bad TLS key or certificate ({error})"]
        return [f"--listen: not a Twisted endpoint string ({error}): {description!r}"]
    return []


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
        from autobahn.twisted.resource import WebSocketResource

        from tickstock.deliver.auth import JWTAuthenticator, anonymous
        from tickstock.deliver.broadcast import Broadcaster
        from tickstock.deliver.gateway import Gateway
        from tickstock.deliver.overload import Overload
        from tickstock.deliver.ratelimit import RateLimit
        from tickstock.deliver.throttle import TickThrottle
        from tickstock.deliver.universes import Universes
        from tickstock.ingest.router import Router
        from tickstock.jobs.backtests import Jobs
        from tickstock.ops.metrics import Metrics, MetricsResource
        from tickstock.store.cache import MemoryCache, RedisCache
        from tickstock.web.api import build_api
        from tickstock.web.site import JSONStatus, build_site
        from tickstock.web.websocket import StreamFactory

        self.settings = settings
        self.worker = worker
        self.producer_rows: Any = None
        self._clock = reactor
        self._started_at = reactor.seconds()
        behind: Callable[[], bool] = lambda: False  # noqa: E731
        registry = self.registry = settings.channels
        if settings.redis is None:
            from tickstock.history.memory import MemoryHistory
            from tickstock.ingest.memory import MemoryBus

            bus = MemoryBus(settings.deadletter_max, registry)
            self.source, self.link = bus, bus
            self.history = MemoryHistory(
                reactor, settings.history_max, settings.history_max_age,
                settings.history_user_max, dedupe_window=settings.dedupe_window,
            )
        else:
            from tickstock.connections.redis import RedisLink
            from tickstock.history.redis import RedisHistory
            from tickstock.ingest.pubsub import RedisPubSubSource
            from tickstock.ingest.streams import RedisStreamSource

            streams = settings.mode == "streams"
            self.link = RedisLink(reactor, settings.redis, settings.deadletter_max,
                                  streams=streams)
            node = node_id(settings, worker)
            canary = (canary_channel(node),) if settings.canary_interval else ()
            if streams:
                self.source = RedisStreamSource(reactor, settings.redis, node,
                                                extra_streams=canary, streams=registry.names)
            else:
                source = self.source = RedisPubSubSource(
                    reactor, settings.redis, settings.redis_ping_interval,
                    settings.redis_ping_timeout, channels=(*registry.names, *canary),
                    ask=self.link.execute, patterns=registry.patterns,
                    same=lambda name: getattr(registry.by_redis_name(name), "name", name),
                )
                behind = lambda: source.behind  # noqa: E731
            self.history = RedisHistory(
                reactor, settings.redis, self.link, settings.history_max,
                settings.history_max_age, settings.history_user_max,
                store_window=settings.store_window, dedupe_window=settings.dedupe_window,
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
        # Whether the daemon is behind: ticks are shed first, a Redis source reads less.
        self.overload = Overload(reactor, self.stream.clients_behind, settings.history_max // 2)
        if settings.mode == "streams":
            self.source.behind = self.overload
        elif settings.redis is not None:
            self.source.daemon_behind = self.overload
        self.broadcaster = Broadcaster(self.stream.prepareMessage)
        self.ticks = TickThrottle(reactor, settings.tick_rate, self.broadcaster.deliver,
                                  partial(self.broadcaster.watched, "ticks"), self.overload)
        self.universes = Universes(self.store, self.broadcaster)
        authenticate = anonymous if settings.jwt_secret is None else JWTAuthenticator(
            settings.jwt_secret, audience=settings.jwt_audience, issuer=settings.jwt_issuer
        )
        self.live_ticks = None
        if settings.mode != "streams":
            from tickstock.deliver.ticks import LiveTicks

            self.live_ticks = LiveTicks(reactor, self.history, self.ticks,
                                        None if settings.redis is None else self.history)
        self.router = Router(reactor, self.history, self.link, stored=self._persist,
                             behind=behind, ticks=self.live_ticks, registry=registry)
        # TickStock's own job events (a cancel, a timeout) are never shed.
        self.jobs = Jobs(reactor, self.store, self.history, self.link,
                         lambda channel, raw: self.router.receive(channel, raw, sheddable=False),
                         settings.jobs_per_user, settings.job_timeout, settings.job_patterns,
                         unheard_is_lost=settings.mode != "streams")
        self.jobs.setServiceParent(self)
        self._job_live = self.jobs.record_first(self.store, self._deliver)
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
        self.site = site = build_site(
            WebSocketResource(self.stream),
            JSONStatus(self.health), JSONStatus(self.readiness),
            timeout=settings.handshake_timeout, api=self.api,
            metrics=MetricsResource(self.metrics),
        )
        # Stopped in reverse: the port closes first, then clients are told to go.
        ClientDrain(self.gateway, reactor, SHUTDOWN_GRACE).setServiceParent(self)
        if worker is not None:
            from tickstock.ops.workers import LISTEN_FD, AdoptedPort

            AdoptedPort(reactor, LISTEN_FD, site).setServiceParent(self)
        else:
            Listener(reactor, settings.listen, site, self._listening).setServiceParent(self)

    def _listening(self, url: str) -> None:
        """Once the port is bound: where to point a browser, and what is behind it."""
        settings = self.settings
        if settings.redis is None:
            mode = "embedded demo"
        else:
            mode = f"Redis {settings.mode}"
            if settings.redis.sentinels:
                mode += " via Sentinel"
            if settings.demo:
                mode += " with the demo simulator"
        self._log.info(
            "TickStock ready on {url} - {mode}, {store}, {auth}", url=url, mode=mode,
            store="PostgreSQL store" if settings.postgres else "embedded store",
            auth="auth off" if settings.jwt_secret is None else "auth on (HS256)")

    def _add_store(self, reactor: Any, settings: Settings, worker: int | None) -> None:
        """The system of record, and the persister that batches writes to it."""
        from tickstock.store.persist import Persister

        if settings.postgres:
            from tickstock.store.listen import ProducerRowListener
            from tickstock.store.postgres import PostgresStore

            self.store = PostgresStore(reactor, settings.postgres, settings.postgres_readonly,
                                       settings.postgres_timeout)
            self.store.setServiceParent(self)
            # Rows a producer inserts into events itself, delivered like its
            # messages. The writer: a standby neither LISTENs nor notifies.
            self.producer_rows = ProducerRowListener(
                reactor, reactor, settings.postgres, settings.postgres_timeout,
                lambda channel, raw: self.router.receive(channel, raw, sheddable=False))
            self.producer_rows.setServiceParent(self)
        else:
            from tickstock.sim.producer import UNIVERSES, default_symbols
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
        streams = settings.mode == "streams"
        self.persister = Persister(
            reactor, self.store, f"{node}:{int(reactor.seconds() * 1000)}",
            settings.flush_interval, settings.pending_max,
            os.path.join(spool, re.sub(r"[^A-Za-z0-9_.-]", "_", node)),
            sealing=streams,
        )
        if streams:
            # An entry is acknowledged once what it became is durable.
            self.source.durability = self.persister
        self.persister.setServiceParent(self)

    def _add_canary(self, reactor: IReactorCore, settings: Settings, worker: int | None) -> Any:
        """The freshness canary, sent the way the producer sends (docs/contract.md §1)."""
        from tickstock.ops.canary import Canary

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
        self.overload.stored(event)
        if event.topic == TICKS:
            self.persister.add_tick(event)
        elif event.topic in STORED_TOPICS or event.topic == BACKTESTS:
            channel = self.registry.get(event.channel)
            if channel is None or channel.stored:
                self.persister.add_event(event)

    def _add_simulator(self, reactor: IReactorCore, settings: Settings) -> None:
        from tickstock.domain.topics import CANCEL_CHANNEL
        from tickstock.sim.producer import (
            Backtester,
            JobRunner,
            MarketSimulator,
            OutageQuietPublish,
            Producer,
            UpstreamSimulator,
            default_symbols,
        )

        upstream = settings.sim_dialect == "upstream"
        publish = OutageQuietPublish(self.link.publish)
        runner = JobRunner(reactor, publish, Backtester(), upstream=upstream)
        producer = None
        if settings.sim_rate > 0:
            symbols, rng = default_symbols(settings.sim_symbols), random.Random()
            # Each tick on its symbol's channel and on all_ticks is one tick
            # only where messages are named by their bytes: Redis pub/sub.
            pair = settings.redis is not None and settings.mode == "pubsub"
            simulator = UpstreamSimulator(symbols, rng, per_symbol_ticks=pair) if upstream \
                else MarketSimulator(symbols, rng)
            producer = Producer(reactor, publish, simulator, settings.sim_rate)
        if settings.redis is None:
            self.link.on(JOBS_CHANNEL, runner.handle_job)
            self.link.on(CANCEL_CHANNEL, runner.handle_control)
            self.link.on(CONTROL_CHANNEL, runner.handle_control)
        else:
            from tickstock.ingest.pubsub import RedisPubSubSource

            jobs = RedisPubSubSource(reactor, settings.redis,
                                     channels=[JOBS_CHANNEL, CANCEL_CHANNEL, CONTROL_CHANNEL])
            jobs.listen(lambda channel, payload, key: runner.handle_job(payload)
                        if channel == JOBS_CHANNEL else runner.handle_control(payload))
            jobs.setServiceParent(self)
        SimulatorService(producer, runner).setServiceParent(self)

    def _live(self, event: Any) -> None:
        self.overload.arrived(event)
        if event.topic == TICKS:
            self.ticks(event)
            return
        if event.topic == UNIVERSE:
            self._universe_changed(event)
        if event.user is not None:
            self._job_live(event)  # a job's final event waits for its record
        else:
            self._deliver(event)

    def _deliver(self, event: Any) -> None:
        if self.broadcaster.deliver(event):
            self.metrics.delivered(event)
            if event.user is not None:
                self.history.delivered(event.user, event.id)

    def _universe_changed(self, event: Any) -> None:
        if event.channel in MEMBERSHIP_CHANNELS:
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
                "redelivered": self.router.redelivered,
                "store_failures": self.router.failed,
                "malformed": self.router.malformed_by_kind(),
                "probes": sum(self.router.probes.values()),
                "shed": dict(self.router.shed),
                "in_flight": self.router.in_flight,
                "job_events_dropped": dict(self.router.refused),
                "delivered": self.broadcaster.delivered,
                "unrouted_targeted": self.broadcaster.unrouted,
            },
            "handshakes_refused": {"origin": self.stream.refused_origins,
                                   "per_ip": self.stream.refused_per_ip},
            "http_refused": dict(self.site.refused),
            "slow_consumers_closed": self.gateway.slow_consumers_closed,
            "overload": {"behind": self.overload(), "late_events": self.overload.late,
                         "clients_backlogged": self.stream.backlogged,
                         "slow_consumers_closed": dict(self.gateway.slow_consumers)},
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
                "deadlettered": self.router.malformed,
                "probes": self.router.probes,
                "client_errors": self.gateway.errors, "catchups": self.gateway.catchups}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when producer messages can arrive (and, with Redis, be sent)."""
        components: dict[str, Any] = {"source": self.source.status(),
                                      "store": self.store.status()}
        ok = bool(self.source.ready) and bool(self.store.ready)
        if self.producer_rows is not None:
            # Not a condition of readiness: rows inserted meanwhile are read
            # once it listens again.
            components["producer_rows"] = self.producer_rows.status()
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
        from tickstock.deliver.gateway import CLOSE_GOING_AWAY

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


class CannotStart(Exception):
    """The daemon cannot start, for a reason its operator can fix; one line says which."""


_LISTEN_ERRORS = {
    errno.EADDRINUSE: ("address in use",
                       "another process listens there; stop it, or give another --listen"),
    errno.EACCES: ("permission denied",
                   "ports below 1024 need root or CAP_NET_BIND_SERVICE; or give another --listen"),
    errno.EADDRNOTAVAIL: ("address not available",
                          "the interface= address is not one of this machine's"),
}


class Listener(StreamServerEndpointService):
    """
    The web port, bound when twistd binds ports (before it drops privileges).
    A failure to bind is a L{CannotStart} naming the endpoint and the reason;
    once bound, C{listening} is called with the dashboard's URL.
    """

    _raiseSynchronously = True

    def __init__(self, reactor: Any, description: str, factory: IProtocolFactory,
                 listening: Callable[[str], None]) -> None:
        super().__init__(serverFromString(reactor, description), factory)
        self.description = description
        self._listening = listening

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            code = getattr(error.socketError, "errno", None)
            reason, hint = _LISTEN_ERRORS.get(code, (str(error.socketError), "check --listen"))
            raise CannotStart(f"cannot listen on {self.description} ({reason}): {hint}") from None
        except Exception as error:  # a TLS context that cannot be made, say
            raise CannotStart(f"cannot listen on {self.description}: {error}") from None
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self._listening(url_of(port.getHost(), isinstance(self.endpoint, SSL4ServerEndpoint)))
        return port


def url_of(address: Any, tls: bool) -> str:
    """
    Where a browser finds a port bound to C{address}: the host name when it
    is every interface.
    """
    if isinstance(address, UNIXAddress):
        name = address.name.decode() if isinstance(address.name, bytes) else address.name
        return f"unix:{name}"
    host = address.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif isinstance(address, IPv6Address):
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{address.port}/"


class StartOrExit(MultiService):
    """
    The root twistd starts: a start-up failure its operator can fix (a port
    in use, a TLS key it cannot use; see L{CannotStart}) ends the process
    with one line and exit status 1, where twistd would print a traceback.
    """

    _log = Logger()

    def __init__(self, service: Any, twistd: Any) -> None:
        super().__init__()
        self._twistd = twistd
        service.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (CannotStart, ConfigError) as error:  # ConfigError: --workers binds the port
            self._exit(str(error))

    def _exit(self, message: str) -> NoReturn:
        pipe = self._twistd.get("statusPipe")
        if pipe is None:
            # twistd sent sys.stderr to the log; the person who ran it reads this one.
            sys.__stderr__.write(f"tickstock: {message}\n")
            sys.__stderr__.flush()
        else:
            # Daemonized, stderr is /dev/null: twistd's parent, waiting on this
            # pipe, prints the line and exits 1 ("1 " marks an error).
            self._log.critical("tickstock: {message}", message=message)
            os.write(pipe, f"1 {message}".encode()[:100])
            os.close(pipe)
            self._twistd["statusPipe"] = None
        if self._twistd["pidfile"]:
            with suppress(OSError):
                os.unlink(self._twistd["pidfile"])
        raise SystemExit(1)


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

    from tickstock.ops.workers import WORKER_ENV, ParentWatch, WorkerPool

    settings = options.settings
    twistd = getattr(options, "parent", None)  # twistd's own options, when run by twistd
    json_logs = log_format(settings.log_format, twistd) == "json"
    service: MultiService
    if WORKER_ENV in os.environ:
        # Ctrl-C reaches the whole process group; the parent relays a stop
        # to its workers, and a second one would stop a stopped reactor.
        reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
        service = TickStock(settings, reactor, worker=int(os.environ[WORKER_ENV]))
        ParentWatch(reactor).setServiceParent(service)  # no worker outlives its parent
    elif settings.workers > 1:
        service = MultiService()
        # Workers log to the parent, which writes their JSON records as they are.
        args = [*options.raw_args, "--log-format", "json"] if json_logs else options.raw_args
        WorkerPool(reactor, settings.listen, settings.workers, args).setServiceParent(service)
    else:
        service = TickStock(settings, reactor)
    if twistd is not None:
        service = StartOrExit(service, twistd)
    if json_logs and twistd is not None and not twistd["syslog"]:
        return LogFormat(service, JSONLines(twistd_log_file(twistd)))
    return service
