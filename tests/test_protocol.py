"""
The WebSocket protocol's edges over a real socket, against the daemon in
embedded mode (no Redis needed, simulator off): every bad request gets an
error or the documented close code, and the connection stays usable.
"""

from __future__ import annotations

import orjson
import pytest
import pytest_twisted
from twisted.internet import error

from tests.wsclient import connect, eventually, http_get, read_body


@pytest.fixture
def quiet(daemons):
    """An embedded daemon whose simulator publishes nothing."""
    return daemons(sim_rate=0, max_subscriptions=3, max_message_size=1024, hello_timeout=0.5)


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_errors_and_the_connection_stays(quiet):
    """Each malformed request is answered with its error code; nothing is closed."""
    client = await connect(quiet.port)
    client.send(b"{not json")
    await eventually(lambda: client.of("error"), 2)
    assert client.of("error")[-1]["code"] == "bad_json"

    async def error_for(message: dict) -> str:
        reply = await client.request(message, "never")
        assert reply["op"] == "error", reply
        return reply["code"]

    assert await error_for({"op": "subscribe", "id": "x", "topic": "patterns"}) == "hello_required"
    assert await error_for({"op": "launch", "id": "x"}) == "unknown_op"
    hello = await client.request({"op": "hello", "id": "h", "user": "carol"}, "welcome")
    assert hello["user"] == "carol" and hello["session"]
    assert await error_for({"op": "hello", "id": "h2"}) == "bad_request"
    assert await error_for({"op": "subscribe", "id": "a", "topic": "weather"}) == "bad_topic"
    for bad in ({"symbols": ["aapl"]}, {"symbols": []}, {"min_confidence": 2},
                {"min_confidence": True}, {"colour": "red"}, {"universe": "no spaces"},
                {"universe": 5}, "AAPL"):
        assert await error_for({"op": "subscribe", "id": "a", "topic": "patterns",
                                "filter": bad}) == "bad_filter", bad
    assert await error_for({"op": "subscribe", "id": "a", "topic": "health",
                            "filter": {"symbols": ["AAPL"]}}) == "bad_filter"
    assert await error_for({"op": "subscribe", "id": "a", "topic": "patterns",
                            "filter": {"universe": "sp500"}}) == "unknown_universe"
    assert await error_for({"op": "unsubscribe", "id": "nope"}) == "unknown_subscription"
    for params in ({"symbols": [], "start_date": "2024-01-01", "end_date": "2024-01-02"},
                   {"symbols": ["AAPL", "AAPL"], "start_date": "2024-01-01",
                    "end_date": "2024-01-02"},
                   {"symbols": ["AAPL"], "start_date": "20240101", "end_date": "2024-01-02"},
                   {"symbols": ["AAPL"], "start_date": "2024-02-01", "end_date": "2024-01-02"}):
        assert await error_for({"op": "submit_backtest", "id": "r", "params": params}) \
            == "bad_params"

    for n in range(3):
        reply = await client.request({"op": "subscribe", "id": f"s{n}", "topic": "ticks"},
                                     "subscribed")
        assert reply["op"] == "subscribed"
    assert await error_for({"op": "subscribe", "id": "s0", "topic": "ticks"}) == "duplicate_id"
    assert await error_for({"op": "subscribe", "id": "s9", "topic": "ticks"}) \
        == "too_many_subscriptions"
    assert (await client.request({"op": "unsubscribe", "id": "s1"}, "unsubscribed"))["op"] \
        == "unsubscribed"
    assert (await client.request({"op": "ping", "id": "p"}, "pong"))["op"] == "pong"

    client.sendMessage(b"\x00\x01", isBinary=True)
    await eventually(lambda: client.of("error")[-1]["message"].startswith("binary"), 2)
    assert client.close_code is None
    assert quiet.service.broadcaster.subscriptions == 2


@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_with_1009(quiet):
    """A message over --max-message-size closes the connection with 1009."""
    client = await connect(quiet.port, hello={"user": "big"})
    client.send({"op": "ping", "id": "x", "pad": "y" * 2000})
    code, _ = await client.closed
    assert code == 1009
    await eventually(lambda: not quiet.service.gateway.connections, 2, "connection forgotten")


@pytest_twisted.ensureDeferred
async def test_no_hello_in_time_closes_with_1008(quiet):
    """A client that never says hello is closed with 1008 after --hello-timeout."""
    client = await connect(quiet.port)
    code, reason = await client.closed
    assert code == 1008 and "hello" in reason


