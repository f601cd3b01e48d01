"""
C{--workers N} with real processes: C{twistd tickstock --workers 2} on the
test's redis-server, clients over real WebSockets landing on both workers,
one worker killed -9 and restarted by the parent, a graceful stop, and the
parent killed -9 (its workers follow it).
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import termios

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.conftest import TEST_SECRET
from tests.test_end_to_end import pattern, publish
from tests.test_streams import TwistdDaemon
from tests.wsclient import connect, eventually, http_get
from tickstock.config import ConfigError
from tickstock.deliver.auth import JWTAuthenticator
from tickstock.ops.workers import ORPHAN_EXIT, ParentWatch, listening_socket


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


def unread(fd: int) -> int:
    """Bytes waiting in the pipe C{fd}."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def running(pid: int) -> bool:
    """Whether C{pid} still runs: a zombie nobody reaped yet has stopped."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest_twisted.ensureDeferred
async def test_workers_exit_when_the_parent_is_killed(redis_server, secret_file):
    """
    kill -9 of the C{--workers 2} parent: both workers stop (a connected
    client is told 1001, as on a graceful stop) and are gone, and the port
    is free again.
    """
    daemon = TwistdDaemon("--redis", redis_server.url, "--workers", "2",
                          "--jwt-secret-file", secret_file)
    daemon.start()
    pids: dict[int, int] = {}
    try:
        await daemon.ready()
        pids = await worker_pids(daemon, 2)
        client = await connect(daemon.port, hello=hello("u"))
        assert daemon.process is not None
        daemon.process.kill()
        daemon.process.wait()
        killed = reactor.seconds()
        # Deadline generous for a loaded machine; each worker gives itself
        # ORPHAN_EXIT seconds (checked below without a clock).
        while any(running(pid) for pid in pids.values()):
            assert reactor.seconds() < killed + 10, "the workers outlived their parent"
            await deferLater(reactor, 0.02, lambda: None)
        await eventually(lambda: client.close_code is not None, 5, "the client closed")
        assert client.close_code == 1001
        listening_socket(f"tcp:{daemon.port}:interface=127.0.0.1").close()
    finally:
        daemon.kill()
        for pid in pids.values():
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_the_parent_watch_stops_then_exits_an_orphan() -> None:
    """
    The pipe's other end closing is the parent's death: the clean stop
    starts at once, the exit is due L{ORPHAN_EXIT} seconds later, and both
    happen once. A pipe already closed when the watch starts counts too.
    """
    assert ORPHAN_EXIT < 1
    await orphaned(closed_before=False)
    await orphaned(closed_before=True)


async def orphaned(closed_before: bool) -> None:
    read_end, write_end = os.pipe()
    stops: list[None] = []
    exits: list[int] = []
    watch = ParentWatch(reactor, read_end, stop=lambda: stops.append(None), exit=exits.append)
    if closed_before:
        os.close(write_end)
    watch.startService()
    try:
        if not closed_before:
            os.write(write_end, b"x")  # not an end: the parent lives
            await eventually(lambda: unread(read_end) == 0, 5, "the byte read")
            assert not watch.orphaned and stops == []
            os.close(write_end)
        await eventually(lambda: watch.orphaned, 5, "the parent's death seen")
        assert stops == [None] and exits == []
        await eventually(lambda: exits == [1], 5, "the exit")
        assert stops == [None]
    finally:
        reactor.removeReader(watch)
        os.close(read_end)
