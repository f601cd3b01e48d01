"""
The daemon's connections to Redis. txredisapi reconnects by itself
(C{factory.startConnecting}), but leaves holes (docs/internals.md §1, §2,
§5): it can give up reconnecting for good after a failed AUTH/SELECT, so
L{RedisConnection}, which every user of Redis holds, rebuilds a factory that
gave up; L{RedisLink} is the command connection (publishing jobs, dead
letters, the history's scripts), failing fast while Redis is down.
"""


from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hiredis
import orjson
import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from tickstock.connections.address import RedisAddress
from tickstock.connections.sentinel import client_endpoint
from tickstock.domain.interfaces import IComponent, IProducerLink
from tickstock.domain.topics import DEFAULT_REGISTRY

DEADLETTER_KEY = "tickstock:deadletter"
DEADLETTER_BYTES = 4096
"""How much of a refused message a dead letter keeps."""
RECONNECT_MAX_DELAY = 1.0
RECONNECT_INITIAL_DELAY = 0.1


class NotConnected(txredisapi.ConnectionError):  # type: ignore[misc]
    """Redis is not connected; raised at once instead of queueing."""


class RedisConnection:
    """
    One connection to Redis, held by whoever needs it (as Twisted's
    C{ClientService} holds an endpoint), rather than a base class to extend.
    txredisapi reconnects by itself, with the retry delays given here, but
    can stop trying for good (txredisapi issue #146: a failed AUTH/SELECT on
    reconnect): a factory that stopped without being asked to is rebuilt,
    checked every C{check_interval} seconds and counted in C{rebuilds}.

    @ivar state: C{"stopped"}, C{"connecting"} or C{"connected"}.
    """

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, address: RedisAddress,
        make_factory: Callable[[], txredisapi.RedisFactory], name: str = "redis",
        initial_delay: float = RECONNECT_INITIAL_DELAY, max_delay: float = RECONNECT_MAX_DELAY,
        check_interval: float = 1.0,
    ) -> None:
        """
        @param make_factory: a new txredisapi factory, not yet connecting;
            called again for every rebuild.
        @param name: how the logs call this connection.
        """
        self._clock = clock
        self._address = address
        self._make_factory = make_factory
        self._name = name
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self._check_interval = check_interval
        self._factory: txredisapi.RedisFactory | None = None
        self._watch = LoopingCall(self._check_factory)
        self._watch.clock = clock
        self.rebuilds = 0

    @property
    def state(self) -> str:
        if self._factory is None:
            return "stopped"
        return "connected" if self._factory.pool else "connecting"

    def start(self) -> None:
        self._start_factory()
        self._watch.start(self._check_interval, now=False)

    def stop(self) -> Deferred[Any]:
        """Stop reconnecting and disconnect; fires once disconnected."""
        if self._watch.running:
            self._watch.stop()
        factory, self._factory = self._factory, None
        return factory.disconnect() if factory else succeed(None)

    def connection(self) -> Any:
        """
        The live txredisapi connection (the first, when the factory pools
        several).

        @raise NotConnected: when there is none.
        """
        factory = self._factory
        if factory is None or not factory.pool:
            raise NotConnected(f"not connected to {self._address}")
        return factory.pool[0]

    def drop(self) -> None:
        """Close the connections cleanly; txredisapi makes new ones."""
        if self._factory is not None:
            for conn in list(self._factory.pool):
                conn.transport.loseConnection()

    def abort(self, conn: Any) -> None:
        """Abort C{conn} at once (a watchdog's verdict: Redis does not answer)."""
        if conn.transport is not None:
            conn.transport.abortConnection()

    def _start_factory(self) -> None:
        factory = self._factory = self._make_factory()
        # Redis is local or near: retry fast so events flow again within about
        # a second of Redis coming back, instead of txredisapi's 10 s cap.
        factory.initialDelay = self._initial_delay
        factory.maxDelay = self._max_delay
        factory.startConnecting(client_endpoint(self._clock, self._address))

    def _check_factory(self) -> None:
        if self._factory is not None and self._factory.stopped:
            self.rebuilds += 1
            self._log.warn(
                "{name}: client library stopped reconnecting to {address}; rebuilding it",
                name=self._name, address=str(self._address),
            )
            old = self._factory
            self._start_factory()
            old.disconnect()


class Encoding:
    """
    Commands encoded by hiredis (C) rather than txredisapi's per-argument
    Python, and replies passed on untouched when no decoding was asked for
    (txredisapi copies every list in a reply element by element even then):
    both are paid for every event.
    """

    charset: str | None
    convertNumbers: bool

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        command: bytes = hiredis.pack_command(args)
        return command

    def tryConvertData(self, data: Any) -> Any:
        if self.charset is None and not self.convertNumbers:
            return data
        return super().tryConvertData(data)  # type: ignore[misc]


class RedisProtocol(Encoding, txredisapi.RedisProtocol):  # type: ignore[misc]
    """txredisapi's protocol, with L{Encoding}."""