@pytest_twisted.ensureDeferred
async def test_a_handshake_that_never_finishes_is_dropped(daemons):
    """
    Slowloris: a connection that sends part of its upgrade request and then
    nothing is closed by the server after --handshake-timeout, while an
    open WebSocket next to it stays.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import ClientFactory, Protocol

    daemon = daemons(sim_rate=0, handshake_timeout=0.5, ws_ping_interval=0)
    client = await connect(daemon.port, hello={"user": "steady"})
    lost: Deferred[None] = Deferred()

    class Slow(Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")

        def connectionLost(self, reason: object) -> None:
            lost.callback(None)

    factory = ClientFactory()
    factory.protocol = Slow
    connector = reactor.connectTCP("127.0.0.1", daemon.port, factory)
    timer = reactor.callLater(10, connector.disconnect)  # the deadline: then the test fails
    await lost
    assert timer.active(), "the server kept the half-sent handshake open for 10 s"
    timer.cancel()
    assert client.close_code is None
    assert (await client.request({"op": "ping", "id": "p"}, "pong"))["op"] == "pong"


@pytest_twisted.ensureDeferred
async def test_idle_websocket_outlives_the_http_timeout(daemons):
    """
    The Site timeout (--handshake-timeout) bounds the HTTP request before the
    upgrade only: an idle, upgraded WebSocket stays open past it.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    daemon = daemons(sim_rate=0, handshake_timeout=0.3, ws_ping_interval=0)
    client = await connect(daemon.port, hello={"user": "idle"})
    await deferLater(reactor, 1.0, lambda: None)
    assert client.close_code is None
    assert (await client.request({"op": "ping", "id": "p"}, "pong"))["op"] == "pong"


@pytest_twisted.ensureDeferred
async def test_cross_origin_handshake_is_refused(daemons):
    """A browser page from another origin cannot open the socket; the same origin can."""
    daemon = daemons(sim_rate=0)
    with pytest.raises(ConnectionError, match="403"):
        await connect(daemon.port, origin="http://evil.example:80")
    with pytest.raises(ConnectionError, match="403"):
        await connect(daemon.port, origin="null")
    same = await connect(daemon.port, origin=f"http://127.0.0.1:{daemon.port}", hello={"user": "x"})
    assert same.of("welcome")


@pytest_twisted.ensureDeferred
async def test_allowlisted_origin(daemons):
    """With --allowed-origins only the listed origins (with ports) are accepted."""
    daemon = daemons(sim_rate=0, allowed_origins="https://app.example.com")
    ok = await connect(daemon.port, origin="https://app.example.com:443", hello={"user": "x"})
    assert ok.of("welcome")
    with pytest.raises(ConnectionError, match="403"):
        await connect(daemon.port, origin=f"http://127.0.0.1:{daemon.port}")


@pytest_twisted.ensureDeferred
async def test_security_headers_on_every_response(daemons):
    """The page, probes and 404s all carry a CSP without unsafe-inline and nosniff."""
    from twisted.internet import reactor
    from twisted.web.client import Agent

    daemon = daemons(sim_rate=0)
    for path in ("/", "/app.js", "/health", "/no-such-file"):
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{daemon.port}{path}".encode())
        csp = response.headers.getRawHeaders(b"content-security-policy")[0]
        assert b"script-src 'self'" in csp and b"unsafe-inline" not in csp
        assert b"frame-ancestors 'none'" in csp
        assert response.headers.getRawHeaders(b"x-content-type-options") == [b"nosniff"]
        await read_body(response)


@pytest_twisted.ensureDeferred
async def test_embedded_demo_serves_page_health_and_live_events(daemons):
    """
    With no options the daemon serves the page, /health and /ready, and the
    built-in simulator's events reach a subscriber, with backtest jobs
    answered by progress then a result.
    """
    daemon = daemons(sim_rate=200, sim_symbols=3)
    status, body = await http_get(daemon.port, "/")
    assert status == 200 and b"<html" in body.lower()
    assert b"<script>" not in body and b"onclick" not in body.lower()
    status, health = await http_get(daemon.port, "/health")
    assert status == 200 and health["status"] == "ok"
    status, ready = await http_get(daemon.port, "/ready")
    assert status == 200 and ready["components"]["source"]["state"] == "embedded"

    client = await connect(daemon.port, hello={"user": "demo"})
    await client.request({"op": "subscribe", "id": "t", "topic": "ticks"}, "subscribed")
    await client.request({"op": "subscribe", "id": "b", "topic": "backtests"}, "subscribed")
    job = await client.request({"op": "submit_backtest", "id": "r", "params": {
        "symbols": ["AAPL"], "start_date": "2024-01-02", "end_date": "2024-06-28"}}, "job_accepted")
    await eventually(lambda: len(client.events("t")) >= 10, 5, "ticks")
    await eventually(lambda: any(e["type"] == "backtest_result" for e in client.events("b")), 10,
                     "result")
    progress = [e["data"]["progress"] for e in client.events("b")
                if e["type"] == "backtest_progress"]
    assert progress == [0.25, 0.5, 0.75, 1.0]
    result = client.events("b")[-1]["data"]
    assert result["job_id"] == job["job_id"] and 0 <= result["results"]["win_rate"] <= 1
    assert orjson.dumps(result)


