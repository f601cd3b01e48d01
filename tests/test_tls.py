"""
TLS: C{--listen ssl:...} serves HTTPS and WSS on the one port. A self-signed
certificate made here for 127.0.0.1, the daemon in the test reactor on the
test's Redis, and real TLS clients that trust only that certificate. Events
over WSS take the transport's path, not the plain-TCP socket fast path of
tickstock/web/websocket.py, so their arrival is what proves TLS delivery.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from tests.servers import free_port
from tests.test_end_to_end import pattern, publish, ready
from tests.test_resume import PATTERNS
from tests.wsclient import RecordingClient, eventually, read_body
from tickstock.web.site import SECURITY_HEADERS

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """
    A self-signed certificate for 127.0.0.1 and localhost, and its key, as
    PEM files: made here so that no test depends on a file that can expire.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tickstock test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def trust(cert_path: Path) -> Certificate:
    """The test certificate as the only trust root: a client that verifies for real."""
    return Certificate.loadPEM(cert_path.read_bytes())


def ssl_listen(certificate: tuple[Path, Path]) -> str:
    """An C{ssl:} endpoint string on a free loopback port (port second, as Daemon reads it)."""
    cert_path, key_path = certificate
    return f"ssl:{free_port()}:privateKey={key_path}:certKey={cert_path}:interface={HOST}"


async def https_get(port: int, path: str, cert_path: Path) -> tuple[int, Any, bytes]:
    """GET over HTTPS, verifying the server against the test certificate."""
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust(cert_path)))
    response = await agent.request(b"GET", f"https://{HOST}:{port}{path}".encode())
    return response.code, response.headers, await read_body(response)


async def connect_wss(port: int, cert_path: Path, hello: dict[str, Any],
                      origin: str | None = None) -> RecordingClient:
    """Open a WSS connection (Autobahn over a verifying TLS client endpoint) and say hello."""
    factory = WebSocketClientFactory(f"wss://{HOST}:{port}/ws", origin=origin)
    factory.protocol = RecordingClient
    factory.setProtocolOptions(autoPingInterval=0)
    options = optionsForClientTLS(HOST, trustRoot=trust(cert_path))
    proto = await SSL4ClientEndpoint(reactor, HOST, port, options).connect(factory)
    await proto.opened
    reply = await proto.request({"op": "hello", "id": "h", **hello}, "welcome")
    assert reply["op"] == "welcome", reply
    return proto


class RawClient(Protocol):
    """Records the bytes a plain-TCP peer gets back; C{lost} fires when the server hangs up."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_https_health_has_the_security_headers(redis_server: Any, daemons: Any,
                                                     certificate: tuple[Path, Path]) -> None:
    """
    /health over HTTPS answers 200, and the headers the daemon puts on every
    response are there over TLS too (SecureSite must not depend on the port
    type), with Strict-Transport-Security, which only a TLS answer carries.
    """
    daemon = daemons(redis=redis_server.url, listen=ssl_listen(certificate))
    await ready(daemon)
    status, headers, body = await https_get(daemon.port, "/health", certificate[0])
    assert status == 200, body
    assert orjson.loads(body)["status"] == "ok"
    for name, value in SECURITY_HEADERS.items():
        assert headers.getRawHeaders(name) == [value], name
    assert headers.getRawHeaders(b"strict-transport-security") == [b"max-age=31536000"]


@pytest_twisted.ensureDeferred
async def test_wss_hello_subscribe_and_events(redis_server: Any, daemons: Any,
                                              certificate: tuple[Path, Path]) -> None:
    """
    Over WSS, with the browser's same-origin Origin (https, this port): hello,
    a filtered patterns subscription, and events published to Redis arrive,
    all of them and in order, while the one for another symbol does not.
    """
    daemon = daemons(redis=redis_server.url, listen=ssl_listen(certificate))
    await ready(daemon)
    client = await connect_wss(daemon.port, certificate[0], daemon.hello("alice"),
                               origin=f"https://{HOST}:{daemon.port}")
    reply = await client.request({"op": "subscribe", "id": "p", "topic": "patterns",
                                  "filter": {"symbols": ["AAPL"]}}, "subscribed")
    assert reply["op"] == "subscribed", reply
    publish(redis_server, PATTERNS, pattern("MSFT"))
    for n in range(50):
        assert publish(redis_server, PATTERNS, pattern("AAPL", n=n)) == 1
    await eventually(lambda: len(client.events("p")) == 50, 10, "50 events over WSS")
    events = client.events("p")
    assert [e["data"]["n"] for e in events] == list(range(50))
    assert {e["data"]["symbol"] for e in events} == {"AAPL"}
    client.sendClose(1000)
    await client.closed


@pytest_twisted.ensureDeferred
async def test_plain_http_to_the_tls_port_gets_no_answer(redis_server: Any, daemons: Any,
                                                         certificate: tuple[Path, Path]) -> None:
    """
    A plain-text HTTP request to the TLS port gets no HTTP response (at most
    a TLS alert) and is hung up on; the port still serves HTTPS afterwards.
    """
    daemon = daemons(redis=redis_server.url, listen=ssl_listen(certificate))
    await ready(daemon)
    raw = await TCP4ClientEndpoint(reactor, HOST, daemon.port).connect(
        Factory.forProtocol(RawClient))
    raw.transport.write(f"GET /health HTTP/1.1\r\nHost: {HOST}:{daemon.port}\r\n\r\n".encode())
    await eventually(lambda: raw.lost.called, 5, "the server to hang up")
    assert b"HTTP/" not in raw.received and b'"status"' not in raw.received, raw.received
    status, _, _ = await https_get(daemon.port, "/health", certificate[0])
    assert status == 200
