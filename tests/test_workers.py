"""
C{--workers N} with real processes: C{twistd tickstock --workers 2} on the
test's redis-server, clients over real WebSockets landing on both workers,
one worker killed -9 and restarted by the parent, and a graceful stop.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.conftest import TEST_SECRET
from tests.test_end_to_end import pattern, publish
from tests.test_streams import TwistdDaemon
from tests.wsclient import connect, eventually, http_get
from tickstock.auth import JWTAuthenticator
from tickstock.config import ConfigError
from tickstock.workers import listening_socket


async def worker_pids(daemon: TwistdDaemon, want: int, timeout: float = 30) -> dict[int, int]:
    """Ask /health (each request lands on some worker) until C{want} workers answered."""
    seen: dict[int, int] = {}
    deadline = reactor.seconds() + timeout
    while len(seen) < want:
        try:
            status, body = await http_get(daemon.port, "/health")
            if status == 200:
                seen[body["worker"]] = body["pid"]
        except Exception:
            pass
        if reactor.seconds() > deadline:
            raise AssertionError(f"only workers {sorted(seen)} answered")
        await deferLater(reactor, 0.05, lambda: None)
    return seen


def hello(user: str) -> dict[str, object]:
    import time

    return {"op": "hello", "token": JWTAuthenticator(TEST_SECRET).mint(user, time.time(), 600)}


@pytest_twisted.ensureDeferred
async def test_two_workers_share_the_port_and_restart(redis_server, secret_file):
    """
    Both workers accept connections on the one port; an event reaches every
    client, whichever worker it is on, exactly once; a worker killed -9 is
    started again by the parent; SIGTERM to the parent stops them all.
    """
    daemon = TwistdDaemon("--redis", redis_server.url, "--workers", "2",
                          "--jwt-secret-file", secret_file)
    daemon.start()
    try:
        await daemon.ready()
        pids = await worker_pids(daemon, 2)
        assert len(set(pids.values())) == 2
        clients = [await connect(daemon.port, hello=hello(f"u{i}")) for i in range(8)]
        for client in clients:
            reply = await client.request({"op": "subscribe", "id": "p", "topic": "patterns"},
                                         "subscribed")
            assert reply["op"] == "subscribed"
        # Each worker is a Redis subscriber of its own.
        assert publish(redis_server, "tickstock.events.patterns", pattern()) == 2
        await eventually(lambda: all(c.events() for c in clients), 10, "every client")
        await deferLater(reactor, 0.3, lambda: None)
        assert [len(c.events()) for c in clients] == [1] * 8
        assert len({c.events()[0]["id"] for c in clients}) == 1

        os.kill(pids[0], signal.SIGKILL)
        deadline = reactor.seconds() + 30
        while True:
            again = await worker_pids(daemon, 2)
            if again[0] != pids[0]:
                break
            assert reactor.seconds() < deadline, "worker 0 was not restarted"
            await deferLater(reactor, 0.2, lambda: None)
        assert again[1] == pids[1]

        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        code = await _wait(daemon.process, 30)
        assert code in (0, -signal.SIGTERM)  # twistd exits by the signal it got, once stopped
        for pid in again.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        daemon.kill()


async def _wait(process: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = reactor.seconds() + timeout
    while process.poll() is None:
        assert reactor.seconds() < deadline, "the parent did not stop in time"
        await deferLater(reactor, 0.1, lambda: None)
    return process.returncode


def test_workers_need_a_tcp_port_that_is_free() -> None:
    """A port in use, or a non-TCP endpoint, is refused with one clear line."""
    with listening_socket("tcp:0:interface=127.0.0.1") as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen"):
            listening_socket(f"tcp:{port}:interface=127.0.0.1")
    with pytest.raises(ConfigError, match="tcp"):
        listening_socket("unix:/tmp/x.sock")
