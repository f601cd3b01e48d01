"""
The WebSocket endpoint at C{/ws}: a thin Autobahn protocol that hands text
messages to the L{Gateway} and event frames to the socket.

Backpressure: each connection registers itself as the transport's push
producer (replacing the HTTP channel Autobahn leaves there), so Twisted tells
it when the socket's buffer is full. While paused, event frames wait in one
queue, in event-id order, by delivery class (L{tickstock.domain.events.Channel}):

 - must-deliver frames are all kept, never silently skipped;
 - a latest-only frame (tick, job progress, health) replaces the queued
   frame with the same conflation key, so a slow reader gets the newest per
   key.

Past C{queue_limit} must-deliver frames (or latest-only keys) waiting, a
client is closed with 4001 ("reconnect and resume") only if it is itself the
reason: its socket took no byte for C{stall_timeout} seconds (it stopped
reading), or it stayed past the bound for C{slow_for} seconds (it reads
slower than its events come). A queue that is long because the daemon is
busy (its writes go out late, or come in bursts) drains as the client reads,
and the client stays: an overloaded daemon does not close its clients at
once, it takes in less (L{tickstock.deliver.overload}). So one reader that stopped
cannot grow the server's memory without bound or delay everyone else, and a
merely slow one keeps up on latest-only topics.

Progress is the bytes Twisted holds for the socket going down, or the
transport resuming us (its buffer drained): checked when a frame is queued
past the bound, and every L{SWEEP} seconds for paused clients.

The hot path (a client that keeps up) writes each event frame straight to
the socket when nothing is buffered for it: Twisted's C{write} would instead
buffer it, register the socket with epoll, write it on the next reactor turn
and unregister it again, which is most of the cost of fanning one event out
to a thousand clients. Only what the kernel does not take goes through
Twisted's buffer (and so its backpressure).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, cast

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import tcp
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.deliver.gateway import Gateway
from tickstock.domain.events import Event
from tickstock.domain.interfaces import REPLAYED, IClient, IReporting
from tickstock.web.origins import normalize_origin
from tickstock.web.site import REFUSED_STATUS

CLOSE_HANDSHAKE_TIMEOUT = 1.0
SWEEP = 0.5
"""Seconds between checks of the paused clients: stalled ones are closed,
and whether most clients are backlogged is counted again."""
BACKLOGGED_AFTER = 1.0
"""Seconds frames must have waited for a reading client for it to count as
backlogged: a burst of fan-out makes many wait for a few milliseconds."""
SLOW_FOR = 60.0
"""Seconds a client that reads may stay past the queue bound: one that does
not get below it in that time reads slower than its events come."""
_OPEN = WebSocketProtocol.STATE_OPEN
_HANDSHAKE_LEFTOVERS = (
    "http_headers", "http_request_data", "http_response_data", "http_status_line",
    "http_request_params", "http_request_uri", "http_request_path", "websocket_protocols",
    "websocket_extensions",
)


class _SendQueue(list[Any]):
    """Autobahn's send queue, as small as a list (an empty deque takes 624 bytes)."""

    def popleft(self) -> Any:
        return self.pop(0)


def _unsent(transport: Any) -> int | None:
    """Bytes Twisted holds for the socket (L{None}: not a transport we can read that of)."""
    try:
        return int(len(transport.dataBuffer) - transport.offset + transport._tempDataLen)
    except (AttributeError, TypeError):
        return None


