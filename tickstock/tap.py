"""
C{twistd tickstock}: command-line options and the service tree. The only
module that picks concrete classes (embedded bus or Redis, memory store).
"""

from __future__ import annotations

import errno
import gc
import os
import re
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError, VerifyError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorFDSet,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from tickstock.config import OPTIONS, ConfigError, Settings, check_settings, describe
from tickstock.domain.interfaces import (
    ICache,
    IClaims,
    IComponent,
    ICurrentValues,
    IEventSource,
    IHistory,
    IProducerLink,
    ISessionRecords,
)
from tickstock.domain.topics import CANCEL_CHANNEL, CONTROL_CHANNEL, JOBS_CHANNEL
from tickstock.ops.canary import canary_channel
from tickstock.ops.logs import JSONLines, LogFormat, log_format, twistd_log_file

if TYPE_CHECKING:
    from tickstock.deliver.overload import Overload
    from tickstock.sim.producer import JobRunner
    from tickstock.store.listen import ProducerRowListener
    from tickstock.store.memory import MemoryStore
    from tickstock.store.persist import Persister
    from tickstock.store.postgres import PostgresStore
    from tickstock.web.socketio.engine import EngineServer


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
        super().parseOptions(options)  # type: ignore[no-untyped-call]

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


class IReactor(IReactorCore, IReactorTime, IReactorFDSet):
    """What the daemon's parts use of the reactor."""


@dataclass
class Parts:
    """
    What differs between the embedded bus and Redis, chosen once
    (L{_embedded_parts}, L{_redis_parts}): the rest of the wiring is the same.

    @ivar claims: which of several daemons counts a live tick; L{None}: only one.
    @ivar behind: whether the source is behind the producer (the router sheds).
    @ivar first: services started before the store (the links to Redis).
    @ivar readers: services started after the store, so stopped before it:
        what they still hand over at shutdown is flushed to the store.
    @ivar components: what C{/ready} lists after the source and the store.
    @ivar on_gap: registers a listener of gaps in the history's tail; L{None}:
        the history has none.
    @ivar attach: tells the source whether the daemon is behind its clients,
        and what makes what it read durable.
    @ivar canary_send: how the freshness canary is sent; L{None}: no canary.
    @ivar hear_jobs: makes the demo simulator hear jobs and control messages;
        returns the service that listens, if there is one.
    @ivar current: the current values shared by the nodes (started among
        C{first}); L{None}: this process is the only one.
    """

    source: IEventSource
    link: IProducerLink
    history: IHistory
    claims: IClaims | None
    cache: ICache
    hear_jobs: Callable[[JobRunner], IService | None]
    behind: Callable[[], bool] = lambda: False
    first: Sequence[IService] = ()
    readers: Sequence[IService] = ()
    components: Mapping[str, IComponent] = field(default_factory=dict)
    on_gap: Callable[[Callable[[str], None]], None] | None = None
    attach: Callable[[Overload, Persister], None] = lambda overload, persister: None
    canary_send: Callable[[str, bytes], Deferred[Any]] | None = None
    sessions: ISessionRecords | None = None
    current: ICurrentValues | None = None


def _socket_limits(settings: Settings) -> dict[str, Any]:
    """The limits of a WebSocket endpoint (C{/ws}, and Socket.IO's WebSocket transport)."""
    return {"allowed_origins": settings.allowed_origins,
            "max_message_size": settings.max_message_size,
            "queue_limit": settings.client_queue_limit,
            "ping_interval": settings.ws_ping_interval,
            "ping_timeout": settings.ws_ping_timeout,
            "handshake_timeout": settings.handshake_timeout,
            "max_per_ip": settings.max_connections_per_ip}


def _embedded_parts(settings: Settings, reactor: IReactor) -> Parts:
    """One process: the embedded bus is the source and the link, history in memory."""
    from tickstock.history.memory import MemoryHistory
    from tickstock.history.sessions import MemorySessionRecords
    from tickstock.ingest.memory import MemoryBus
    from tickstock.store.cache import MemoryCache

    bus = MemoryBus(settings.deadletter_max, settings.channels)

    def hear_jobs(runner: JobRunner) -> None:
        bus.on(JOBS_CHANNEL, runner.handle_job)
        bus.on(CANCEL_CHANNEL, runner.handle_control)
        bus.on(CONTROL_CHANNEL, runner.handle_control)

    history = MemoryHistory(
        reactor, settings.history_max, settings.history_max_age,
        settings.history_user_max, dedupe_window=settings.dedupe_window,
    )
    return Parts(source=bus, link=bus, history=history, claims=None,
                 cache=MemoryCache(reactor), hear_jobs=hear_jobs,
                 sessions=MemorySessionRecords(reactor))


