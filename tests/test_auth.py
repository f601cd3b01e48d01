"""
Tokens: what is accepted and what is refused, in the authenticator alone,
over a real WebSocket against a daemon on the test's Redis, and through the
tickstock-token command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jwt
import pytest
import pytest_twisted
from twisted.internet.task import Clock

from tests.conftest import TEST_SECRET
from tests.test_jobs import job_listener  # noqa: F401 - fixture
from tests.test_units import RecordingClient, make_gateway
from tests.wsclient import connect, eventually
from tickstock.deliver.auth import Identity, JWTAuthenticator
from tickstock.domain.errors import BadRequest

NOW = time.time()


def token(secret: bytes = TEST_SECRET, algorithm: str = "HS256", **claims) -> str:
    body = {"sub": "alice", "exp": int(NOW + 600), **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, algorithm=algorithm)


def unsigned(**claims) -> str:
    """A token with alg 'none' and no signature."""
    return jwt.encode({"sub": "alice", "exp": int(NOW + 600), **claims}, None, algorithm="none")


@pytest.mark.parametrize("bad, reason", [
    (token(exp=int(NOW - 10)), "token expired"),
    (token(secret=b"another-secret-of-at-least-32-bytes!!"), "Signature verification failed"),
    (unsigned(), "alg value is not allowed"),
    (token(algorithm="HS512"), "alg value is not allowed"),
    (token(exp=None), 'missing the "exp" claim'),
    (token(sub=None), 'missing the "sub" claim'),
    (token(sub="bad user!"), "sub is not a user id"),
    ("not.a.token", "invalid token"),
    ("", "hello needs a token"),
])
def test_refused_tokens(bad, reason):
    """Expired, forged, unsigned, wrong-algorithm and incomplete tokens are refused."""
    with pytest.raises(BadRequest) as raised:
        JWTAuthenticator(TEST_SECRET)({"token": bad})
    assert raised.value.code == "unauthorized"
    assert reason in str(raised.value)


def test_audience_and_issuer_are_checked_when_configured():
    """With aud/iss configured, a token must carry the right ones."""
    auth = JWTAuthenticator(TEST_SECRET, audience="tickstock", issuer="idp")
    assert auth({"token": token(aud="tickstock", iss="idp")}).user == "alice"
    for claims in ({"aud": "other", "iss": "idp"}, {"aud": "tickstock", "iss": "evil"},
                   {"iss": "idp"}):
        with pytest.raises(BadRequest):
            auth({"token": token(**claims)})


def test_short_secret_is_refused():
    """An HMAC secret under 32 bytes cannot be used."""
    with pytest.raises(ValueError):
        JWTAuthenticator(b"short")


def test_a_token_that_expires_during_the_session_closes_it():
    """The connection is closed with 1008 when its token's exp passes (Clock)."""
    clock = Clock()
    clock.advance(1000)
    gateway = make_gateway(clock)
    gateway._authenticate = lambda hello: Identity("alice", expires_at=1060.0)
    client = RecordingClient()
    gateway.opened(client)
    gateway.receive(client, b'{"op":"hello","token":"t"}')
    clock.advance(59)
    assert client.closed is None
    clock.advance(1.5)
    assert client.closed == (1008, "token expired")
    gateway.closed(client)
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_bad_tokens_over_the_socket(redis_server, daemons):
    """
    Over a real WebSocket: no token, a forged one, and an expired one get
    an unauthorized error and close 1008; a good one gets welcome as its sub.
    """
    daemon = daemons(redis=redis_server.url)
    for hello in ({}, {"token": token(secret=b"x" * 40)}, {"token": token(exp=int(NOW - 60))},
                  {"token": unsigned()}):
        client = await connect(daemon.port)
        client.send({"op": "hello", "id": "h", **hello})
        code, _ = await client.closed
        assert code == 1008
        assert client.of("error")[0]["code"] == "unauthorized"
    good = await connect(daemon.port, hello=daemon.hello("alice"))
    assert good.of("welcome")[0]["user"] == "alice"


@pytest_twisted.ensureDeferred
async def test_a_user_on_two_tabs_gets_their_job_on_both(redis_server, daemons, job_listener):
    """Both of a user's connections get their job's progress; another user's do not."""
    daemon = daemons(redis=redis_server.url)
    await eventually(lambda: daemon.service.readiness()[0], 10, "ready")
    tabs = [await connect(daemon.port, hello=daemon.hello("alice")) for _ in range(2)]
    other = await connect(daemon.port, hello=daemon.hello("bob"))
    for client in (*tabs, other):
        await client.request({"op": "subscribe", "id": "b", "topic": "backtests"}, "subscribed")
    job = await tabs[0].request({"op": "submit_backtest", "id": "r", "params": {
        "symbols": ["AAPL"], "start_date": "2024-01-02", "end_date": "2024-02-01"}}, "job_accepted")
    redis_server.command("PUBLISH", "tickstock.events.backtesting.progress",
                         b'{"job_id":"%s","progress":0.5,"status":"running","timestamp":1}'
                         % job["job_id"].encode())
    await eventually(lambda: all(t.events("b") for t in tabs), 5, "both tabs")
    assert other.events("b") == []


def test_token_command_mints_a_token_the_daemon_accepts(secret_file):
    """tickstock-token prints a token for the user, read with the secret file."""
    command = os.path.join(os.path.dirname(sys.executable), "tickstock-token")
    result = subprocess.run(
        [command, "--user", "carol", "--secret-file", secret_file, "--ttl", "60"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    identity = JWTAuthenticator(TEST_SECRET)({"token": result.stdout.strip()})
    assert identity.user == "carol" and identity.expires_at <= time.time() + 61
    refused = subprocess.run([command, "--user", "carol"], capture_output=True, text=True,
                             timeout=30, env={k: v for k, v in os.environ.items()
                                              if k != "TICKSTOCK_JWT_SECRET"})
    assert refused.returncode == 2 and "TICKSTOCK_JWT_SECRET" in refused.stderr