@implementer(IClient, IPushProducer)
class ClientProtocol(WebSocketServerProtocol):
    """One browser (or other WebSocket client)."""

    _log = Logger()
    factory: StreamFactory
    dialect = None

    def __init__(self) -> None:
        super().__init__()
        self.user: str | None = None
        self._paused = False
        self._closing = False
        # Frames waiting while paused, in the order they must go out. Keys:
        # an int from _seq for a must-deliver frame, the conflation key (a
        # tuple) for a latest-only one. An OrderedDict, not a dict: taking
        # from the front of a plain dict is quadratic (deleted slots stay at
        # the front until a resize; 1.4 s to drain 100k here), popitem(last=
        # False) is O(1).
        self._queue: OrderedDict[Any, Any] = OrderedDict()
        self._seq = 0
        self._must = 0  # must-deliver frames in _queue
        self._direct: tcp.Connection | None = None  # the transport, if frames can go to its socket
        self._address: str | None = None  # counted against the per-IP cap
        self._waiting_since: float | None = None  # when _queue last became non-empty
        self._progress_at = 0.0  # when its socket last took bytes while paused
        self._unsent: int | None = None  # bytes Twisted held for it then
        self._over_since: float | None = None  # past the queue bound since

    def onConnect(self, request: Any) -> None:
        self.check_origin(request)
        factory = self.factory
        assert self.transport is not None  # the handshake came in on it
        address = getattr(self.transport.getPeer(), "host", None)
        if factory.max_per_ip and address is not None:
            if factory.per_ip[address] >= factory.max_per_ip:
                factory.refused_per_ip += 1
                raise ConnectionDeny(REFUSED_STATUS["per_ip"],  # type: ignore[no-untyped-call]
                                     "too many connections from this address")
            factory.per_ip[address] += 1
            self._address = address

    def check_origin(self, request: Any) -> None:
        """Refuse the handshake (403, counted) unless its origin is allowed."""
        factory = self.factory
        if not factory.origin_allowed(request.origin, request.headers.get("host")):
            factory.refused_origins += 1
            raise ConnectionDeny(REFUSED_STATUS["origin"], "origin not allowed")  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.unpaused(self)
        address, self._address = self._address, None
        if address is not None:
            per_ip = self.factory.per_ip
            per_ip[address] -= 1
            if per_ip[address] <= 0:
                del per_ip[address]
        super().connectionLost(reason)

    def onOpen(self) -> None:
        try:
            self.take_producer()
            self.slim()
            self.factory.gateway.opened(self)
        except Exception:
            self._log.failure("opening a connection failed")
            self.dropConnection(abort=True)

    def slim(self) -> None:
        """
        Drop what Autobahn keeps per connection and does not use again
        (docs/internals.md §14): what it kept of the opening handshake (the
        request's bytes, headers and parameters, the response), and its
        send queue's deque, which only chopped or synchronous sends use and
        TickStock makes none; a list stands in. About 2 KB of every idle
        connection's memory.
        """
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)
        if not self.send_queue:
            self.send_queue = _SendQueue()  # type: ignore[assignment]

    def take_producer(self) -> None:
        """
        Become the transport's push producer: twisted.web left its HTTP
        channel there, and pause/resume must reach this connection. TCP and
        TLS transports are consumers, though TLS's does not declare it.
        """
        transport = cast(IConsumer, self.transport)
        transport.unregisterProducer()
        transport.registerProducer(self, True)
        if isinstance(transport, tcp.Connection) and not transport.TLS:
            self._direct = transport

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.reply({"op": "error", "id": None, "code": "bad_request",
                        "message": "binary frames are not accepted; send JSON text"})
            return
        self.factory.gateway.receive(self, payload)

    def onAutoPingTimeout(self) -> None:
        self.factory.gateway.heartbeat_timeouts += 1
        super().onAutoPingTimeout()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._closing = True
        self._drop_queue()
        self.factory.unpaused(self)
        self.factory.gateway.closed(self)

    # IClient

    def frame(self, event: Event, sub_id: str) -> bytes:
        return event.frame(sub_id)

    def send(self, prepared: Any, key: Any = None) -> None:
        # The hot path (every delivery): reading client, nothing queued.
        if self._closing or self.state != _OPEN:
            return
        if self._paused or self._queue:
            self._enqueue(prepared, key)
            return
        self._write(prepared.payloadHybi)

    def _write(self, data: bytes) -> None:
        """
        Write a frame (compression is off, so a prepared frame is final):
        straight to the socket if Twisted holds nothing for it, else, or for
        what the kernel did not take, through the transport. A socket error
        is left for the transport to find and report as it always does.
        """
        direct = self._direct
        if direct is not None and not direct.dataBuffer and not direct._tempDataLen:
            try:
                sent = direct.socket.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport = self.transport
        assert transport is not None  # frames are sent only while open
        transport.write(data)

    def _enqueue(self, prepared: Any, key: Any) -> None:
        queue = self._queue
        limit = self.factory.queue_limit
        if not queue:
            self._waiting_since = self.factory.reactor.seconds()
        if key is None:
            self._seq += 1
            queue[self._seq] = prepared
            self._must += 1
            if self._must > limit:
                self._past_bound()
        elif key is REPLAYED:
            # Bounded by the history, not by queue_limit: negative keys are
            # not counted in _must.
            self._seq += 1
            queue[-self._seq] = prepared
        elif key in queue:
            # Newest wins, and moves to the end: the queue stays in event-id
            # order, which a client resuming from its last seen id relies on.
            del queue[key]
            queue[key] = prepared
            self.factory.conflated += 1
        else:
            queue[key] = prepared
            if len(queue) - self._must > limit:
                self._past_bound()

    def _past_bound(self) -> None:
        """
        More is waiting than C{queue_limit}: close the client if it is the
        reason (see the module's docstring), else keep every frame.
        """
        now = self.factory.reactor.seconds()
        if self._over_since is None:
            self._over_since = now
        self.check(now)

    def check(self, now: float) -> None:
        """Close the client if it is past the bound and stalled, or past it for too long."""
        factory = self.factory
        if self._over_since is None or self._closing:
            return
        if self._stalled(now):
            self._overflow("stopped reading")
        elif now - self._over_since >= factory.slow_for:
            self._overflow("reads slower than its events come")

    def _stalled(self, now: float) -> bool:
        """Whether it is paused and its socket took no byte for C{stall_timeout} seconds."""
        if not self._paused:
            return False
        unsent = _unsent(self.transport)
        if unsent is not None and self._unsent is not None and unsent < self._unsent:
            self._progress_at = now
        self._unsent = unsent
        return now - self._progress_at >= self.factory.stall_timeout

    def backlogged(self, now: float) -> bool:
        """Whether frames have waited for it for a while though it reads."""
        since = self._waiting_since
        return since is not None and now - since >= BACKLOGGED_AFTER and not self._stalled(now)

    def _overflow(self, why: str) -> None:
        queued = len(self._queue)
        self._drop_queue()
        self.factory.gateway.slow_consumer(self, queued, why)

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._must = 0
        self._over_since = self._waiting_since = None

    def reply(self, message: dict[str, Any]) -> None:
        if not self._closing:
            self.sendMessage(orjson.dumps(message))  # type: ignore[no-untyped-call]

    def close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            # sendClose() only takes 1000 and 3000-4999; 1008 needs the frame
            # call Autobahn uses for its own protocol closes. Reasons: 123 bytes.
            self.sendCloseFrame(code, reason.encode()[:123], isReply=False)

    # IPushProducer

    def pauseProducing(self) -> None:
        # Twisted pauses a producer that was not paused: until now (or up
        # to the resume this pause interrupts) its socket took bytes.
        self._paused = True
        self._progress_at = self.factory.reactor.seconds()
        self._unsent = _unsent(self.transport)
        self.factory.paused(self)

    def resumeProducing(self) -> None:
        self._paused = False
        queue = self._queue
        while queue and not self._paused and not self._closing:
            key, prepared = queue.popitem(last=False)
            if key.__class__ is int and key > 0:
                self._must -= 1
            self._write(prepared.payloadHybi)
        if not self._paused:
            self.factory.unpaused(self)
        limit = self.factory.queue_limit
        if not queue:
            self._waiting_since = None
        if self._must <= limit and len(queue) - self._must <= limit:
            self._over_since = None

    def stopProducing(self) -> None:
        self._closing = True
        self._drop_queue()
        self.factory.unpaused(self)


