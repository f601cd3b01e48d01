"""
Engine.IO v4, the transport under Socket.IO (docs/socketio.md): a session
that starts on HTTP long-polling (or straight on a WebSocket) and upgrades
to a WebSocket, with the server's pings, on C{/socket.io/} of the same port
as C{/ws}.

A session is transport-independent: what the layer above sends goes to its
WebSocket (L{EngineWebSocket}, the C{/ws} connection with its backpressure
and queue bounds) once it has one, else to an outbox the next poll takes.
The outbox keeps what the C{/ws} queue keeps: every must-deliver frame, the
newest latest-only frame per key, and past C{queue_limit} must-deliver
frames the session is closed with "resume".

Limits: a session is open until its client misses a pong (C{ping_interval}
+ C{ping_timeout}), then closed and forgotten; one poll per session may be
pending; a POST is at most C{max_payload} bytes (413 before it is read,
L{tickstock.web.site.BoundedRequest}); sessions count against the per-IP
cap shared with C{/ws}, and at most L{MAX_SESSIONS} exist.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IDelayedCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tickstock.domain.interfaces import REPLAYED, IReporting
from tickstock.web.socketio.packets import (
    CLOSE,
    MESSAGE,
    NOOP,
    OPEN,
    PING,
    PONG,
    SEPARATOR,
    UPGRADE,
)
from tickstock.web.websocket import ClientProtocol, StreamFactory

FAREWELL_MAX = 4096
"""Bytes of its last packets an ended polling session keeps for its next poll:
the reason it was closed; events dropped then are replayed when it recovers."""
MAX_SESSIONS = 100_000
"""Engine.IO sessions one process keeps at most (polling or upgraded)."""

# Engine.IO's error codes for a refused request (answered as JSON with 400 or 403).
UNKNOWN_TRANSPORT, UNKNOWN_SID, BAD_METHOD, BAD_REQUEST, FORBIDDEN, BAD_VERSION = range(6)

_TEXT = b"text/plain; charset=UTF-8"


def _param(request: Any, name: bytes) -> str | None:
    values = request.args.get(name) if hasattr(request, "args") else None
    if values is None:
        values = getattr(request, "params", {}).get(name.decode())
    if not values:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _open(request: Request) -> bool:
    """Whether a response can still be written to C{request}."""
    return not request.finished and not getattr(request, "_disconnected", False)


class EngineSession:
    """
    One Engine.IO session. The layer above (L{tickstock.web.socketio.session})
    subclasses it and implements L{received}, L{ended} and L{slow}.

    @ivar sid: the session id the client sends back on every request.
    """

    def __init__(self, server: EngineServer, address: str | None) -> None:
        self.server = server
        self.sid = secrets.token_urlsafe(15)
        self.address = address
        self.ended_at: float | None = None
        self._ws: EngineWebSocket | None = None
        self._probe: EngineWebSocket | None = None
        self._poll: Request | None = None
        self._outbox: OrderedDict[Any, bytes] = OrderedDict()
        self._seq = 0
        self._must = 0
        clock = server.clock
        self._ping_timer: IDelayedCall | None = clock.callLater(server.ping_interval, self._ping)
        self._pong_timer: IDelayedCall | None = None

    # What the layer above implements.

    def received(self, text: bytes) -> None:
        """One Engine.IO message (its data, without the type) from the client."""
        raise NotImplementedError

    def ended(self) -> None:
        """The session is closed (by either side); called once."""
        raise NotImplementedError

    # Sending.

    def open_packet(self) -> bytes:
        server = self.server
        return OPEN + orjson.dumps({
            "sid": self.sid, "upgrades": [] if self._ws is not None else ["websocket"],
            "pingInterval": int(server.ping_interval * 1000),
            "pingTimeout": int(server.ping_timeout * 1000),
            "maxPayload": server.max_payload,
        })

    def send_packet(self, packet: bytes) -> None:
        """Send one Engine.IO packet (a control packet or a reply: must-deliver)."""
        if self.ended_at is not None:
            return
        ws = self._ws
        if ws is not None:
            ws.send_text(packet)
            return
        self._seq += 1
        self._outbox[self._seq] = packet
        self._must += 1
        self._flush_poll()

    def send(self, prepared: Any, key: Any = None) -> None:
        """An event frame, as L{tickstock.domain.interfaces.IClient.send} is given it."""
        ws = self._ws
        if ws is not None:
            ws.send(prepared, key)
            return
        if self.ended_at is not None:
            return
        outbox = self._outbox
        payload = prepared.payload
        if key is None or key is REPLAYED:
            self._seq += 1
            outbox[self._seq] = payload
            if key is None:
                self._must += 1
                if self._must > self.server.factory.queue_limit:
                    self.slow(len(outbox), "stopped polling")
                    return
        else:
            if key in outbox:
                del outbox[key]
                self.server.factory.conflated += 1
            outbox[key] = payload
        self._flush_poll()

    def slow(self, queued: int, why: str) -> None:
        """Past the queue bound and itself the reason: the layer above closes it with resume."""
        raise NotImplementedError

    def end(self) -> None:
        """End the session: its transport, its timers, and the layer above."""
        if self.ended_at is not None:
            return
        self.ended_at = self.server.clock.seconds()
        for timer in (self._ping_timer, self._pong_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._ping_timer = self._pong_timer = None
        ws, self._ws = self._ws, None
        probe, self._probe = self._probe, None
        for socket in (ws, probe):
            if socket is not None:
                socket.session = None
                socket.end()
        poll, self._poll = self._poll, None
        last = [*self._outbox.values(), CLOSE]
        if poll is not None:
            self._respond(poll, SEPARATOR.join(last))
        elif ws is None:
            # What it was last told (why it is closed), for its next poll.
            while len(last) > 1 and sum(map(len, last)) > FAREWELL_MAX:
                last.pop(0)
            self.server.farewell(self.sid, SEPARATOR.join(last))
        self._outbox.clear()
        self._must = 0
        self.server.forget(self)
        self.ended()

    # Heartbeat.

    def _ping(self) -> None:
        self._ping_timer = None
        self.send_packet(PING)
        self._pong_timer = self.server.clock.callLater(self.server.ping_timeout, self._no_pong)

    def _no_pong(self) -> None:
        self._pong_timer = None
        self.server.pongs_missed += 1
        self.end()

    def _pong(self) -> None:
        if self._pong_timer is not None and self._pong_timer.active():
            self._pong_timer.cancel()
            self._pong_timer = None
            self._ping_timer = self.server.clock.callLater(self.server.ping_interval, self._ping)

    # Incoming packets, from either transport.

    def packet(self, data: bytes, ws: EngineWebSocket | None = None) -> None:
        """One Engine.IO packet from the client (C{ws}: the socket it came on)."""
        if self.ended_at is not None:
            return
        kind = data[:1]
        if kind == MESSAGE:
            self.received(data[1:])
        elif kind == PONG and (ws is None or ws is not self._probe):
            self._pong()
        elif kind == PING and data == b"2probe" and ws is not None and ws is self._probe:
            ws.send_text(b"3probe")
            # The client pauses polling now: end its pending poll.
            poll, self._poll = self._poll, None
            if poll is not None:
                self._respond(poll, NOOP)
        elif kind == UPGRADE and ws is not None and ws is self._probe:
            self._upgrade(ws)
        elif kind == CLOSE:
            self.end()
        elif kind == NOOP:
            pass
        else:
            self.server.bad_packets += 1
            self.end()

    # HTTP long-polling.

    def poll(self, request: Request) -> bytes | int:
        """A GET: answer with what is waiting, or hold it until something is."""
        if self._ws is not None:
            return self.server.refuse(request, BAD_REQUEST, "transport mismatch")
        if self._probe is not None:
            return self._respond(request, NOOP, finish=False)
        if self._poll is not None:
            self.server.refuse_now(self._poll, BAD_REQUEST, "overlapping polls")
            self._poll = None
            self.end()
            return self.server.refuse(request, BAD_REQUEST, "overlapping polls")
        self._poll = request
        request.notifyFinish().addErrback(self._poll_gone, request)
        if self._outbox:
            self._flush_poll()
        return NOT_DONE_YET

    def _poll_gone(self, failure: Any, request: Request) -> None:
        if self._poll is request:
            self._poll = None

    def _flush_poll(self) -> None:
        poll = self._poll
        if poll is None or not self._outbox:
            return
        self._poll = None
        body = SEPARATOR.join(self._outbox.values())
        self._outbox.clear()
        self._must = 0
        self._respond(poll, body)

    def _respond(self, request: Request, body: bytes, finish: bool = True) -> bytes:
        request.setHeader(b"content-type", _TEXT)
        request.setHeader(b"cache-control", b"no-store")
        if not finish:
            return body
        request.setHeader(b"content-length", b"%d" % len(body))
        if _open(request):
            request.write(body)
            request.finish()
        return body

    def posted(self, body: bytes) -> None:
        """A POST's packets, in order."""
        for data in body.split(SEPARATOR):
            if data[:1] == b"b":  # base64: binary
                self.binary()
            else:
                self.packet(data)
            if self.ended_at is not None:
                return

    def binary(self) -> None:
        """A binary message came (Socket.IO attachments): refused; here, by ending the session."""
        self.server.bad_packets += 1
        self.end()

    # WebSocket.

    def probe(self, ws: EngineWebSocket) -> bool:
        """A WebSocket came to upgrade this polling session; whether it may."""
        if self._ws is not None or self._probe is not None or self.ended_at is not None:
            return False
        self._probe = ws
        return True

    def _upgrade(self, ws: EngineWebSocket) -> None:
        """The client switched to C{ws}: what waited for a poll goes there, in order."""
        self._probe = None
        self._ws = ws
        self.server.upgrades += 1
        poll, self._poll = self._poll, None
        if poll is not None:
            self._respond(poll, NOOP)
        outbox, self._outbox = self._outbox, OrderedDict()
        self._must = 0
        for payload in outbox.values():
            ws.send_text(payload)

    def on_websocket(self, ws: EngineWebSocket) -> None:
        """A WebSocket-only client: the session lives on C{ws} from its start."""
        self._ws = ws
        ws.send_text(self.open_packet())

    def socket_closed(self, ws: EngineWebSocket) -> None:
        """A WebSocket of this session closed: the session with it, unless it was only a probe."""
        if ws is self._probe:
            self._probe = None
        elif ws is self._ws:
            self._ws = None
            self.end()


