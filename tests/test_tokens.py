"""
Tokens from an identity provider, part by part: the JWKS key set read from
a real file (time from a L{Clock}), the authenticator over it with real
RSA, EC and Ed25519 keys, and the gateway's refresh, expiry warning and
permissions against a recording fake connection. Over real sockets and a
real HTTP provider: tests/test_identity.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tests.conftest import TEST_SECRET
from tests.test_units import RecordingClient, make_gateway
from tickstock.connections import jwks as jwks_module
from tickstock.connections.jwks import JWKS, check_source, parse_jwks
from tickstock.deliver.auth import (
    Identity,
    JWTAuthenticator,
    Permissions,
    identify,
    parse_permissions,
)
from tickstock.deliver.gateway import WARN_BEFORE
from tickstock.domain.errors import BadRequest
from tickstock.domain.interfaces import IKeySet

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def public_jwk(private: Any, kid: str, **extra: Any) -> dict[str, Any]:
    """The JWK of C{private}'s public key, as a provider publishes it."""
    public = private.public_key()
    if isinstance(private, rsa.RSAPrivateKey):
        jwk, alg = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True), "RS256"
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        jwk, alg = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True), "ES256"
    else:
        jwk, alg = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True), "EdDSA"
    return {**jwk, "kid": kid, "alg": alg, "use": "sig", **extra}


