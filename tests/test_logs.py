"""
Logs and twistd conventions: the JSON line format; a daemonized
C{twistd --pidfile --logfile --umask tickstock} on the test's Redis (with a
password) and PostgreSQL, exercised with good and bad tokens, whose log is
JSON line by line and holds none of its secrets.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from tests.conftest import TEST_SECRET
from tests.servers import RedisServer, free_port
from tests.test_end_to_end import pattern
from tests.test_resume import PATTERNS
from tests.wsclient import connect, eventually, http_get, http_request
from tickstock.deliver.auth import JWTAuthenticator
from tickstock.ops.logs import RELAYED, JSONLines, log_format

ROOT = Path(__file__).resolve().parent.parent


class Lines:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_a_json_line_has_the_message_level_fields_and_traceback() -> None:
    out = Lines()
    observer = JSONLines(out)  # type: ignore[arg-type]
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    observer({"log_format": "lost {address} after {n} tries", "log_level": LogLevel.warn,
              "log_namespace": "tickstock.x", "log_time": 1_700_000_000.25, "address": "r:1",
              "n": 3, "conn": object(), "log_failure": failure})
    observer({"log_format": "worker {worker}: {line}", "log_time": 0, "worker": 2,
              RELAYED: {"message": "from the worker", "level": "info"}})
    first, second = (orjson.loads(line) for line in out.text.splitlines())
    assert first["time"] == "2023-11-14T22:13:20.250+00:00"
    assert first["level"] == "warn" and first["namespace"] == "tickstock.x"
    assert first["message"] == "lost r:1 after 3 tries"
    assert first["address"] == "r:1" and first["n"] == 3 and "conn" not in first
    assert "ZeroDivisionError" in first["traceback"]
    assert second == {"message": "from the worker", "level": "info", "worker": 2}


def test_json_is_the_default_for_a_daemon_text_with_n() -> None:
    assert log_format(None, {"nodaemon": False}) == "json"
    assert log_format(None, {"nodaemon": True}) == "text"
    assert log_format(None, None) == "text"  # not run by twistd
    assert log_format("text", {"nodaemon": False}) == "text"
    assert log_format("json", {"nodaemon": True}) == "json"


@pytest.fixture
def password_redis() -> Any:
    server = RedisServer(password="redis-Pass-7f3a9")
    server.start()
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_a_daemonized_twistd_logs_json_without_secrets(
        password_redis: RedisServer, postgres: str, tmp_path: Path) -> None:
    """
    twistd without -n: --pidfile holds the daemon's pid (created under
    --umask 077: mode 600) and is removed at shutdown; --logfile gets one
    JSON object per line. The daemon saw a Redis password, a PostgreSQL
    password, a JWT secret, a valid token (WebSocket and REST), a forged
    one and an expired one, and a malformed message: the log says what
    happened and shows none of those secrets.
    """
    port = free_port()
    secret_file = tmp_path / "jwt"
    secret_file.write_bytes(TEST_SECRET)
    pg_password = "pg-Pass-b81c2"
    redis_url = password_redis.url.replace("redis://", f"redis://:{password_redis.password}@")
    pidfile, logfile = tmp_path / "tickstock.pid", tmp_path / "tickstock.log"
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    started = await deferLater(reactor, 0, lambda: os.spawnv(os.P_WAIT, twistd, [
        twistd, f"--pidfile={pidfile}", f"--logfile={logfile}", "--umask=0077",
        f"--rundir={ROOT}", "tickstock", "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--redis", redis_url, "--postgres", f"{postgres} password={pg_password}",
        "--jwt-secret-file", str(secret_file), "--spool-dir", str(tmp_path / "spool")]))
    assert started == 0  # the parent exits once the daemon is detached
    pid = 0
    try:
        await eventually(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 15,
                         "the pidfile")
        pid = int(pidfile.read_text())
        assert stat.S_IMODE(pidfile.stat().st_mode) == 0o600
        os.kill(pid, 0)
        await _ready(port)

        auth = JWTAuthenticator(TEST_SECRET)
        token = auth.mint("alice", time.time(), 3600)
        expired = auth.mint("alice", time.time() - 7200, 60)
        forged = JWTAuthenticator(b"x" * 40).mint("alice", time.time(), 3600)
        client = await connect(port, hello={"token": token})
        await client.request({"op": "subscribe", "id": "p", "topic": "patterns"}, "subscribed")
        password_redis.command("PUBLISH", PATTERNS, orjson.dumps(pattern("AAPL")))
        password_redis.command("PUBLISH", PATTERNS, b"{not json")
        await eventually(lambda: len(client.events("p")) == 1, 10, "the event")
        for bad in (expired, forged):
            refused = await connect(port)
            refused.send({"op": "hello", "id": "h", "token": bad})
            assert (await refused.closed)[0] == 1008
            assert (await http_request(port, b"GET", "/api/symbols", bad))[0] == 401
        assert (await http_request(port, b"GET", "/api/symbols", token))[0] == 200
        client.sendClose()
        await client.closed
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
    await eventually(lambda: not pidfile.exists(), 15, "the pidfile removed at shutdown")
    # twistd removes the pidfile, then logs its last line as its logger stops.
    await eventually(lambda: "Server Shut Down." in logfile.read_text(), 15, "the last line")

    lines = logfile.read_text().splitlines()
    records = [orjson.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    messages = "\n".join(r["message"] for r in records)
    assert "malformed message on tickstock.events.patterns" in messages
    assert "Server Shut Down." in messages
    assert any(r["level"] == "warn" for r in records)
    text = logfile.read_text()
    for name, secret in [("JWT secret", TEST_SECRET.decode()), ("Redis password",
                         password_redis.password), ("PostgreSQL password", pg_password),
                         ("token", token), ("expired token", expired), ("forged token", forged)]:
        assert secret not in text, f"the {name} is in the log"
    for part in (token.split(".")[2], expired.split(".")[2], forged.split(".")[2]):
        assert part not in text, "a token signature is in the log"


async def _ready(port: int, timeout: float = 30) -> None:
    deadline = reactor.seconds() + timeout
    while True:
        try:
            if (await http_get(port, "/ready"))[0] == 200:
                return
        except Exception:
            pass
        if reactor.seconds() > deadline:
            raise AssertionError("daemon not ready in time")
        await deferLater(reactor, 0.1, lambda: None)


def test_a_workers_json_lines_are_relayed_as_records_and_its_text_lines_as_text() -> None:
    """The --workers parent re-logs each worker line; a JSON one keeps its record."""
    from twisted.logger import globalLogPublisher

    from tickstock.ops.workers import _Worker

    out = Lines()
    observer = JSONLines(out)  # type: ignore[arg-type]
    globalLogPublisher.addObserver(observer)
    try:
        worker = _Worker(None, 1)  # type: ignore[arg-type]
        worker.childDataReceived(1, b'{"message": "subscribed", "level": "info"}\nplain te')
        worker.childDataReceived(1, b"xt {not a format}\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    relayed, plain = (orjson.loads(line) for line in out.text.splitlines())
    assert relayed == {"message": "subscribed", "level": "info", "worker": 1}
    assert plain["message"] == "worker 1: plain text {not a format}" and plain["worker"] == 1
