"""
Redis Sentinel: a client endpoint that asks the sentinels where the master
is on every connection attempt, then connects there.

txredisapi reconnects through its endpoint (C{factory.startConnecting}),
so asking on each attempt is what makes a client follow a failover: the
connection to the old master drops, the next attempt finds the new one. A
connection that stays up to a demoted master is not noticed here (see
docs/internals.md §7); L{tickstock.connections.redis.RedisLink} drops it on C{READONLY}.

Our own small endpoint rather than txredisapi's C{Sentinel}: that one is
tied to its own factory, and its timeouts run on the global reactor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    clientFromString,
    connectProtocol,
)
from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.connections.address import RedisAddress


class SentinelError(ConnectionError):
    """No sentinel named the master; the caller retries later."""


class _Query(Protocol):
    """Sends one command, fires C{reply} with the first reply, and hangs up."""

    transport: ITCPTransport | None

    def __init__(self, command: bytes) -> None:
        self._command = command
        self._reader = hiredis.Reader()
        self.reply: Deferred[Any] = Deferred(lambda _: self._abort())

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._command)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
            reply = self._reader.gets()
        except hiredis.ProtocolError as error:
            reply = Failure(error)
        if reply is False or self.reply.called:
            return
        if isinstance(reply, Failure):
            self.reply.errback(reply)
        else:
            self.reply.callback(reply)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.reply.called:
            self.reply.errback(reason)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Connects to the current master of C{master_name}, asking the sentinels
    in turn (the last one that answered first). C{timeout} bounds each
    sentinel's connect and reply, and the connect to the master. When no
    sentinel answers, the connect fails: the caller's backoff retries it.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorTime, sentinels: Sequence[tuple[str, int]],
                 master_name: str, timeout: float = 1.0) -> None:
        if not sentinels:
            raise ValueError("no sentinels given")
        self._reactor = reactor
        self._sentinels = list(sentinels)
        self._name = master_name
        self._timeout = timeout
        # hiredis's stub types the command as a 1-tuple.
        self._command: bytes = hiredis.pack_command(
            ("SENTINEL", "get-master-addr-by-name", master_name))  # type: ignore[arg-type]
        self.master: tuple[str, int] | None = None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> Any:
        host, port = await self.discover()
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        return await endpoint.connect(factory)

    async def discover(self) -> tuple[str, int]:
        """The master's address as the first sentinel that knows it says."""
        errors = []
        for sentinel in list(self._sentinels):
            try:
                address = await self._ask(*sentinel)
            except CancelledError:
                raise
            except Exception as error:
                errors.append(f"{sentinel[0]}:{sentinel[1]}: {error}")
                continue
            self._sentinels.remove(sentinel)
            self._sentinels.insert(0, sentinel)
            self._found(address)
            return address
        raise SentinelError(f"no sentinel knows master {self._name!r} ({'; '.join(errors)})")

    async def _ask(self, host: str, port: int) -> tuple[str, int]:
        query = _Query(self._command)
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        d = connectProtocol(endpoint, query).addCallback(lambda _: query.reply)
        reply = await d.addTimeout(self._timeout, self._reactor)
        if isinstance(reply, hiredis.ReplyError):
            raise SentinelError(str(reply))
        if not isinstance(reply, list) or len(reply) != 2:
            raise SentinelError(f"does not know master {self._name!r}")
        return reply[0].decode(), int(reply[1])

    def _found(self, address: tuple[str, int]) -> None:
        old, self.master = self.master, address
        if old is None:
            self._log.info("redis sentinel: master {name} is at {host}:{port}",
                           name=self._name, host=address[0], port=address[1])
        elif old != address:
            self._log.warn(
                "redis sentinel: master {name} moved from {old_host}:{old_port} to {host}:{port}",
                name=self._name, old_host=old[0], old_port=old[1],
                host=address[0], port=address[1],
            )


def client_endpoint(reactor: IReactorTime, address: RedisAddress,
                    timeout: float = 1.0) -> IStreamClientEndpoint:
    """The endpoint for C{address}: fixed, or through its sentinels."""
    if address.sentinels:
        assert address.master is not None
        return SentinelEndpoint(reactor, address.sentinels, address.master, timeout)
    endpoint: IStreamClientEndpoint = clientFromString(reactor, address.endpoint())
    return endpoint