def signed(private: Any, kid: str | None, algorithm: str, user: str = "alice",
           ttl: float = 600, **claims: Any) -> str:
    headers = {} if kid is None else {"kid": kid}
    body = {"sub": user, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(body, private, algorithm=algorithm, headers=headers)


class KeyFile:
    """A JWKS document in a file the test rewrites, and the key set reading it."""

    def __init__(self, tmp_path: Path, *keys: dict[str, Any]) -> None:
        self.path = tmp_path / "jwks.json"
        self.write(*keys)
        self.clock = Clock()
        self.clock.advance(1000)
        self.keys = JWKS(self.clock, str(self.path), period=300)
        self.keys.startService()

    def write(self, *keys: dict[str, Any]) -> None:
        self.path.write_text(json.dumps({"keys": list(keys)}))


@pytest.fixture
def provider(tmp_path: Path) -> Any:
    files = KeyFile(tmp_path, public_jwk(RSA_KEY, "rsa-1"), public_jwk(EC_KEY, "ec-1"),
                    public_jwk(ED_KEY, "ed-1"))
    yield files
    files.keys.stopService()


def checked(auth: JWTAuthenticator, token: str) -> Identity:
    """The identity C{auth} finds in C{token}, or the L{BadRequest} it refuses it with."""
    results: list[Any] = []
    identify(auth, {"token": token}).addBoth(results.append)
    assert len(results) == 1, "answered at once: the keys are read from a file"
    if isinstance(results[0], Identity):
        return results[0]
    raise results[0].value


def test_the_key_set_provides_its_interface(provider: Any) -> None:
    """verifyObject: the gateway's authenticator and /ready rely on IKeySet."""
    verifyObject(IKeySet, provider.keys)


def test_rsa_ec_and_ed25519_tokens_are_checked_with_their_keys(provider: Any) -> None:
    """Each key verifies tokens of its own algorithm; the leeway extends the expiry."""
    auth = JWTAuthenticator(keys=provider.keys, leeway=10)
    for private, kid, alg in ((RSA_KEY, "rsa-1", "RS256"), (EC_KEY, "ec-1", "ES256"),
                              (ED_KEY, "ed-1", "EdDSA")):
        identity = checked(auth, signed(private, kid, alg, user="auth0|u-1"))
        assert identity.user == "auth0|u-1"
        assert identity.expires_at == pytest.approx(time.time() + 610, abs=3)
        assert identity.permissions is None


@pytest.mark.parametrize("make, reason", [
    # The RSA key's kid, but signed by the EC key.
    (lambda: signed(EC_KEY, "rsa-1", "ES256"), "alg value is not allowed"),
    # alg confusion: HMAC keyed with the RSA public key's PEM, naming the RSA key.
    (lambda: jwt.api_jws.PyJWS().encode(
        json.dumps({"sub": "alice", "exp": int(time.time() + 600)}).encode(),
        "x" * 40, algorithm="HS256", headers={"kid": "rsa-1"}), "alg value is not allowed"),
    (lambda: jwt.encode({"sub": "alice", "exp": int(time.time() + 600)}, None,
                        algorithm="none", headers={"kid": "rsa-1"}), "alg value is not allowed"),
    (lambda: signed(RSA_KEY, None, "RS256"), "names no signing key"),
    (lambda: signed(RSA_KEY, "rsa-1", "RS256", ttl=-60), "token expired"),
    (lambda: signed(rsa.generate_private_key(public_exponent=65537, key_size=2048), "rsa-1",
                    "RS256"), "Signature verification failed"),
    (lambda: signed(RSA_KEY, "rsa-1", "RS256", tickstock="all"), "must be an object"),
    (lambda: signed(RSA_KEY, "rsa-1", "RS256", tickstock={"topics": "ticks"}),
     "tickstock.topics must be a list"),
])
def test_tokens_a_key_set_refuses(provider: Any, make: Any, reason: str) -> None:
    """Wrong key, algorithm confusion, no kid among several keys, expiry, a bad claim."""
    auth = JWTAuthenticator(keys=provider.keys, permissions_claim="tickstock")
    with pytest.raises(BadRequest) as raised:
        checked(auth, make())
    assert raised.value.code == "unauthorized"
    assert reason in str(raised.value)


def test_hs256_tokens_still_work_beside_the_key_set(provider: Any) -> None:
    """With a secret too, an HS256 token without kid is checked with the secret, alone."""
    auth = JWTAuthenticator(TEST_SECRET, keys=provider.keys)
    assert checked(auth, JWTAuthenticator(TEST_SECRET).mint("bob", time.time(), 60)).user == "bob"
    forged = JWTAuthenticator(b"y" * 40).mint("bob", time.time(), 60)
    with pytest.raises(BadRequest, match="Signature verification failed"):
        checked(auth, forged)


def test_an_unknown_kid_fetches_the_keys_again_at_most_every_ten_seconds(provider: Any) -> None:
    """
    A rotated key (new kid) is found by fetching again at once; a token
    naming a kid still unknown does not fetch again within REFETCH_MIN, so
    made-up kids cannot make TickStock hammer the provider.
    """
    auth = JWTAuthenticator(keys=provider.keys)
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    provider.write(public_jwk(new, "rsa-2"))
    assert checked(auth, signed(new, "rsa-2", "RS256")).user == "alice"
    assert provider.keys.status()["refetches"] == 1
    with pytest.raises(BadRequest, match="unknown key"):
        checked(auth, signed(RSA_KEY, "rsa-1", "RS256"))  # dropped with the rotation
    with pytest.raises(BadRequest, match="unknown key"):
        checked(auth, signed(new, "made-up", "RS256"))
    assert provider.keys.status()["refetches"] == 1
    provider.clock.advance(jwks_module.REFETCH_MIN)
    with pytest.raises(BadRequest, match="unknown key"):
        checked(auth, signed(new, "made-up", "RS256"))
    assert provider.keys.status()["refetches"] == 2


def test_the_last_good_keys_stay_while_the_provider_fails(provider: Any) -> None:
    """
    A failed fetch keeps the keys and says so (state stale, the error), is
    retried every RETRY seconds however long the period, and is over once a
    fetch succeeds again.
    """
    auth = JWTAuthenticator(keys=provider.keys)
    assert provider.keys.status()["state"] == "fresh"
    provider.path.write_text("<html>bad gateway</html>")
    provider.clock.advance(300)
    status = provider.keys.status()
    assert (status["state"], status["keys"], status["failures"]) == ("stale", 3, 1)
    assert "not JSON" in status["error"] and status["age_s"] == 300
    assert provider.keys.ready
    assert checked(auth, signed(EC_KEY, "ec-1", "ES256")).user == "alice"
    provider.clock.advance(jwks_module.RETRY)
    assert provider.keys.status()["failures"] == 2
    provider.write(public_jwk(EC_KEY, "ec-1"))
    provider.clock.advance(jwks_module.RETRY)
    status = provider.keys.status()
    assert (status["state"], status["keys"], status["error"]) == ("fresh", 1, None)


def test_a_key_set_with_no_key_yet_is_not_ready(tmp_path: Path) -> None:
    """Before the first good fetch nothing can be verified: /ready says empty."""
    clock = Clock()
    keys = JWKS(clock, str(tmp_path / "missing.json"), period=300)
    keys.startService()
    assert not keys.ready and keys.status()["state"] == "empty"
    assert "cannot read it" in keys.status()["error"]
    keys.stopService()
    assert clock.getDelayedCalls() == []


def test_only_public_signing_keys_are_taken_from_a_document() -> None:
    """Symmetric (oct) keys, encryption keys and unknown key types are left out."""
    keys = parse_jwks(json.dumps({"keys": [
        public_jwk(RSA_KEY, "sig"), public_jwk(RSA_KEY, "enc", use="enc"),
        {"kty": "oct", "k": "c2VjcmV0", "kid": "oct", "alg": "HS256"},
        {"kty": "XYZ", "kid": "odd"}, "not a key"]}).encode())
    assert list(keys) == ["sig"] and keys["sig"].algorithm_name == "RS256"
    for document in (b"{}", b"[]", b'{"keys": []}', b"nope"):
        with pytest.raises(ValueError):
            parse_jwks(document)


@pytest.mark.parametrize("source, ok", [
    ("https://idp.example.com/certs", True), ("http://127.0.0.1:8080/certs", True),
    ("http://localhost/certs", True), ("http://idp.example.com/certs", False),
    ("ftp://idp.example.com/certs", False), ("/etc/tickstock/jwks.json", True),
])
def test_where_a_jwks_may_come_from(source: str, ok: bool) -> None:
    """HTTPS, plain HTTP only on loopback (a sidecar, tests), or a file."""
    assert (check_source(source) is None) == ok


def test_permissions_claim_fields() -> None:
    """Each field narrows one thing; a missing one narrows nothing."""
    assert parse_permissions({}, "c") == Permissions()
    p = parse_permissions({"topics": ["patterns", "ticks"], "universes": ["sp500"],
                           "backtests": False}, "c")
    assert p.refuses("health", None, None) == "your token does not allow the topic 'health'"
    assert p.refuses("ticks", "sp500", None) is None
    assert "only by universe" in str(p.refuses("ticks", None, frozenset({"AAPL"})))
    assert "only by universe" in str(p.refuses("patterns", "nasdaq", None))
    assert "not symbols besides" in str(p.refuses("ticks", "sp500", frozenset({"AAPL"})))
    assert Permissions(topics=frozenset({"backtests"})).refuses("backtests", None, None) is None
    for bad in ({"backtests": "no"}, {"universes": [1]}, {"topics": ["a b"]}, []):
        with pytest.raises(BadRequest):
            parse_permissions(bad, "c")


# ------------------------------------------------------------ the gateway


def hello(gateway: Any, client: RecordingClient, identity: Identity) -> dict[str, Identity]:
    """
    Welcome C{client} as C{identity} (token "t1"); the tokens it may
    refresh with are added to the returned dict (a fake authenticator).
    """
    tokens = {"t1": identity}
    gateway._authenticate = lambda message: tokens[message["token"]]
    gateway.opened(client)
    gateway.receive(client, b'{"op":"hello","token":"t1"}')
    assert client.replies[-1]["op"] == "welcome"
    return tokens


def test_a_client_is_warned_before_its_token_expires_and_refreshes_in_band() -> None:
    """
    token_expiring comes WARN_BEFORE seconds before the expiry; a refresh
    moves both the warning and the close to the new token's expiry, and the
    subscriptions stay; without another refresh the connection closes 1008.
    """
    clock = Clock()
    clock.advance(1000)
    gateway, client = make_gateway(clock), RecordingClient()
    refreshed = hello(gateway, client, Identity("alice", 1100.0))
    gateway.receive(client, b'{"op":"subscribe","id":"p","topic":"patterns"}')
    clock.advance(100 - WARN_BEFORE - 0.5)
    assert [r for r in client.replies if r["op"] == "token_expiring"] == []
    clock.advance(0.5)
    assert client.replies[-1] == {"op": "token_expiring", "in": int(WARN_BEFORE)}
    refreshed["t2"] = Identity("alice", 1300.0)
    gateway.receive(client, b'{"op":"refresh","id":"r","token":"t2"}')
    assert client.replies[-1] == {"op": "refreshed", "id": "r", "expires_in": 230}
    clock.advance(100)
    assert client.closed is None and "p" in gateway.connections[client].subscriptions
    clock.advance(1300 - WARN_BEFORE - clock.seconds())
    assert client.replies[-1]["op"] == "token_expiring"
    clock.advance(WARN_BEFORE)
    assert client.closed == (1008, "token expired")


def test_a_refused_refresh_leaves_the_connection_as_it_was() -> None:
    """
    A token for another user, or a bad one, is refused unauthorized; the
    connection stays, under its current token until that expires.
    """
    clock = Clock()
    gateway, client = make_gateway(clock), RecordingClient()
    refreshed = hello(gateway, client, Identity("alice", 100.0))
    refreshed["bob"] = Identity("bob", 500.0)
    gateway.receive(client, b'{"op":"refresh","id":"r","token":"bob"}')
    assert client.replies[-1] == {"op": "error", "id": "r", "code": "unauthorized",
                                  "message": "a refreshed token must be for the same user"}

    def bad(message: dict[str, Any]) -> Identity:
        raise BadRequest("unauthorized", "token expired")
    gateway._authenticate = bad
    gateway.receive(client, b'{"op":"refresh","id":"r2","token":"old"}')
    assert client.replies[-1]["code"] == "unauthorized" and client.closed is None
    assert client.user == "alice"
    clock.advance(100)
    assert client.closed == (1008, "token expired")


def test_permissions_refuse_topics_universes_and_backtests_with_forbidden() -> None:
    """forbidden answers the request; the connection and its other subscriptions stay."""
    clock = Clock()
    gateway, client = make_gateway(clock), RecordingClient()
    permissions = Permissions(topics=frozenset({"patterns", "health"}), backtests=False)
    hello(gateway, client, Identity("alice", None, permissions))
    gateway.receive(client, b'{"op":"subscribe","id":"p","topic":"patterns"}')
    assert client.replies[-1]["op"] == "subscribed"
    gateway.receive(client, b'{"op":"subscribe","id":"t","topic":"ticks"}')
    assert client.replies[-1] == {
        "op": "error", "id": "t", "code": "forbidden",
        "message": "your token does not allow the topic 'ticks'"}
    gateway.receive(client, b'{"op":"submit_backtest","id":"b","params":{}}')
    assert client.replies[-1]["code"] == "forbidden"
    assert client.closed is None and list(gateway.connections[client].subscriptions) == ["p"]


def test_a_refresh_ends_the_subscriptions_its_token_no_longer_allows() -> None:
    """Narrower permissions on refresh: what they forbid ends with forbidden, the rest stays."""
    clock = Clock()
    gateway, client = make_gateway(clock), RecordingClient()
    refreshed = hello(gateway, client, Identity("alice"))
    gateway.receive(client, b'{"op":"subscribe","id":"p","topic":"patterns"}')
    gateway.receive(client, b'{"op":"subscribe","id":"h","topic":"health"}')
    refreshed["narrow"] = Identity("alice", None, Permissions(topics=frozenset({"health"})))
    gateway.receive(client, b'{"op":"refresh","id":"r","token":"narrow"}')
    assert client.replies[-2] == {"op": "refreshed", "id": "r"}
    assert client.replies[-1]["id"] == "p" and client.replies[-1]["code"] == "forbidden"
    assert list(gateway.connections[client].subscriptions) == ["h"]
