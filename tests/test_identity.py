"""
Identity providers (docs/security.md "Identity providers"), end to end: a
real daemon in the test reactor verifies tokens signed with real RSA, EC
and Ed25519 keys published by a real HTTP JWKS endpoint (a twisted.web Site
on loopback whose document and answers the test changes), refreshes tokens
in band without disturbing delivery, warns and closes at expiry, and
enforces the permissions claim on the WebSocket and on REST.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.conftest import TEST_SECRET
from tests.test_end_to_end import Steady, pattern, publish, ready
from tests.test_resume import PATTERNS
from tests.wsclient import RecordingClient, connect, eventually, http_get, http_request

# Helpers: keys, tokens and the provider's JWKS endpoint.


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Key:
    """A signing key of the provider: its private half, kid and algorithm."""

    kid: str
    private: Any
    alg: str

    @classmethod
    def rsa(cls, kid: str | None = None) -> Key:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(kid or f"rsa-{uuid.uuid4().hex[:8]}", private, "RS256")

    @classmethod
    def ec(cls, kid: str | None = None) -> Key:
        return cls(kid or f"ec-{uuid.uuid4().hex[:8]}", ec.generate_private_key(ec.SECP256R1()),
                   "ES256")

    @classmethod
    def ed25519(cls, kid: str | None = None) -> Key:
        return cls(kid or f"ed-{uuid.uuid4().hex[:8]}", ed25519.Ed25519PrivateKey.generate(),
                   "EdDSA")

    def jwk(self) -> dict[str, Any]:
        """The public half as a JWK, as a provider publishes it."""
        exporter = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[self.alg]
        jwk: dict[str, Any] = exporter.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, sub: str, ttl: float = 3600, exp: int | None = None, **claims: Any) -> str:
        body = {"sub": sub, "iat": int(time.time()),
                "exp": exp if exp is not None else int(time.time() + ttl), **claims}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})


def handmade(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand: HMAC-SHA256 signed with C{secret}, or with no signature."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


class _Document(Resource):
    isLeaf = True

    def __init__(self, provider: Provider) -> None:
        super().__init__()
        self.provider = provider

    def render_GET(self, request: Any) -> bytes:
        self.provider.requests.append(time.time())
        request.setResponseCode(self.provider.status)
        request.setHeader(b"content-type", b"application/json")
        return orjson.dumps({"keys": [key.jwk() for key in self.provider.keys]})


class Provider:
    """
    An identity provider's JWKS endpoint on a free loopback port: it
    publishes C{keys}, answers C{status}, and records when it was asked.
    """

    def __init__(self, *keys: Key) -> None:
        self.keys = list(keys)
        self.status = 200
        self.requests: list[float] = []
        root = Resource()
        root.putChild(b"certs", _Document(self))
        self.port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/certs"
        self.listening = True

    def stop(self) -> Deferred[None]:
        """Stop listening: the provider is down, connections are refused."""
        self.listening = False
        return self.port.stopListening()


@pytest.fixture
def provider() -> Iterator[Provider]:
    """A provider publishing one RSA, one EC P-256 and one Ed25519 key."""
    server = Provider(Key.rsa(), Key.ec(), Key.ed25519())
    yield server
    if server.listening:
        pytest_twisted.blockon(server.stop())


async def welcomed(port: int, token: str) -> RecordingClient:
    """A client whose hello with C{token} was welcomed."""
    return await connect(port, hello={"token": token})


async def refused(port: int, token: str) -> tuple[dict[str, Any], int | None]:
    """The reply to a hello with C{token}, and the close code that follows it."""
    client = await connect(port)
    reply = await client.request({"op": "hello", "id": "h", "token": token}, "welcome")
    code, _ = await client.closed
    return reply, code


def jwks_status(daemon: Any) -> dict[str, Any]:
    return daemon.service.readiness()[1]["components"]["jwks"]


# The tests.


@pytest_twisted.ensureDeferred
async def test_provider_keys_of_every_kind_are_accepted_and_an_unknown_one_is_not(
        redis_server: Any, daemons: Any, provider: Provider) -> None:
    """
    RS256, ES256 and EdDSA tokens signed by keys of the provider's JWKS are
    welcomed as their C{sub} (an Auth0-style and a UUID one included); a
    token signed by a key the JWKS does not have, under a kid it does not
    name, is refused C{unauthorized} and closed 1008, after one refetch.
    """
    daemon = daemons(redis=redis_server.url, jwt_jwks_url=provider.url)
    await ready(daemon)
    assert jwks_status(daemon)["state"] == "fresh" and jwks_status(daemon)["keys"] == 3
    users = ["auth0|5f1c2d", str(uuid.uuid4()), "carol@example.com"]
    for key, user in zip(provider.keys, users, strict=True):
        client = await connect(daemon.port)
        reply = await client.request({"op": "hello", "id": "h", "token": key.token(user)},
                                     "welcome")
        assert (reply["op"], reply["user"]) == ("welcome", user), (key.alg, reply)
        client.sendClose()

    stranger = Key.rsa()
    reply, code = await refused(daemon.port, stranger.token("auth0|5f1c2d"))
    assert reply["code"] == "unauthorized" and code == 1008
    assert reply["message"] == "invalid token: signed by an unknown key"
    assert len(provider.requests) == 2 and jwks_status(daemon)["refetches"] == 1


@pytest_twisted.ensureDeferred
async def test_a_rotated_key_is_taken_at_once_and_the_dropped_one_refused(
        redis_server: Any, daemons: Any) -> None:
    """
    The provider publishes a new key and drops the old one. A token naming
    the new kid is welcomed at once: its unknown kid makes the daemon fetch
    the JWKS again while the hello waits. That fetch also dropped the old
    key, so a token naming the old kid is then refused - with no wait for
    REFETCH_MIN: a refetch was just done, so none is tried, and the daemon
    answers from the keys it has. A client welcomed under the old key
    before the rotation stays connected (its token holds until it expires).
    """
    old, new = Key.rsa("2024-old"), Key.ec("2025-new")
    provider = Provider(old)
    try:
        daemon = daemons(redis=redis_server.url, jwt_jwks_url=provider.url)
        await ready(daemon)
        before = await welcomed(daemon.port, old.token("alice"))

        provider.keys = [new]
        client = await welcomed(daemon.port, new.token("alice"))
        assert len(provider.requests) == 2 and jwks_status(daemon)["keys"] == 1

        reply, code = await refused(daemon.port, old.token("alice"))
        assert (reply["code"], code) == ("unauthorized", 1008)
        assert reply["message"] == "invalid token: signed by an unknown key"
        assert len(provider.requests) == 2
        pong = await before.request({"op": "ping", "id": "p"}, "pong")
        assert pong["op"] == "pong" and before.close_code is None and client.close_code is None
    finally:
        await provider.stop()


@pytest.mark.parametrize("outage", ["http 500", "connection refused"])
@pytest_twisted.ensureDeferred
async def test_the_cached_keys_are_used_while_the_provider_is_down(
        redis_server: Any, daemons: Any, provider: Provider, outage: str) -> None:
    """
    After a good fetch the provider fails (answers 500, or stops listening).
    A token naming an unknown kid forces a fetch, which fails, so that token
    is refused; tokens signed by the cached keys are still welcomed; /ready
    stays 200 with components.jwks "stale" and the error, and /metrics has
    the jwks dependency down in state "stale".
    """
    daemon = daemons(redis=redis_server.url, jwt_jwks_url=provider.url)
    await ready(daemon)
    if outage == "http 500":
        provider.status = 500
    else:
        await provider.stop()

    reply, code = await refused(daemon.port, Key.ed25519().token("alice"))
    assert (reply["code"], code) == ("unauthorized", 1008)
    for key in provider.keys:
        await welcomed(daemon.port, key.token("alice"))

    status, body = await http_get(daemon.port, "/ready")
    jwks = body["components"]["jwks"]
    assert status == 200 and body["ready"] is True, body
    assert jwks["state"] == "stale" and jwks["keys"] == 3, jwks
    assert jwks["fetches"] == 2 and jwks["failures"] == 1 and jwks["refetches"] == 1
    assert jwks["error"] and (outage != "http 500" or jwks["error"] == "HTTP 500"), jwks
    assert isinstance(jwks["age_s"], float) and jwks["age_s"] >= 0
    status, metrics = await http_get(daemon.port, "/metrics")
    assert status == 200
    assert b'tickstock_dependency_up{component="jwks",state="stale"} 0.0' in metrics


@pytest_twisted.ensureDeferred
async def test_algorithm_confusion_and_alg_none_are_refused(
        redis_server: Any, daemons: Any, provider: Provider) -> None:
    """
    Each key's algorithm is pinned: an HS256 token whose kid names the RSA
    key and whose HMAC secret is that key's public PEM (which anyone can
    download) is refused, and so is one HMAC-signed with the daemon's own
    HS256 secret but naming the RSA key; an C{alg: none} token naming a
    valid kid is refused. A correctly signed RS256 token with the same
    claims is welcomed, so the refusals are about the signature alone.
    """
    daemon = daemons(redis=redis_server.url, jwt_jwks_url=provider.url)
    await ready(daemon)
    rsa_key = provider.keys[0]
    claims = {"sub": "alice", "exp": int(time.time()) + 3600}
    hs256 = {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}
    attacks = {
        "public key as HMAC secret": handmade(hs256, claims, rsa_key.public_pem()),
        "server secret with an RSA kid": handmade(hs256, claims, TEST_SECRET),
        "alg none": handmade({"alg": "none", "typ": "JWT", "kid": rsa_key.kid}, claims, None),
    }
    for name, token in attacks.items():
        reply, code = await refused(daemon.port, token)
        assert (reply["code"], code) == ("unauthorized", 1008), (name, reply)
    await welcomed(daemon.port, jwt.encode(claims, rsa_key.private, algorithm="RS256",
                                           headers={"kid": rsa_key.kid}))
    # The daemon's own secret still works where the token names no kid.
    await welcomed(daemon.port, handmade({"alg": "HS256", "typ": "JWT"}, claims, TEST_SECRET))


@pytest_twisted.ensureDeferred
async def test_refreshing_keeps_subscriptions_and_every_event(
        redis_server: Any, daemons: Any, provider: Provider) -> None:
    """
    A client subscribed to patterns while events are published every 20 ms
    refreshes its token six times, with tokens of every key kind: each is
    answered C{refreshed} with the new token's C{expires_in}, and the client
    gets every event exactly once, in order. A refresh with a token for
    another user, or an expired one, is refused C{unauthorized} and the
    connection stays and keeps receiving.
    """
    daemon = daemons(redis=redis_server.url, jwt_jwks_url=provider.url)
    await ready(daemon)
    client = await welcomed(daemon.port, provider.keys[0].token("alice", ttl=600))
    await client.request({"op": "subscribe", "id": "p", "topic": "patterns",
                          "filter": {"symbols": ["ZZZ"]}}, "subscribed")
    async def more_events() -> None:
        seen = len(client.events("p"))
        await eventually(lambda: len(client.events("p")) >= seen + 3, 5, "events flowing")

    steady = Steady(redis_server)
    try:
        for n in range(6):
            await more_events()
            ttl = 1200 + 100 * n
            token = provider.keys[n % 3].token("alice", ttl=ttl)
            reply = await client.request({"op": "refresh", "id": f"r{n}", "token": token},
                                         "refreshed")
            assert reply["op"] == "refreshed", reply
            assert ttl - 5 <= reply["expires_in"] <= ttl + 10, reply
        for name, token in (("another user", provider.keys[1].token("mallory")),
                            ("expired", provider.keys[2].token("alice", ttl=-3600))):
            await more_events()
            reply = await client.request({"op": "refresh", "id": "bad", "token": token},
                                         "refreshed")
            assert reply["code"] == "unauthorized", (name, reply)
        assert reply["message"] == "token expired"
        assert client.of("error")[0]["message"] == "a refreshed token must be for the same user"
        await more_events()
    finally:
        steady.stop()

    total = steady.sent
    await eventually(lambda: len(client.events("p")) == total, 10, "every event")
    assert [e["data"]["n"] for e in client.events("p")] == list(range(total))
    assert client.close_code is None and len(client.of("error")) == 2


@pytest_twisted.ensureDeferred
async def test_an_expiring_token_is_warned_then_closed_unless_refreshed(
        redis_server: Any, daemons: Any, provider: Provider) -> None:
    """
    With no leeway, two clients say hello with tokens expiring in 4 s: each
    is told C{token_expiring} at once (less than WARN_BEFORE is left). The
    one that does nothing is closed 1008 "token expired"; the one that
    refreshes in time is still connected and answering once the old
    token's expiry has passed.
    """
    daemon = daemons(redis=redis_server.url, jwt_jwks_url=provider.url, jwt_leeway=0)
    await ready(daemon)
    exp = int(time.time()) + 4
    key = provider.keys[1]
    idle = await welcomed(daemon.port, key.token("alice", exp=exp))
    careful = await welcomed(daemon.port, key.token("bob", exp=exp))
    for client in (idle, careful):
        await eventually(lambda c=client: c.of("token_expiring"), 5, "token_expiring")
        warning = client.of("token_expiring")[0]
        assert warning == {"op": "token_expiring", "in": warning["in"]}
        assert 0 <= warning["in"] <= 4

    reply = await careful.request({"op": "refresh", "id": "r", "token": key.token("bob")},
                                  "refreshed")
    assert reply["op"] == "refreshed" and reply["expires_in"] > 3000

    await eventually(lambda: idle.close_code is not None, 15, "the idle client closed")
    code, reason = await idle.closed
    assert (code, reason) == (1008, "token expired")
    await eventually(lambda: time.time() > exp + 1, 5, "past the old token's expiry")
    pong = await careful.request({"op": "ping", "id": "p"}, "pong")
    assert pong["op"] == "pong" and careful.close_code is None
    assert len(careful.of("token_expiring")) == 1


@pytest_twisted.ensureDeferred
async def test_the_permissions_claim_limits_topics_universes_and_backtests(
        redis_server: Any, daemons: Any, provider: Provider) -> None:
    """
    A token whose C{tickstock} claim allows topic patterns by universe
    "mine" only and no backtests: ticks, another universe, explicit symbols
    and backtests are C{forbidden} on the WebSocket, the connection staying
    and its allowed subscription receiving; on REST /api/ohlcv (ticks), a
    backtest and another universe are 403 while /api/patterns and its own
    universe are not. A token without the claim subscribes to ticks. A
    refresh to a token allowing only ticks ends the patterns subscription
    with C{forbidden}.
    """
    daemon = daemons(redis=redis_server.url, jwt_jwks_url=provider.url)
    await ready(daemon)
    daemon.service.store.set_universe("mine", "etf_universe", ["ZZZ"])
    key = provider.keys[0]
    limited = {"topics": ["patterns"], "backtests": False, "universes": ["mine"]}
    token = key.token("alice", tickstock=limited)
    client = await welcomed(daemon.port, token)
    reply = await client.request({"op": "subscribe", "id": "ok", "topic": "patterns",
                                  "filter": {"universe": "mine"}}, "subscribed")
    assert reply["op"] == "subscribed", reply

    refusals = {
        "ticks": {"op": "subscribe", "id": "t", "topic": "ticks"},
        "other universe": {"op": "subscribe", "id": "u", "topic": "patterns",
                           "filter": {"universe": "etf_growth"}},
        "symbols": {"op": "subscribe", "id": "s", "topic": "patterns",
                    "filter": {"symbols": ["ZZZ"]}},
        "universe and symbols": {"op": "subscribe", "id": "us", "topic": "patterns",
                                 "filter": {"universe": "mine", "symbols": ["AAPL"]}},
        "backtest": {"op": "submit_backtest", "id": "b", "params": {
            "symbols": ["ZZZ"], "start_date": "2024-01-02", "end_date": "2024-03-01"}},
    }
    for name, message in refusals.items():
        reply = await client.request(message, "subscribed")
        assert reply["code"] == "forbidden", (name, reply)
    assert client.of("error")[0]["message"] == "your token does not allow the topic 'ticks'"
    publish(redis_server, PATTERNS, pattern("ZZZ", n=1))
    await eventually(lambda: client.events("ok"), 5, "the allowed subscription's event")
    assert client.close_code is None

    for method, path, body, expected in (
            (b"GET", "/api/ohlcv/AAA", None, 403),
            (b"POST", "/api/jobs", {"symbols": ["ZZZ"], "start_date": "2024-01-02",
                                    "end_date": "2024-03-01", "patterns": []}, 403),
            (b"GET", "/api/universes/etf_growth", None, 403),
            (b"GET", "/api/universes/mine", None, 200),
            (b"GET", "/api/patterns", None, 200)):
        status, answer, _ = await http_request(daemon.port, method, path, token, body)
        assert status == expected, (path, answer)
        if expected == 403:
            assert answer["error"]["code"] == "forbidden", answer

    free = await welcomed(daemon.port, key.token("bob"))
    reply = await free.request({"op": "subscribe", "id": "t", "topic": "ticks"}, "subscribed")
    assert reply["op"] == "subscribed", reply

    errors = len(client.of("error"))
    reply = await client.request({"op": "refresh", "id": "r", "token": key.token(
        "alice", tickstock={"topics": ["ticks"]})}, "refreshed")
    assert reply["op"] == "refreshed", reply
    await eventually(lambda: len(client.of("error")) > errors, 5, "the subscription ended")
    ended = client.of("error")[-1]
    assert (ended["id"], ended["code"]) == ("ok", "forbidden"), ended
    reply = await client.request({"op": "unsubscribe", "id": "ok"}, "unsubscribed")
    assert reply["code"] == "unknown_subscription"


@pytest_twisted.ensureDeferred
async def test_a_jwks_file_is_a_provider_too(redis_server: Any, daemons: Any,
                                             tmp_path: Any) -> None:
    """
    --jwt-jwks-url given a file path: the keys it holds verify tokens
    (an RS256 one is welcomed as its sub); a key not in it does not.
    """
    key = Key.rsa()
    path = tmp_path / "jwks.json"
    path.write_bytes(orjson.dumps({"keys": [key.jwk()]}))
    daemon = daemons(redis=redis_server.url, jwt_jwks_url=str(path))
    await ready(daemon)
    client = await welcomed(daemon.port, key.token("auth0|file"))
    assert client.of("welcome")[0]["user"] == "auth0|file"
    reply, code = await refused(daemon.port, Key.rsa().token("auth0|file"))
    assert (reply["code"], code) == ("unauthorized", 1008)


@pytest_twisted.ensureDeferred
async def test_a_socketio_client_refreshes_its_token_with_an_ack(
        redis_server: Any, daemons: Any, provider: Provider) -> None:
    """
    The official python-socketio client (in a thread: it blocks) connects
    to /socket.io/ with an RS256 token as its CONNECT auth, then emits
    C{refresh} with a new token and an acknowledgement: the ack is
    C{refreshed} with the new token's C{expires_in}; a token for another
    user is acknowledged with C{unauthorized} and the session stays.
    """
    import socketio
    from twisted.internet.threads import deferToThread

    daemon = daemons(redis=redis_server.url, jwt_jwks_url=provider.url)
    await ready(daemon)
    key = provider.keys[0]
    first, second = key.token("auth0|sio", ttl=600), key.token("auth0|sio", ttl=2400)
    other = provider.keys[2].token("mallory")

    def exchange() -> tuple[Any, Any, bool]:
        sio = socketio.Client(reconnection=False)
        sio.connect(f"http://127.0.0.1:{daemon.port}", auth={"token": first, "offsets": False},
                    transports=["websocket"], wait_timeout=10)
        try:
            refreshed = sio.call("refresh", {"token": second}, timeout=10)
            wrong = sio.call("refresh", other, timeout=10)
            return refreshed, wrong, sio.connected
        finally:
            sio.disconnect()

    refreshed, wrong, connected = await deferToThread(exchange)
    assert refreshed["op"] == "refreshed" and refreshed["id"] is None, refreshed
    assert 2300 <= refreshed["expires_in"] <= 2410, refreshed
    assert (wrong["op"], wrong["id"], wrong["code"]) == ("error", None, "unauthorized"), wrong
    assert connected
