"""
Requests refused before any resource sees them (docs/security.md): over a
raw socket to the daemon in embedded mode, each gets its status line and a
JSON error, the connection then closes, the refusal is counted on
C{/metrics} by reason and status, and the daemon keeps serving everyone
else. A request exactly at each limit is served as usual.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.wsclient import connect, eventually, http_get
from tickstock.web.site import HEADER_FIELDS_MAX, HEADERS_MAX, REQUEST_LINE_MAX

HANDSHAKE = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


class RawClient(Protocol):
    """
    Records the bytes a plain-TCP peer gets back; C{lost} fires when the
    connection ends, and C{reason} says how.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


@implementer(IHalfCloseableProtocol)
class Lingering(RawClient):
    """A peer that keeps its side open after the server's: C{eof} fires on the server's FIN."""

    def __init__(self) -> None:
        super().__init__()
        self.eof: Deferred[None] = Deferred()

    def readConnectionLost(self) -> None:
        self.eof.callback(None)

    def writeConnectionLost(self) -> None:
        pass


async def exchange(port: int, request: bytes) -> tuple[int, bytes, bytes]:
    """
    Send C{request} on a new connection and read until the server closes it,
    cleanly: a reset (the server closing with input unread) could destroy
    the answer before the client reads it. (status, head, body).
    """
    raw = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(RawClient))
    raw.transport.write(request)
    await eventually(lambda: raw.lost.called, 10, "the server to close the connection")
    assert raw.reason is not None and raw.reason.check(ConnectionDone), raw.reason
    head, _, body = raw.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), raw.received[:200]
    return int(head.split(b" ", 2)[1]), head, body


def get(target: bytes, headers: bytes = b"") -> bytes:
    """A GET that asks the server to close the connection once answered."""
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"


def line_of(size: int) -> bytes:
    """A request line of exactly C{size} bytes, for C{/health}."""
    start, end = b"GET /health?pad=", b" HTTP/1.1"
    return start + b"a" * (size - len(start) - len(end)) + end


def headers_of(size: int) -> bytes:
    """
    A request to C{/health} whose request line and header lines come to
    exactly C{size} bytes, line ends not counted (as the limit counts them).
    """
    lines = [b"GET /health HTTP/1.1", b"Host: x", b"Connection: close"]
    pad = b"X-Pad: "
    lines.append(pad + b"a" * (size - sum(map(len, lines)) - len(pad)))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def fields(count: int) -> bytes:
    """A request to C{/health} with C{count} header fields in all."""
    pads = b"".join(b"X-Pad-%d: 1\r\n" % n for n in range(count - 2))
    return b"GET /health HTTP/1.1\r\nHost: x\r\n" + pads + b"Connection: close\r\n\r\n"