def _redis_parts(settings: Settings, reactor: IReactor, worker: int | None) -> Parts:
    """Redis: the producer's channels or streams, a shared history, a shared cache."""
    from tickstock.connections.redis import RedisLink
    from tickstock.deliver.latest import MAX_KEYS
    from tickstock.history.redis import RedisHistory
    from tickstock.history.redis.current import CurrentValues
    from tickstock.history.redis.sessions import RedisSessionRecords
    from tickstock.ingest.pubsub import RedisPubSubSource
    from tickstock.ingest.streams import RedisStreamSource
    from tickstock.store.cache import RedisCache

    redis, registry = settings.redis, settings.channels
    assert redis is not None
    streams = settings.mode == "streams"
    behind: Callable[[], bool] = lambda: False  # noqa: E731
    link = RedisLink(reactor, redis, settings.deadletter_max, streams=streams)
    node = node_id(settings, worker)
    canary = (canary_channel(node),) if settings.canary_interval else ()
    source: RedisStreamSource | RedisPubSubSource
    if streams:
        source = entries = RedisStreamSource(reactor, redis, node, extra_streams=canary,
                                             streams=registry.names)

        def attach(overload: Overload, persister: Persister) -> None:
            entries.behind = overload
            # An entry is acknowledged once what it became is durable.
            entries.durability = persister

        def send(channel: str, payload: bytes) -> Deferred[Any]:
            return link.execute("XADD", channel, "MAXLEN", "~", CANARY_STREAM_MAX,
                                "*", "data", payload)
    else:
        source = messages = RedisPubSubSource(
            reactor, redis, settings.redis_ping_interval, settings.redis_ping_timeout,
            channels=(*registry.names, *canary), ask=link.execute, patterns=registry.patterns,
            same=lambda name: getattr(registry.by_redis_name(name), "name", name),
        )
        behind = lambda: messages.behind  # noqa: E731

        def attach(overload: Overload, persister: Persister) -> None:
            messages.daemon_behind = overload

        def send(channel: str, payload: bytes) -> Deferred[Any]:
            return link.execute("PUBLISH", channel, payload)

    def hear_jobs(runner: JobRunner) -> IService:
        jobs = RedisPubSubSource(reactor, redis, channels=[JOBS_CHANNEL, CANCEL_CHANNEL,
                                                           CONTROL_CHANNEL])
        jobs.listen(lambda channel, payload, key: runner.handle_job(payload)
                    if channel == JOBS_CHANNEL else runner.handle_control(payload))
        return jobs

    history = RedisHistory(
        reactor, redis, link, settings.history_max, settings.history_max_age,
        settings.history_user_max, store_window=settings.store_window,
        dedupe_window=settings.dedupe_window,
    )
    current = CurrentValues(reactor, link, MAX_KEYS)
    return Parts(
        source=source, link=link, history=history, claims=history,
        cache=RedisCache(link, reactor), hear_jobs=hear_jobs,
        behind=behind,
        first=(link, history, current), readers=(source,),
        components={"link": link, "history": history, "current": current},
        current=current,
        on_gap=history.on_gap, attach=attach,
        canary_send=send if settings.canary_interval else None,
        sessions=RedisSessionRecords(link),
    )


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

        def stop(_: object, service: IService) -> object:
            return service.stopService()

        def failed(failure: Failure, service: IService) -> None:
            self._log.failure("stopping {service!r} failed", failure, service=service)

        d: Deferred[object] = succeed(None)
        for service in reversed(list(self)):
            d.addCallback(stop, service).addErrback(failed, service)
        return d.addCallback(lambda _: None)

    def __init__(self, settings: Settings, reactor: IReactor,
                 worker: int | None = None) -> None:
        """
        @param worker: this process's index when it is one of C{--workers}:
            it then serves the listening socket its parent handed it.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        from autobahn.twisted.resource import WebSocketResource

        from tickstock.deliver.auth import Authenticate, JWTAuthenticator, anonymous
        from tickstock.deliver.broadcast import Broadcaster
        from tickstock.deliver.gateway import Gateway
        from tickstock.deliver.latest import Latest
        from tickstock.deliver.live import HandOff, LiveDelivery
        from tickstock.deliver.overload import Overload
        from tickstock.deliver.ratelimit import RateLimit
        from tickstock.deliver.throttle import TickThrottle
        from tickstock.deliver.universes import Universes
        from tickstock.ingest.router import Router
        from tickstock.jobs.backtests import Jobs
        from tickstock.ops.health import Health
        from tickstock.ops.metrics import Metrics, MetricsResource
        from tickstock.web.api import build_api
        from tickstock.web.site import JSONStatus, build_site
        from tickstock.web.websocket import StreamFactory

        self.settings = settings
        self.worker = worker
        started_at = reactor.seconds()
        registry = self.registry = settings.channels
        parts = (_embedded_parts(settings, reactor) if settings.redis is None
                 else _redis_parts(settings, reactor, worker))
        self.source, self.link, self.history = parts.source, parts.link, parts.history
        self.cache = parts.cache
        for service in parts.first:
            self._run(service)
        self._add_store(reactor, settings, worker)
        for service in parts.readers:
            self._run(service)

        self.stream = StreamFactory(**_socket_limits(settings))
        # Whether the daemon is behind: ticks are shed first, a Redis source reads less.
        self.overload = Overload(reactor, self.stream.clients_behind, settings.history_max // 2)
        parts.attach(self.overload, self.persister)
        self.broadcaster = Broadcaster(self.stream.prepareMessage)
        self.latest = Latest()
        if parts.current is not None:
            parts.current.latest = self.latest
        self.ticks = TickThrottle(reactor, settings.tick_rate, self.broadcaster.deliver,
                                  partial(self.broadcaster.watched, "ticks"), self.overload,
                                  keep=self.latest.keep)
        self.universes = Universes(self.store, self.broadcaster)
        self.jwks = None
        if settings.jwt_jwks_url is not None:
            from tickstock.connections.jwks import JWKS

            self.jwks = JWKS(reactor, settings.jwt_jwks_url, settings.jwt_jwks_refresh)
            self._run(self.jwks)
        authenticate: Authenticate = anonymous
        if settings.jwt_secret is not None or self.jwks is not None:
            authenticate = JWTAuthenticator(
                settings.jwt_secret, audience=settings.jwt_audience, issuer=settings.jwt_issuer,
                keys=self.jwks, leeway=settings.jwt_leeway,
                permissions_claim=settings.jwt_permissions_claim)
        self.live_ticks = None
        if settings.mode != "streams":
            from tickstock.deliver.ticks import LiveTicks

            self.live_ticks = LiveTicks(reactor, self.history, self.ticks, parts.claims)
        self.router = Router(reactor, self.history, self.link,
                             stored=HandOff(self.overload, self.persister, registry),
                             behind=parts.behind, ticks=self.live_ticks, registry=registry)
        # TickStock's own job events (a cancel, a timeout) are never shed.
        self.jobs = Jobs(reactor, self.store, self.history, self.link,
                         self._receive_own,
                         settings.jobs_per_user, settings.job_timeout, settings.job_patterns,
                         unheard_is_lost=settings.mode != "streams")
        self._run(self.jobs)
        self.gateway = Gateway(
            reactor, self.broadcaster, self.history, authenticate,
            settings.max_subscriptions, settings.hello_timeout,
            universes=self.universes, store=self.store, catchup_max=settings.catchup_max,
            jobs=self.jobs, rate=RateLimit(reactor, settings.client_rate, settings.client_burst),
            max_per_user=settings.max_connections_per_user, ticks=self.live_ticks,
            latest=self.latest,
        )
        self.stream.gateway = self.gateway
        self.socketio = self._socketio(settings, parts)
        self.metrics = Metrics(reactor, self.health, self.readiness, self._metrics_extra)
        self.canary = None
        if parts.canary_send is not None:
            from tickstock.ops.canary import Canary

            self.canary = Canary(reactor, parts.canary_send,
                                 canary_channel(node_id(settings, worker)),
                                 settings.canary_interval)
            self._run(self.canary)
            self.canary.round_trip = self.metrics.canary_round_trip
        self.source.listen(self.canary.intercept(self.router.receive) if self.canary
                           else self.router.receive)
        live = self.live = LiveDelivery(
            self.overload, self.ticks, self.broadcaster, self.universes, self.cache,
            self.history, partial(self.jobs.record_first, self.store), self.metrics.delivered,
            self.gateway.missed_live, self.keep_universe, keep=self.latest.keep)
        self.history.listen(live)
        if parts.on_gap is not None:
            parts.on_gap(live.gap)

        if settings.demo or settings.redis is None:
            self._add_simulator(reactor, settings, parts)

        self._run(self.metrics)
        self.api = build_api(self.store, self.cache, authenticate, settings.api_cache_ttl,
                             clock=reactor, timeout=settings.postgres_timeout, jobs=self.jobs,
                             observe=self.metrics.api_request,
                             rate=RateLimit(reactor, settings.api_rate, settings.api_burst),
                             cors_origins=settings.cors_origins)
        self.site = site = build_site(
            WebSocketResource(self.stream),  # type: ignore[no-untyped-call]
            JSONStatus(self.health), JSONStatus(self.readiness),
            timeout=settings.handshake_timeout, api=self.api,
            metrics=MetricsResource(self.metrics), socketio=self.socketio,
            body_max=max(settings.max_message_size, 64 * 1024),
        )
        components: dict[str, IComponent] = {"source": self.source, "store": self.store}
        if self.producer_rows is not None:
            components["producer_rows"] = self.producer_rows
        components.update(parts.components)
        if self.canary is not None:
            components["canary"] = self.canary
        if self.jwks is not None:
            components["jwks"] = self.jwks
        self.report = Health(
            reactor, started_at, authenticate is not anonymous, worker, settings.mode,
            components, self.router, self.broadcaster, self.stream, site, self.gateway,
            self.overload, self.ticks, self.universes, self.persister, self.jobs, self.api,
            self.socketio)
        # Stopped in reverse: the port closes first, then clients are told to go.
        self._run(ClientDrain(self.gateway, reactor, SHUTDOWN_GRACE))
        if worker is not None:
            from tickstock.ops.workers import LISTEN_FD, AdoptedPort

            self._run(AdoptedPort(reactor, LISTEN_FD, site))
        else:
            self._run(Listener(reactor, settings.listen, site, self._listening))

    def _socketio(self, settings: Settings, parts: Parts) -> EngineServer:
        """C{/socket.io/}: Socket.IO sessions, clients of the same gateway as C{/ws}."""
        from tickstock.history.sessions import MemorySessionRecords
        from tickstock.web.socketio.engine import EngineServer, EngineWebSocketFactory
        from tickstock.web.socketio.session import SocketIOSession

        factory = EngineWebSocketFactory(**_socket_limits(settings))
        factory.per_ip = self.stream.per_ip  # one cap per address for both endpoints
        factory.gateway = gateway = self.gateway
        records = parts.sessions or MemorySessionRecords(factory.reactor)
        return EngineServer(
            factory, lambda server, address: SocketIOSession(server, address, gateway, records),
            ping_interval=settings.ws_ping_interval or 25.0,
            ping_timeout=settings.ws_ping_timeout, max_payload=settings.max_message_size,
            records=records)

    def _run(self, service: IService) -> None:
        """Runs C{service} with the daemon: started after the parts added before, stopped before."""
        service.setServiceParent(self)

    def _receive_own(self, channel: str, raw: bytes) -> Deferred[Any]:
        """
        A message of TickStock's own (a job's cancel or timeout) or one a
        producer wrote to PostgreSQL: routed like the producer's, never shed.
        """
        handled = self.router.receive(channel, raw, sheddable=False)
        # Only a live tick is handled without a Deferred; these are not ticks.
        return succeed(None) if handled is None else handled

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness, with the counters an operator looks at first (L{Health.health})."""
        return self.report.health()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when producer messages can arrive (and, with Redis, be sent)."""
        return self.report.readiness()

    def _metrics_extra(self) -> dict[str, Any]:
        return self.report.extra()

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
            auth=self._auth_kinds())

    def _auth_kinds(self) -> str:
        kinds = (["HS256"] if self.settings.jwt_secret is not None else []) + (
            ["JWKS"] if self.jwks is not None else [])
        return f"auth on ({' + '.join(kinds)})" if kinds else "auth off"

    def _add_store(self, reactor: IReactor, settings: Settings, worker: int | None) -> None:
        """The system of record, and the persister that batches writes to it."""
        from tickstock.store.persist import Persister

        self.producer_rows: ProducerRowListener | None = None
        self.keep_universe: Callable[[str, list[Any]], None] | None = None
        self.store: PostgresStore | MemoryStore
        if settings.postgres:
            from tickstock.store.listen import ProducerRowListener
            from tickstock.store.postgres import PostgresStore

            self.store = PostgresStore(reactor, settings.postgres, settings.postgres_readonly,
                                       settings.postgres_timeout)
            self._run(self.store)
            # Rows a producer inserts into events itself, delivered like its
            # messages. The writer: a standby neither LISTENs nor notifies.
            self.producer_rows = ProducerRowListener(
                reactor, reactor, settings.postgres, settings.postgres_timeout,
                self._receive_own)
            self._run(self.producer_rows)
        else:
            from tickstock.sim.producer import UNIVERSES, default_symbols
            from tickstock.store.memory import MemoryStore

            # The demo's universes: no producer writes cache_entries here.
            symbols = default_symbols(max(settings.sim_symbols, 10))
            # As many events as the history keeps: every one is a Python
            # object the garbage collector walks, on the delivery thread.
            store = self.store = MemoryStore(reactor, max_events=settings.history_max, universes={
                key: {"type": _demo_universe_type(key),
                      "symbols": symbols[n::len(UNIVERSES)] or symbols[:1]}
                for n, key in enumerate(UNIVERSES)
            })

            def keep_universe(key: str, symbols: list[Any]) -> None:
                # The event's own symbol list is the universe.
                store.set_universe(key, _demo_universe_type(key), symbols)

            self.keep_universe = keep_universe
        node = node_id(settings, worker)
        spool = settings.spool_dir or os.path.join(tempfile.gettempdir(), "tickstock-spool")
        self.persister = Persister(
            reactor, self.store, f"{node}:{int(reactor.seconds() * 1000)}",
            settings.flush_interval, settings.pending_max,
            os.path.join(spool, re.sub(r"[^A-Za-z0-9_.-]", "_", node)),
            sealing=settings.mode == "streams",
        )
        self._run(self.persister)

    def _add_simulator(self, reactor: IReactor, settings: Settings, parts: Parts) -> None:
        from tickstock.sim.producer import OutageQuietPublish, simulated_producer

        runner, producer = simulated_producer(
            reactor, OutageQuietPublish(self.link.publish), rate=settings.sim_rate,
            symbols=settings.sim_symbols, upstream=settings.sim_dialect == "upstream",
            per_symbol_ticks=settings.redis is not None and settings.mode == "pubsub")
        listener = parts.hear_jobs(runner)
        if listener is not None:
            self._run(listener)
        self._run(SimulatorService(producer, runner))


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
        super().stopService()  # type: ignore[no-untyped-call]
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


_LISTEN_ERRORS: dict[int | None, tuple[str, str]] = {
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
        super().__init__(  # type: ignore[no-untyped-call]
            serverFromString(reactor, description), factory)
        self.description = description
        self._listening = listening

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as error:
            code = getattr(error.socketError, "errno", None)
            reason, hint = _LISTEN_ERRORS.get(code, (str(error.socketError), "check --listen"))
            raise CannotStart(f"cannot listen on {self.description} ({reason}): {hint}") from None
        except Exception as error:  # a TLS context that cannot be made, say
            raise CannotStart(f"cannot listen on {self.description}: {error}") from None
        assert self._waitingForPort is not None  # set by the listening above
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
        super().__init__()  # type: ignore[no-untyped-call]
        self._twistd = twistd
        service.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except (CannotStart, ConfigError) as error:  # ConfigError: --workers binds the port
            self._exit(str(error))

    def _exit(self, message: str) -> NoReturn:
        pipe = self._twistd.get("statusPipe")
        if pipe is None:
            # twistd sent sys.stderr to the log; the person who ran it reads this one.
            if sys.__stderr__ is not None:  # None only without any console
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
        super().startService()  # type: ignore[no-untyped-call]
        if self._producer is not None:
            self._producer.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
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
    # The global reactor provides every interface the daemon's parts use.
    parts_reactor = cast(IReactor, reactor)
    twistd = getattr(options, "parent", None)  # twistd's own options, when run by twistd
    json_logs = log_format(settings.log_format, twistd) == "json"
    service: MultiService
    if WORKER_ENV in os.environ:
        # Ctrl-C reaches the whole process group; the parent relays a stop
        # to its workers, and a second one would stop a stopped reactor.
        reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
        service = TickStock(settings, parts_reactor, worker=int(os.environ[WORKER_ENV]))
        watch: IService = ParentWatch(reactor)  # no worker outlives its parent
        watch.setServiceParent(service)
    elif settings.workers > 1:
        service = MultiService()
        # Workers log to the parent, which writes their JSON records as they are.
        args = [*options.raw_args, "--log-format", "json"] if json_logs else options.raw_args
        pool: IService = WorkerPool(reactor, settings.listen, settings.workers, args)
        pool.setServiceParent(service)
    else:
        service = TickStock(settings, parts_reactor)
    if twistd is not None:
        service = StartOrExit(service, twistd)
    if json_logs and twistd is not None and not twistd["syslog"]:
        return LogFormat(service, JSONLines(twistd_log_file(twistd)))
    return service
