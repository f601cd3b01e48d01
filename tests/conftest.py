"""
Fixtures that start real parts: the test's own redis-server, and the daemon's
real service tree in the test reactor listening on a free port.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.servers import PostgresServer, RedisServer, free_port
from tickstock.config import Settings, load_settings
from tickstock.deliver.auth import JWTAuthenticator
from tickstock.tap import TickStock


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test, stopped afterwards."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole run; tests get databases of their own."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


_databases = iter(range(1, 1_000_000))


@pytest.fixture
def postgres(postgres_cluster: PostgresServer) -> Iterator[str]:
    """The DSN of a new, migrated database of this test's own on the shared cluster."""
    from tickstock.store.migrate import migrate

    name = f"t{next(_databases)}"
    postgres_cluster.sql(f"CREATE DATABASE {name}")
    dsn = postgres_cluster.dsn(name)
    migrate(dsn)
    yield dsn
    postgres_cluster.sql(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for one test that may kill, pause or restart it."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# 64 bytes or more: tests sign HS512 tokens with it too (refused for their
# algorithm), and PyJWT warns about a shorter HS512 key.
TEST_SECRET = b"test-secret-of-at-least-32-bytes-for-hs256-and-64-for-hs512-tokens"


@pytest.fixture(scope="session")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A JWT secret file, with the whitespace around it that the daemon strips."""
    path = tmp_path_factory.mktemp("secrets") / "jwt"
    path.write_bytes(b"  " + TEST_SECRET + b"\n")
    return str(path)


def make_settings(**overrides: Any) -> Settings:
    """Settings as the daemon would build them from these flags alone."""
    overrides.setdefault("listen", f"tcp:{free_port()}:interface=127.0.0.1")
    # Tests poll the API every 10 ms; the rate limit has tests of its own.
    overrides.setdefault("api_rate", 10_000)
    overrides.setdefault("api_burst", 10_000)
    return load_settings({k: v for k, v in overrides.items()}, environ={})


class Daemon:
    """A running L{TickStock} service tree and the port it serves on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = int(settings.listen.split(":")[1])
        self.service = TickStock(settings, reactor)
        self.service.startService()

    def hello(self, user: str, ttl: float = 3600) -> dict[str, Any]:
        """The hello fields for C{user}: a real token when auth is on."""
        if self.settings.jwt_secret is None:
            return {"user": user}
        auth = JWTAuthenticator(self.settings.jwt_secret, audience=self.settings.jwt_audience,
                                issuer=self.settings.jwt_issuer)
        return {"token": auth.mint(user, time.time(), ttl)}


@pytest.fixture
def daemons(secret_file: str) -> Iterator[Callable[..., Daemon]]:
    """
    Start daemons with given flags; all are stopped after the test. A daemon
    on Redis (not --demo) gets the test's JWT secret unless told otherwise.
    """
    started: list[Daemon] = []

    def start(**overrides: Any) -> Daemon:
        if overrides.get("redis") and not overrides.get("demo"):
            overrides.setdefault("jwt_secret_file", secret_file)
        daemon = Daemon(make_settings(**overrides))
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        if daemon.service.running:
            pytest_twisted.blockon(daemon.service.stopService())