@pytest_twisted.ensureDeferred
async def test_shutdown_closes_clients_with_1001_and_stops_accepting(daemons):
    """
    Stopping the daemon (SIGTERM, twistd stop) closes the port, tells every
    client 1001 so it reconnects elsewhere, and finishes within the grace time.
    """
    from twisted.internet import reactor

    daemon = daemons(sim_rate=0)
    clients = [await connect(daemon.port, hello={"user": f"u{n}"}) for n in range(3)]
    started = reactor.seconds()
    await daemon.service.stopService()
    assert reactor.seconds() - started < 3.5
    for client in clients:
        code, reason = await client.closed
        assert code == 1001 and "reconnect" in reason
    with pytest.raises(error.ConnectionRefusedError):
        await connect(daemon.port)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_answering_pings_is_removed(daemons):
    """
    A client that no longer answers WebSocket pings (here: it stopped reading
    its socket) is dropped after --ws-ping-timeout, forgotten with its
    subscriptions, and counted; a live client on the same daemon stays.

    Real socket and short intervals rather than Clock: Autobahn's timers run
    on txaio's process-wide loop, which a test must not replace.
    """
    daemon = daemons(sim_rate=0, ws_ping_interval=0.5, ws_ping_timeout=1.0)
    alive = await connect(daemon.port, hello={"user": "alive"})
    dead = await connect(daemon.port, hello={"user": "dead"})
    await dead.request({"op": "subscribe", "id": "s", "topic": "patterns"}, "subscribed")
    dead.transport.pauseProducing()
    gateway = daemon.service.gateway
    await eventually(lambda: gateway.heartbeat_timeouts == 1, 5, "heartbeat timeout")
    await eventually(lambda: len(gateway.connections) == 1, 2, "dead client forgotten")
    assert daemon.service.broadcaster.subscriptions == 0
    assert alive.close_code is None
    assert (await alive.request({"op": "ping", "id": "p"}, "pong"))["op"] == "pong"
    dead.transport.resumeProducing()


async def _api(port: int, method: bytes, origin: bytes,
               preflight: bool = False) -> tuple[int, object]:
    from twisted.internet import reactor
    from twisted.web.client import Agent
    from twisted.web.http_headers import Headers

    headers = Headers({b"origin": [origin]})
    if preflight:
        headers.addRawHeader(b"access-control-request-method", b"GET")
        headers.addRawHeader(b"access-control-request-headers", b"authorization")
    response = await Agent(reactor).request(
        method, f"http://127.0.0.1:{port}/api/symbols".encode(), headers)
    await read_body(response)
    return response.code, response.headers


@pytest_twisted.ensureDeferred
async def test_cors_is_off_unless_origins_are_listed(daemons):
    """
    By default no answer names any other origin, and a preflight is refused
    (405); with --cors-origins, a listed origin gets its preflight (204) and
    its answers marked readable, an unlisted one still nothing.
    """
    off = daemons(sim_rate=0)
    code, headers = await _api(off.port, b"GET", b"https://app.example.com")
    assert code == 200 and not headers.hasHeader(b"access-control-allow-origin")
    code, headers = await _api(off.port, b"OPTIONS", b"https://app.example.com", preflight=True)
    assert code == 405 and not headers.hasHeader(b"access-control-allow-origin")

    on = daemons(sim_rate=0, cors_origins="https://app.example.com")
    code, headers = await _api(on.port, b"OPTIONS", b"https://app.example.com", preflight=True)
    assert code == 204
    assert headers.getRawHeaders(b"access-control-allow-origin") == [b"https://app.example.com"]
    assert b"authorization" in headers.getRawHeaders(b"access-control-allow-headers")[0]
    code, headers = await _api(on.port, b"GET", b"https://app.example.com")
    assert code == 200
    assert headers.getRawHeaders(b"access-control-allow-origin") == [b"https://app.example.com"]
    code, headers = await _api(on.port, b"GET", b"https://evil.example")
    assert code == 200 and not headers.hasHeader(b"access-control-allow-origin")
