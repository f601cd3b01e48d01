"""
The web site: the dashboard at C{/}, the JS client library at
C{/static/tickstock.js}, the WebSocket at C{/ws},
and C{/health} and C{/ready} for probes. One port for all of them.

A request too large to read is answered, not dropped (docs/security.md):
414 for a request line over L{REQUEST_LINE_MAX} bytes, 431 for header
fields over L{HEADERS_MAX} bytes or L{HEADER_FIELDS_MAX} fields, 413 for a
body over the site's C{body_max}, 400 for any other malformed request, each
counted by reason in L{SecureSite.refused}.
"""

from __future__ import annotations

import importlib.resources
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import orjson
from autobahn.twisted.resource import WebSocketResource
from twisted.internet import tcp
from twisted.internet.interfaces import ITCPTransport
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File
from zope.interface import implementer

from tickstock.domain.interfaces import IReporting

JSON = b"application/json"


class JSONStatus(Resource):
    """
    A probe: C{report()} returns C{(ok, body)} from state the components
    keep current, so a probe never waits on a dependency.
    """

    isLeaf = True

    def __init__(self, report: Callable[[], tuple[bool, dict[str, object]]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._report = report

    def render_GET(self, request: Request) -> bytes:
        ok, body = self._report()
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"content-type", JSON)
        request.setHeader(b"cache-control", b"no-store")
        return orjson.dumps(body)


def packaged(folder: str) -> File:
    """One of the packaged folders of static files: C{dashboard} or C{client}."""
    return File(str(importlib.resources.files("tickstock.web") / folder))


SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
}


REQUEST_LINE_MAX = 8192
HEADERS_MAX = 16384  # the request line and header fields together, line ends not counted
HEADER_FIELDS_MAX = 500
LINGER = 2.0

REFUSALS: dict[str, tuple[int, bytes, str]] = {
    "uri_too_long": (414, b"URI Too Long",
                     f"the request line may be at most {REQUEST_LINE_MAX} bytes"),
    "header_too_large": (431, b"Request Header Fields Too Large",
                         f"the request line and header fields may be at most {HEADERS_MAX} "
                         f"bytes and {HEADER_FIELDS_MAX} fields"),
    "bad_request": (400, b"Bad Request", "malformed HTTP request"),
    "body_too_large": (413, b"Content Too Large", "the request body is too large"),
}
"""Refusals made before any resource sees the request: reason to (status, phrase, message)."""

REFUSED_STATUS = {"origin": 403, "per_ip": 429,
                  **{reason: status for reason, (status, _, _) in REFUSALS.items()}}
"""The HTTP status of every refusal counted by reason: the handshake's and the channel's."""


class BoundedChannel(HTTPChannel):
    """
    twisted.web's channel, answering a request it will not read with its
    status where Twisted drops the connection (a line over C{MAX_LENGTH}) or
    answers 400 (too many header bytes or fields). What the client still
    sends is read and discarded, never buffered, for at most L{LINGER}
    seconds after the answer: closing a socket with unread input resets the
    connection, which can destroy the answer before the client reads it.
    """

    MAX_LENGTH = HEADERS_MAX
    totalHeadersSize = HEADERS_MAX
    maxHeaders = HEADER_FIELDS_MAX
    site: SecureSite
    _refused = False

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().dataReceived(data)  # type: ignore[no-untyped-call]

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        # No header bytes counted yet: this is the request line.
        first = self._receivedHeaderSize == 0
        if first and len(line) > REQUEST_LINE_MAX:
            self.refuse("uri_too_long")
        elif self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self.refuse("header_too_large")
        else:
            super().lineReceived(line)  # type: ignore[no-untyped-call]

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse("uri_too_long" if self._receivedHeaderSize == 0 else "header_too_large")

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self.refuse("header_too_large")
            return False
        return bool(super().headerReceived(line))  # type: ignore[no-untyped-call]

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.refuse("bad_request")

    def refuse(self, reason: str) -> None:
        """Answer with the status of C{reason}, then close (see the class docstring)."""
        if self._refused:
            return
        self._refused = True
        self.clearLineBuffer()  # type: ignore[no-untyped-call]
        self.site.refused[reason] += 1
        status, phrase, message = REFUSALS[reason]
        body = orjson.dumps({"error": {"code": reason, "message": message}})
        head = [b"HTTP/1.1 %d %s" % (status, phrase), b"content-type: application/json",
                b"content-length: %d" % len(body), b"cache-control: no-store",
                b"connection: close", *(b"%s: %s" % item for item in SECURITY_HEADERS.items())]
        transport = self.transport
        assert transport is not None  # refusing what was received on it
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        # Twisted types it as the producer; it is also the consumer the
        # channel registered with (see HTTPChannel.connectionLost).
        self._networkProducer.unregisterProducer()  # type: ignore[attr-defined]
        self.setTimeout(LINGER)  # type: ignore[no-untyped-call]
        if isinstance(transport, tcp.Connection):
            transport.loseWriteConnection()
        else:  # TLS: no half-close
            transport.loseConnection()

    def timeoutConnection(self) -> None:
        if self._refused:
            # TCP, or TLS over it (which does not declare ITCPTransport): both abort.
            cast(ITCPTransport, self.transport).abortConnection()
        else:
            super().timeoutConnection()  # type: ignore[no-untyped-call]


