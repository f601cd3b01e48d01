"""
The WebSocket endpoint at C{/ws}: a thin Autobahn protocol that hands text
messages to the L{Gateway} and event frames to the socket.

Backpressure: each connection registers itself as the transport's push
producer (replacing the HTTP channel Autobahn leaves there), so Twisted tells
it when the socket's buffer is full. While paused, event frames wait in one
queue, in event-id order, by delivery class (L{tickstock.events.Channel}):

 - must-deliver frames are all kept; past C{queue_limit} of them the client
   is closed with 4001 ("reconnect and resume"), never silently skipped;
 - a latest-only frame (tick, job progress, health) replaces the queued
   frame with the same conflation key, so a slow reader gets the newest per
   key; more than C{queue_limit} distinct keys also closes with 4001.

So one reader that stopped cannot grow the server's memory without bound or
delay everyone else, and a merely slow one keeps up on latest-only topics.

The hot path (a client that keeps up) writes each event frame straight to
the socket when nothing is buffered for it: Twisted's C{write} would instead
buffer it, register the socket with epoll, write it on the next reactor turn
and unregister it again, which is most of the cost of fanning one event out
to a thousand clients. Only what the kernel does not take goes through
Twisted's buffer (and so its backpressure).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import tcp
from twisted.logger import Logger
from zope.interface import implementer

from tickstock.config import normalize_origin
from tickstock.gateway import Gateway
from tickstock.interfaces import REPLAYED, IClient
from tickstock.web.site import REFUSED_STATUS

CLOSE_HANDSHAKE_TIMEOUT = 1.0
_OPEN = WebSocketProtocol.STATE_OPEN


@implementer(IClient)
class ClientProtocol(WebSocketServerProtocol):
    """One browser (or other WebSocket client)."""

    _log = Logger()
    factory: StreamFactory

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
        self._socket: Any = None  # set when frames can be written to it directly
        self._address: str | None = None  # counted against the per-IP cap

    def onConnect(self, request: Any) -> None:
        factory = self.factory
        if not factory.origin_allowed(request.origin, request.headers.get("host")):
            factory.refused_origins += 1
            raise ConnectionDeny(REFUSED_STATUS["origin"], "origin not allowed")
        address = getattr(self.transport.getPeer(), "host", None)
        if factory.max_per_ip and address is not None:
            if factory.per_ip[address] >= factory.max_per_ip:
                factory.refused_per_ip += 1
                raise ConnectionDeny(REFUSED_STATUS["per_ip"],
                                     "too many connections from this address")
            factory.per_ip[address] += 1
            self._address = address

    def connectionLost(self, reason: Any) -> None:
        address, self._address = self._address, None
        if address is not None:
            per_ip = self.factory.per_ip
            per_ip[address] -= 1
            if per_ip[address] <= 0:
                del per_ip[address]
        super().connectionLost(reason)

    def onOpen(self) -> None:
        try:
            # twisted.web left its HTTP channel as the producer; take over so
            # that pause/resume reach this connection.
            transport = self.transport
            transport.unregisterProducer()
            transport.registerProducer(self, True)
            if isinstance(transport, tcp.Connection) and not transport.TLS:
                self._socket = transport.socket
            self.factory.gateway.opened(self)
        except Exception:
            self._log.failure("opening a connection failed")
            self.dropConnection(abort=True)

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
        self.factory.gateway.closed(self)

    # IClient

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
        transport = self.transport
        sock = self._socket
        if sock is not None and not transport.dataBuffer and not transport._tempDataLen:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def _enqueue(self, prepared: Any, key: Any) -> None:
        queue = self._queue
        limit = self.factory.queue_limit
        if key is None:
            self._seq += 1
            queue[self._seq] = prepared
            self._must += 1
            if self._must > limit:
                self._overflow()
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
                self._overflow()

    def _overflow(self) -> None:
        queued = len(self._queue)
        self._drop_queue()
        self.factory.gateway.slow_consumer(self, queued)

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._must = 0

    def reply(self, message: dict[str, Any]) -> None:
        if not self._closing:
            self.sendMessage(orjson.dumps(message))

    def close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            # sendClose() only takes 1000 and 3000-4999; 1008 needs the frame
            # call Autobahn uses for its own protocol closes. Reasons: 123 bytes.
            self.sendCloseFrame(code, reason.encode()[:123], isReply=False)

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        queue = self._queue
        while queue and not self._paused and not self._closing:
            key, prepared = queue.popitem(last=False)
            if key.__class__ is int and key > 0:
                self._must -= 1
            self._write(prepared.payloadHybi)

    def stopProducing(self) -> None:
        self._closing = True
        self._drop_queue()


class StreamFactory(WebSocketServerFactory):
    """
    Autobahn's factory, with every limit set explicitly (its defaults allow
    any origin, unlimited sizes and no keep-alive).
    """

    protocol = ClientProtocol
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
    ) -> None:
        super().__init__()
        self.queue_limit = queue_limit
        self.max_per_ip = max_per_ip
        self.per_ip: Counter[str] = Counter()
        self.refused_per_ip = 0
        self.conflated = 0  # latest-only frames replaced by a newer one in a client's queue
        self._allowed = frozenset(allowed_origins)
        self.refused_origins = 0
        self.setProtocolOptions(
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
