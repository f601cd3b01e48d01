"""
Fixtures that start real parts: the test's own redis-server, and the daemon's
real service tree in the test reactor listening on a free port.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.servers import RedisServer, free_port
from tickstock.config import Settings, load_settings
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


def make_settings(**overrides: Any) -> Settings:
    """Settings as the daemon would build them from these flags alone."""
    overrides.setdefault("listen", f"tcp:{free_port()}:interface=127.0.0.1")
    return load_settings({k: v for k, v in overrides.items()}, environ={})


class Daemon:
    """A running L{TickStock} service tree and the port it serves on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = int(settings.listen.split(":")[1])
        self.service = TickStock(settings, reactor)
        self.service.startService()


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Start daemons with given flags; all are stopped after the test."""
    started: list[Daemon] = []

    def start(**overrides: Any) -> Daemon:
        daemon = Daemon(make_settings(**overrides))
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        if daemon.service.running:
            pytest_twisted.blockon(daemon.service.stopService())