class EngineWebSocket(ClientProtocol):
    """
    The WebSocket transport of an Engine.IO session: the C{/ws} connection
    (backpressure, direct writes, queue bounds) with Engine.IO packets in
    its text frames instead of C{/ws} messages.
    """

    factory: EngineWebSocketFactory
    session: EngineSession | None = None
    _sid: str | None = None

    def onConnect(self, request: Any) -> None:
        if _param(request, b"EIO") != "4":
            raise ConnectionDeny(400, "unsupported protocol version")  # type: ignore[no-untyped-call]
        self._sid = _param(request, b"sid")
        if self._sid is None:
            super().onConnect(request)  # a new session: its address is counted
            return
        # An upgrade: its session is counted already.
        self.check_origin(request)
        if self._sid not in self.factory.server.sessions:
            raise ConnectionDeny(400, "session id unknown")  # type: ignore[no-untyped-call]

    def onOpen(self) -> None:
        self.take_producer()
        self.slim()
        server = self.factory.server
        if self._sid is None:
            session = server.open(self._address_of(), self)
            if session is None:
                self.close(1013, "too many sessions")
                return
            self.session = session
            session.on_websocket(self)
            return
        existing = server.sessions.get(self._sid)
        if existing is None or not existing.probe(self):
            self.close(1008, "session cannot upgrade")
            return
        self.session = existing

    def _address_of(self) -> str | None:
        # The per-IP count of this socket moves to its session.
        address, self._address = self._address, None
        return address

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            return
        if isBinary:
            session.binary()
        else:
            session.packet(payload, self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._closing = True
        self._drop_queue()
        self.factory.unpaused(self)
        session, self.session = self.session, None
        if session is not None:
            session.socket_closed(self)

    def _overflow(self, why: str) -> None:
        queued = len(self._queue)
        self._drop_queue()
        if self.session is not None:
            self.session.slow(queued, why)

    def send_text(self, packet: bytes) -> None:
        if not self._closing:
            self.sendMessage(packet)  # type: ignore[no-untyped-call]

    def end(self) -> None:
        """Close the socket (its session ended)."""
        if not self._closing:
            self._closing = True
            self.sendCloseFrame(1000, b"", isReply=False)


class EngineWebSocketFactory(StreamFactory):
    """The C{/ws} factory's limits, for the WebSocket transport of Engine.IO sessions."""

    protocol = EngineWebSocket
    server: EngineServer

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Engine.IO pings at its own level, which a polling session needs too.
        self.setProtocolOptions(autoPingInterval=0)  # type: ignore[no-untyped-call]


@implementer(IReporting)
class EngineServer(Resource):
    """
    C{/socket.io/}: long-polling GET and POST, and the WebSocket transport
    (handed to Autobahn), for sessions made by C{make(server, address)}.
    """

    isLeaf = True

    def __init__(self, factory: EngineWebSocketFactory,
                 make: Callable[[EngineServer, str | None], EngineSession],
                 ping_interval: float, ping_timeout: float, max_payload: int,
                 records: object = None) -> None:
        """
        @param records: where sessions are kept for recovery, if it reports
            (L{IReporting}): its counters are shown with these.
        """
        from autobahn.twisted.resource import WebSocketResource

        super().__init__()  # type: ignore[no-untyped-call]
        self.factory = factory
        factory.server = self
        self.clock = factory.reactor
        self._make = make
        self._websocket = WebSocketResource(factory)  # type: ignore[no-untyped-call]
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_payload = max_payload
        self._records = records if IReporting.providedBy(records) else None
        self.sessions: dict[str, EngineSession] = {}
        self._farewells: dict[str, bytes] = {}
        self.refused: dict[str, int] = {}
        self.opened = self.upgrades = self.pongs_missed = self.bad_packets = 0
        self.recovered = 0  # sessions a client came back to (Socket.IO connection state recovery)

    def status(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions), "opened": self.opened,
                "upgrades": self.upgrades, "pongs_missed": self.pongs_missed,
                "bad_packets": self.bad_packets, "recovered": self.recovered,
                "refused": dict(self.refused), "websocket": self.factory.status(),
                **(self._records.status() if self._records is not None else {})}

    def open(self, address: str | None, ws: EngineWebSocket | None = None) -> EngineSession | None:
        """A new session from C{address} (already counted against its cap), or L{None}: too many."""
        if len(self.sessions) >= MAX_SESSIONS:
            self._count("too_many_sessions")
            self.uncount(address)
            return None
        session = self._make(self, address)
        self.sessions[session.sid] = session
        self.opened += 1
        return session

    def farewell(self, sid: str, body: bytes) -> None:
        """What an ended polling session's next poll is answered with, for C{ping_timeout}."""
        self._farewells[sid] = body
        self.clock.callLater(self.ping_timeout, self._farewells.pop, sid, None)

    def forget(self, session: EngineSession) -> None:
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]
            self.uncount(session.address)

    def uncount(self, address: str | None) -> None:
        if address is None:
            return
        per_ip = self.factory.per_ip
        per_ip[address] -= 1
        if per_ip[address] <= 0:
            del per_ip[address]

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def refuse(self, request: Request, code: int, message: str, status: int = 400) -> bytes:
        """Engine.IO's error answer: C{{"code", "message"}} with 400 (or C{status})."""
        self._count(message.replace(" ", "_"))
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return orjson.dumps({"code": code, "message": message})

    def refuse_now(self, request: Request, code: int, message: str) -> None:
        body = self.refuse(request, code, message)
        if _open(request):
            request.write(body)
            request.finish()

    def _cors(self, request: Request) -> bool:
        """Whether the origin may use sessions; an allowed cross origin gets CORS headers."""
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if not self.factory.origin_allowed(origin, host):
            return False
        if origin:
            request.setHeader(b"access-control-allow-origin", origin.encode("latin-1"))
            request.setHeader(b"access-control-allow-credentials", b"true")
            request.setHeader(b"vary", b"origin")
        return True

    def render_OPTIONS(self, request: Request) -> bytes:
        if not self._cors(request):
            return self.refuse(request, FORBIDDEN, "origin not allowed", 403)
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"GET, POST")
        request.setHeader(b"access-control-allow-headers", b"content-type")
        request.setHeader(b"access-control-max-age", b"600")
        return b""

    def render_GET(self, request: Request) -> bytes | int:
        if _param(request, b"EIO") != "4":
            return self.refuse(request, BAD_VERSION, "unsupported protocol version")
        transport = _param(request, b"transport")
        if transport == "websocket":
            if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
                return self.refuse(request, BAD_REQUEST, "websocket upgrade expected")
            return int(self._websocket.render(request))  # type: ignore[no-untyped-call]
        if transport != "polling":
            return self.refuse(request, UNKNOWN_TRANSPORT, "transport unknown")
        if not self._cors(request):
            self.factory.refused_origins += 1
            return self.refuse(request, FORBIDDEN, "origin not allowed", 403)
        sid = _param(request, b"sid")
        if sid is None:
            return self._handshake(request)
        session = self.sessions.get(sid)
        if session is None:
            farewell = self._farewells.pop(sid, None)
            if farewell is None:
                return self.refuse(request, UNKNOWN_SID, "session id unknown")
            request.setHeader(b"content-type", _TEXT)
            request.setHeader(b"cache-control", b"no-store")
            return farewell
        return session.poll(request)

    def _handshake(self, request: Request) -> bytes:
        factory = self.factory
        address = getattr(request.getClientAddress(), "host", None)
        if factory.max_per_ip and address is not None:
            if factory.per_ip[address] >= factory.max_per_ip:
                factory.refused_per_ip += 1
                return self.refuse(request, FORBIDDEN, "too many connections from this address",
                                   429)
            factory.per_ip[address] += 1
        else:
            address = None
        session = self.open(address)
        if session is None:
            return self.refuse(request, BAD_REQUEST, "too many sessions", 503)
        request.setHeader(b"content-type", _TEXT)
        request.setHeader(b"cache-control", b"no-store")
        return session.open_packet()

    def render_POST(self, request: Request) -> bytes:
        if _param(request, b"EIO") != "4":
            return self.refuse(request, BAD_VERSION, "unsupported protocol version")
        if _param(request, b"transport") != "polling":
            return self.refuse(request, UNKNOWN_TRANSPORT, "transport unknown")
        if not self._cors(request):
            self.factory.refused_origins += 1
            return self.refuse(request, FORBIDDEN, "origin not allowed", 403)
        session = self.sessions.get(_param(request, b"sid") or "")
        if session is None:
            return self.refuse(request, UNKNOWN_SID, "session id unknown")
        assert request.content is not None
        body = request.content.read(self.max_payload + 1)
        if len(body) > self.max_payload:
            session.end()
            return self.refuse(request, BAD_REQUEST, "payload too large", 413)
        session.posted(body)
        request.setHeader(b"content-type", _TEXT)
        request.setHeader(b"cache-control", b"no-store")
        return b"ok"