class BoundedRequest(Request):
    """
    A request whose body may be at most the site's C{body_max} bytes: a
    larger one is answered with 413 (L{BoundedChannel.refuse}) as soon as
    its length is known or its chunks pass the bound, never buffered whole.
    """

    channel: BoundedChannel
    _body_received = 0

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)  # type: ignore[no-untyped-call]
        if length is not None and length > self.channel.site.body_max:
            self.channel.refuse("body_too_large")

    def handleContentChunk(self, data: bytes) -> None:
        self._body_received += len(data)
        if self._body_received > self.channel.site.body_max:
            self.channel.refuse("body_too_large")
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]


@implementer(IReporting)
class SecureSite(Site):
    """
    A Site that puts the security headers on every response, and answers
    requests too large to read (L{BoundedChannel}), counting them by reason
    in C{refused}.
    """

    # Twisted types this as its HTTP/2-negotiating wrapper; Site serves
    # any HTTPChannel.
    protocol = BoundedChannel  # type: ignore[assignment]

    requestFactory = BoundedRequest
    body_max = 1 << 20
    """The largest request body read, in bytes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.refused: Counter[str] = Counter()

    def status(self) -> dict[str, Any]:
        """Requests refused before they reached a resource, by reason."""
        return {"refused": dict(self.refused)}

    def getResourceFor(self, request: Request) -> Resource:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if request.isSecure():
            request.setHeader(b"strict-transport-security", b"max-age=31536000")
        resource: Resource = super().getResourceFor(request)  # type: ignore[no-untyped-call]
        return resource


def build_site(
    ws: WebSocketResource,
    health: JSONStatus,
    ready: JSONStatus,
    timeout: float,
    api: Resource | None = None,
    metrics: Resource | None = None,
    socketio: Resource | None = None,
    body_max: int = SecureSite.body_max,
) -> SecureSite:
    """
    Assemble the site. C{timeout} bounds how long a connection may sit
    without finishing its HTTP request (slowloris), which Autobahn's own
    handshake timeout does not cover. C{api} is served at C{/api},
    C{metrics} at C{/metrics}, C{socketio} at C{/socket.io/}. A request
    body over C{body_max} bytes is refused with 413.
    """
    root = packaged("dashboard")
    root.putChild(b"static", packaged("client"))
    root.putChild(b"ws", ws)
    root.putChild(b"health", health)
    root.putChild(b"ready", ready)
    if api is not None:
        root.putChild(b"api", api)
    if metrics is not None:
        root.putChild(b"metrics", metrics)
    if socketio is not None:
        root.putChild(b"socket.io", socketio)
    site = SecureSite(root, timeout=timeout)
    site.body_max = body_max
    site.displayTracebacks = False
    return site