async def scrape(port: int) -> dict[tuple[str, str, str], float]:
    """C{tickstock_http_refused_total} from C{/metrics}: (name, reason, status) to count."""
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return {(s.name, s.labels.get("reason", ""), s.labels.get("status", "")): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def refused(samples: dict[tuple[str, str, str], float], reason: str, status: int) -> float:
    return samples[("tickstock_http_refused_total", reason, str(status))]


@pytest_twisted.ensureDeferred
async def test_oversized_and_malformed_requests_get_their_status_then_close(daemons: Any) -> None:
    """
    A 100 KB bearer token on /api is 431 and an 8 MB query string 414 (both
    were dropped without an answer), a request line or header block one
    byte over its limit too, one header field too many 431, and a malformed
    request line 400: each answered, closed and counted, while a WebSocket
    client connected throughout is undisturbed. The server reads and throws
    away the 8 MB instead of buffering it, so the client can send all of it.
    """
    daemon = daemons(sim_rate=0)
    normal = await connect(daemon.port, hello={"user": "normal"})
    before = await scrape(daemon.port)
    attempts = [
        ("header_too_large", 431, get(b"/api/symbols", b"Authorization: Bearer "
                                      + b"x" * 100_000 + b"\r\n")),
        ("uri_too_long", 414, get(b"/api/patterns?symbol=" + b"A" * 8 * 2**20)),
        ("uri_too_long", 414, line_of(REQUEST_LINE_MAX + 1) + b"\r\nHost: x\r\n\r\n"),
        ("header_too_large", 431, headers_of(HEADERS_MAX + 1)),
        ("header_too_large", 431, fields(HEADER_FIELDS_MAX + 1)),
        ("bad_request", 400, b"GET\r\nHost: x\r\n\r\n"),
    ]
    for reason, expected, request in attempts:
        status, head, body = await exchange(daemon.port, request)
        assert status == expected, (reason, head)
        assert b"\r\nconnection: close" in head and b"\r\ncontent-security-policy: " in head
        assert orjson.loads(body)["error"]["code"] == reason
    after = await scrape(daemon.port)
    for reason, expected in (("header_too_large", 431), ("uri_too_long", 414),
                             ("bad_request", 400)):
        moved = refused(after, reason, expected) - refused(before, reason, expected)
        assert moved == sum(1 for r, _, _ in attempts if r == reason), reason
    assert normal.close_code is None
    assert (await normal.request({"op": "ping", "id": "p"}, "pong"))["op"] == "pong"


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_413_before_it_is_read(daemons: Any) -> None:
    """
    A POST declaring a body over the site's bound (the larger of
    --max-message-size and 64 KiB) is answered 413 from its headers, and a
    chunked one once its chunks pass the bound: the body is never buffered
    whole. One at the bound reaches its resource.
    """
    daemon = daemons(sim_rate=0)
    bound = daemon.service.site.body_max
    head = b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, _, body = await exchange(daemon.port, head + b"Content-Length: %d\r\n\r\n" % (
        bound + 1) + b"{")
    assert status == 413 and orjson.loads(body)["error"]["code"] == "body_too_large"
    chunk = b"a" * 8192
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n" + (
        b"%x\r\n" % len(chunk) + chunk + b"\r\n") * (bound // len(chunk) + 1)
    status, _, _ = await exchange(daemon.port, chunked)
    assert status == 413
    at_bound = head + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % bound + b" " * bound
    status, _, body = await exchange(daemon.port, at_bound)
    assert status in (400, 401)  # the API's own answer: not JSON, or no token
    assert daemon.service.site.refused["body_too_large"] == 2


@pytest_twisted.ensureDeferred
async def test_requests_at_the_limits_are_served(daemons: Any) -> None:
    """A request line, a header block and a field count exactly at their limits: 200."""
    daemon = daemons(sim_rate=0)
    for request in (line_of(REQUEST_LINE_MAX) + b"\r\nHost: x\r\nConnection: close\r\n\r\n",
                    headers_of(HEADERS_MAX), fields(HEADER_FIELDS_MAX)):
        status, head, body = await exchange(daemon.port, request)
        assert status == 200, head
        assert orjson.loads(body)["status"] == "ok"
    assert sum(daemon.service.site.refused.values()) == 0


@pytest_twisted.ensureDeferred
async def test_a_refused_origin_is_403_null_included(daemons: Any) -> None:
    """
    A WebSocket handshake from another origin, or from C{Origin: null}
    (sandboxed frames, files; was 400 from Autobahn, uncounted), is 403 and
    closed, counted as an origin refusal; the page's own origin still opens.
    """
    daemon = daemons(sim_rate=0)
    before = await scrape(daemon.port)
    for origin in (b"null", b"http://evil.example"):
        status, head, _ = await exchange(daemon.port, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                         b"%sOrigin: %s\r\n\r\n" % (daemon.port, HANDSHAKE, origin))
        assert status == 403, (origin, head)
    after = await scrape(daemon.port)
    assert refused(after, "origin", 403) - refused(before, "origin", 403) == 2
    same = await connect(daemon.port, origin=f"http://127.0.0.1:{daemon.port}",
                         hello={"user": "x"})
    assert same.of("welcome")


@pytest_twisted.ensureDeferred
async def test_a_refused_client_that_stays_is_cut_off(daemons: Any) -> None:
    """
    A client that gets its 431 and the server's end of the stream but keeps
    its own side open, still sending, is disconnected after the linger
    (2 s), not kept forever.
    """
    daemon = daemons(sim_rate=0)
    raw = await TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port).connect(
        Factory.forProtocol(Lingering))
    raw.transport.write(get(b"/health", b"X-Pad: " + b"a" * 20_000 + b"\r\n"))
    await eventually(lambda: raw.eof.called, 10, "the answer and the server's FIN")
    assert raw.received.startswith(b"HTTP/1.1 431 ") and not raw.lost.called


    def still_sending() -> bool:
        raw.transport.write(b"x")  # how this peer notices the reset, having read the FIN
        return raw.lost.called

    await eventually(still_sending, 10, "the server to cut the connection")