class LinkProtocol(RedisProtocol):
    """Loads the link's Lua scripts on every connection, before any command."""

    def connectionMade(self) -> Any:
        # Runs before the pool hands this connection out (a reactor turn
        # later), so no EVALSHA can overtake the loads.
        self.whenConnected().addCallback(self._preload)
        return super().connectionMade()

    def _preload(self, _: Any) -> None:
        for source in self.factory.scripts:
            self.execute_command("SCRIPT", "LOAD", source).addErrback(self._not_loaded)

    def _not_loaded(self, failure: Any) -> None:
        # e.g. LOADING while Redis reads its AOF: try again on a new connection.
        if self.transport is not None:
            self.transport.loseConnection()


@implementer(IProducerLink, IComponent)
class RedisLink(Service):
    """
    Commands to Redis: publishing backtest jobs, keeping dead letters.
    Fails fast while Redis is down rather than queueing without bound. One
    connection, so commands reach Redis in the order they were issued.
    """

    _log = Logger()

    def __init__(
        self, reactor: IReactorTime, address: RedisAddress, deadletter_max: int,
        reply_timeout: float = 5.0, streams: bool = False, stream_max: int = 100_000,
    ) -> None:
        self._reactor = reactor
        self._address = address
        self._redis = RedisConnection(reactor, address, self._new_factory, "redis link")
        self._streams = streams
        self._stream_max = stream_max
        self._deadletter_max = deadletter_max
        self._reply_timeout = reply_timeout
        self._scripts: list[str] = []
        self.dead_letters_lost = 0

    def preload(self, source: str) -> None:
        """
        Load this Lua script on every (re)connection before any other
        command, so EVALSHA never meets NOSCRIPT after a Redis restart (a
        fallback to EVAL could reorder commands in flight).
        """
        self._scripts.append(source)

    def _new_factory(self) -> txredisapi.RedisFactory:
        a = self._address
        factory = txredisapi.RedisFactory(
            None, a.db, poolsize=1, isLazy=True, password=a.password, username=a.username,
            replyTimeout=self._reply_timeout, convertNumbers=False,
        )
        factory.protocol = LinkProtocol
        factory.scripts = self._scripts
        return factory

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._redis.start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self._redis.stop()

    @property
    def connected(self) -> bool:
        return self._redis.state == "connected"

    @property
    def ready(self) -> bool:
        return self.connected

    def status(self) -> dict[str, Any]:
        return {"state": "connected" if self.connected else "connecting"}

    def drop(self) -> None:
        """Close the connection (it is remade, scripts loaded first)."""
        self._redis.drop()

    def execute(self, *args: Any) -> Deferred[Any]:
        """Run one Redis command, failing at once when not connected."""
        try:
            conn = self._redis.connection()
        except NotConnected:
            return fail()
        # Straight to the one connection: the handler's wrapper adds a
        # Deferred and a lookup per command.
        d: Deferred[Any] = conn.execute_command(*args)
        return d.addErrback(self._readonly, conn)

    def _readonly(self, failure: Any, conn: Any) -> Any:
        # Our master was demoted under a live connection: Sentinel is only
        # asked again on reconnect (docs/internals.md §7), so reconnect, once.
        if (failure.check(txredisapi.ResponseError) and "READONLY" in failure.getErrorMessage()
                and conn.transport is not None and not conn.transport.disconnecting):
            self._log.warn("redis link: {address} is read-only now; reconnecting",
                           address=str(self._address))
            self.drop()
        return failure

    def publish(self, channel: str, payload: bytes) -> Deferred[Any]:
        """
        PUBLISH; in streams mode XADD to the stream of that name (bounded,
        as a producer must bound its streams), and for TickStock's own
        channels (jobs) PUBLISH as well, as docs/contract.md §2 says.

        @return: fires with what PUBLISH answers, the number of subscribers
            it reached (0: nobody heard it; pub/sub keeps nothing); in
            streams mode the stream keeps it whatever that number is, and
            a message XADDed only fires with the entry's id.
        """
        if not self._streams:
            return self.execute("PUBLISH", channel, payload)
        d = self.execute("XADD", channel, "MAXLEN", "~", self._stream_max, "*", "data", payload)
        if DEFAULT_REGISTRY.by_redis_name(channel) is None:
            d.addCallback(lambda _: self.execute("PUBLISH", channel, payload))
        return d

    def dead_letter(self, channel: str, raw: bytes, reason: str) -> None:
        if self._deadletter_max == 0:
            return
        record = orjson.dumps({
            "channel": channel, "reason": reason, "at": self._reactor.seconds(),
            "raw": raw[:DEADLETTER_BYTES].decode("utf-8", "replace"),
        })
        d = self.execute("LPUSH", DEADLETTER_KEY, record)
        d.addCallback(lambda _: self.execute("LTRIM", DEADLETTER_KEY, 0, self._deadletter_max - 1))
        d.addErrback(self._dead_letter_lost)

    def _dead_letter_lost(self, failure: Any) -> None:
        self.dead_letters_lost += 1


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