@implementer(IReporting)
class StreamFactory(WebSocketServerFactory):
    """
    Autobahn's factory, with every limit set explicitly (its defaults allow
    any origin, unlimited sizes and no keep-alive).
    """

    # Autobahn's factory does not parameterize Twisted's generic Factory by
    # its protocol, so a protocol with a typed factory does not match.
    protocol = ClientProtocol  # type: ignore[assignment]
    gateway: Gateway  # set by the caller before the factory serves anyone

    def __init__(
        self,
        *,
        allowed_origins: tuple[str, ...],
        max_message_size: int,
        queue_limit: int,
        ping_interval: float,
        ping_timeout: float,
        handshake_timeout: float,
        max_per_ip: int = 0,
        stall_timeout: float | None = None,
        slow_for: float = SLOW_FOR,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param stall_timeout: seconds a client past C{queue_limit} may take
            no byte before it is closed; default C{ping_timeout}, as long
            as one that reads nothing has to answer a ping.
        @param slow_for: seconds a client that reads may stay past
            C{queue_limit} before it is closed.
        @param clock: the reactor (default: Twisted's).
        """
        super().__init__(reactor=clock)  # type: ignore[no-untyped-call]
        self.queue_limit = queue_limit
        self.stall_timeout = ping_timeout if stall_timeout is None else stall_timeout
        self.slow_for = slow_for
        self._paused: set[ClientProtocol] = set()
        self._sweep: IDelayedCall | None = None
        self.backlogged = 0
        """Clients with frames waiting for L{BACKLOGGED_AFTER} s though they
        read, at the last sweep."""
        self.max_per_ip = max_per_ip
        self.per_ip: Counter[str] = Counter()
        self.refused_per_ip = 0
        self.conflated = 0  # latest-only frames replaced by a newer one in a client's queue
        self._allowed = frozenset(allowed_origins)
        self.refused_origins = 0
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            failByDrop=False,
            # Autobahn would refuse "null" itself, with 400 and uncounted:
            # origin_allowed refuses it, with 403.
            allowNullOrigin=True,
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            perMessageCompressionAccept=lambda offers: None,
        )

    def status(self) -> dict[str, Any]:
        return {"handshakes_refused": {"origin": self.refused_origins,
                                       "per_ip": self.refused_per_ip},
                "clients_backlogged": self.backlogged, "conflated": self.conflated}

    def paused(self, client: ClientProtocol) -> None:
        """C{client}'s socket is full: watch it until it drains."""
        self._paused.add(client)
        if self._sweep is None:
            self._sweep = self.reactor.callLater(SWEEP, self._check)

    def unpaused(self, client: ClientProtocol) -> None:
        """C{client}'s socket drained, or it is gone."""
        self._paused.discard(client)
        if not self._paused:
            self.backlogged = 0
            if self._sweep is not None and self._sweep.active():
                self._sweep.cancel()
            self._sweep = None

    def _check(self) -> None:
        """Close the paused clients that stalled past the bound; count the backlogged."""
        self._sweep = None
        now = self.reactor.seconds()
        for client in list(self._paused):
            client.check(now)
        self.backlogged = sum(1 for client in self._paused if client.backlogged(now))
        if self._paused:
            self._sweep = self.reactor.callLater(SWEEP, self._check)

    def clients_behind(self) -> bool:
        """
        Whether most clients have frames waiting though they read: the
        daemon's writes go out slower than its events come, for all.
        """
        return self.backlogged * 2 > len(self.gateway.connections)

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """
        Same-origin by default, else the configured allowlist. A request
        with no Origin (not a browser) cannot be hijacked cross-site and is
        allowed; C{Origin: null} (sandboxed pages, files) is not.
        """
        if not origin:  # Autobahn gives "" when the header is absent
            return True
        try:
            normalized = normalize_origin(origin)
        except ValueError:
            return False
        if self._allowed:
            return "*" in self._allowed or normalized in self._allowed
        if not host:
            return False
        scheme = normalized.split("://", 1)[0]
        try:
            return normalized == normalize_origin(f"{scheme}://{host}")
        except ValueError:
            return False
