"""
The first hour with the real command: C{twistd tickstock} started the way
the README says (every flag, every option its commands show) comes up and
says where it is; C{--check-config} checks without starting; a port in use
or a TLS key it cannot read stops start-up with one line, not a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import TEST_SECRET
from tests.servers import SentinelServer, free_port, poll
from tests.test_tls import certificate  # noqa: F401  (a fixture)
from tickstock.config import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
HOST = "127.0.0.1"
READY = re.compile(r"TickStock ready on (https?)://([^/]+):(\d+)/ - (.*)$")


class Twistd:
    """C{twistd -n tickstock ARGS} in its own process, its log (stdout and stderr) in a file."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.log = folder / f"twistd-{os.getpid()}-{free_port()}.log"
        env = {**os.environ, "TICKSTOCK_SPOOL_DIR": str(folder / "spool")}
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "tickstock", *args],
                                            cwd=folder, env=env, stdout=out,
                                            stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def ready_line(self) -> str | None:
        """The start-up line's message, from a text or a JSON log."""
        for line in self.output().splitlines():
            if line.startswith("{"):
                line = orjson.loads(line)["message"]
            found = READY.search(line)
            if found:
                return line[found.start():]
        return None

    def wait_ready(self, port: int) -> None:
        """Until /ready answers 200; failing at once, with the log, if the daemon exits."""
        def ready() -> bool:
            assert self.process.poll() is None, f"twistd exited:\n{self.output()}"
            return status(port, "/ready") == 200

        poll(ready, 60, f"the daemon ready on port {port}")

    def stop(self) -> None:
        """SIGTERM, and the daemon stops cleanly."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        # twistd ends by re-raising the signal it stopped on.
        assert code in (0, -signal.SIGTERM), self.output()
        assert "Traceback" not in self.output()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def twistd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A twistd run expected to end by itself."""
    return subprocess.run([TWISTD, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Twistd]]:
    """Daemons a test started: any still running when it ends (it failed) is killed."""
    started: list[Twistd] = []
    yield started
    for daemon in started:
        daemon.kill()


def test_every_flag_starts_and_the_line_names_the_bound_port(tmp_path, daemons):
    """
    Every flag-style option given as twistd hands it over (--demo is an
    integer 1 there), on port 0: the daemon comes up and its start-up line
    has the URL with the port it actually bound, the mode, store and auth.
    """
    flags = [option.cli for option in OPTIONS if option.flag]
    assert "--demo" in flags
    daemon = Twistd(tmp_path, *flags, "--listen", f"tcp:0:interface={HOST}")
    daemons.append(daemon)
    poll(lambda: daemon.ready_line() is not None or daemon.process.poll() is not None, 60,
         "the start-up line")
    line = daemon.ready_line()
    assert line is not None, daemon.output()
    scheme, host, port, rest = READY.search(line).groups()  # type: ignore[union-attr]
    assert (scheme, host, rest) == ("http", HOST, "embedded demo, embedded store, auth off")
    daemon.wait_ready(int(port))
    daemon.stop()


def test_the_readme_with_redis_commands_start(tmp_path, daemons, redis_server, secret_file):
    """
    README "With Redis": --redis and --jwt-secret-file; then --redis with
    --demo added to the daemon, as it says, which needs no secret (auth off).
    """
    port = free_port()
    daemon = Twistd(tmp_path, "--redis", redis_server.url, "--jwt-secret-file", secret_file,
                    "--listen", f"tcp:{port}:interface={HOST}")
    daemons.append(daemon)
    daemon.wait_ready(port)
    assert daemon.ready_line() == (
        f"TickStock ready on http://{HOST}:{port}/ - Redis pubsub, embedded store, auth on (HS256)")
    daemon.stop()

    port = free_port()
    daemon = Twistd(tmp_path, "--redis", redis_server.url, "--demo",
                    "--listen", f"tcp:{port}:interface={HOST}")
    daemons.append(daemon)
    daemon.wait_ready(port)
    assert daemon.ready_line() == (
        f"TickStock ready on http://{HOST}:{port}/ - Redis pubsub with the demo simulator, "
        "embedded store, auth off")
    daemon.stop()


def test_streams_postgres_and_the_shipped_config_start(tmp_path, daemons, redis_server,
                                                       secret_file, postgres):
    """
    --config (the shipped conf/tickstock.toml), --mode streams, --postgres
    and --postgres-readonly, with JSON logs (the systemd unit's
    --log-format json): the start-up record names streams and PostgreSQL.
    """
    port = free_port()
    daemon = Twistd(tmp_path, "--config", str(ROOT / "conf" / "tickstock.toml"),
                    "--redis", redis_server.url, "--jwt-secret-file", secret_file,
                    "--mode", "streams", "--postgres", postgres, "--postgres-readonly", postgres,
                    "--log-format", "json", "--listen", f"tcp:{port}:interface={HOST}")
    daemons.append(daemon)
    daemon.wait_ready(port)
    records = [orjson.loads(line) for line in daemon.output().splitlines()]
    ready = [record for record in records if record["message"].startswith("TickStock ready")]
    assert [(r["url"], r["mode"], r["store"], r["auth"]) for r in ready] == [
        (f"http://{HOST}:{port}/", "Redis streams", "PostgreSQL store", "auth on (HS256)")]
    daemon.stop()


def test_workers_through_sentinel_start(tmp_path, daemons, redis_server, secret_file):
    """
    --workers 2 (README, Performance) finding Redis through --redis-sentinel
    and --redis-master.
    """
    sentinel = SentinelServer(redis_server.port, "tickstock")
    sentinel.start()
    try:
        port = free_port()
        daemon = Twistd(tmp_path, "--workers", "2", "--redis-sentinel", f"{HOST}:{sentinel.port}",
                        "--redis-master", "tickstock", "--jwt-secret-file", secret_file,
                        "--listen", f"tcp:{port}:interface={HOST}")
        daemons.append(daemon)
        daemon.wait_ready(port)
        daemon.stop()
    finally:
        sentinel.stop()


def test_check_config_prints_the_masked_settings_and_binds_nothing(tmp_path, secret_file):
    """
    --check-config exits 0 with the effective settings, passwords and the
    secret masked, while the --listen port is taken and nothing listens at
    the Redis or PostgreSQL address: it binds nothing and connects nowhere.
    """
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = twistd("-n", "--pidfile=twistd.pid", "tickstock", "--check-config",
                        "--listen", f"tcp:{port}:interface={HOST}",
                        "--redis", f"redis://:redis-pw-1@{HOST}:{free_port()}/0",
                        "--postgres", f"host={HOST} port={free_port()} password=pg-pw-2",
                        "--jwt-secret-file", secret_file, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert not (tmp_path / "twistd.pid").exists()
    lines = result.stdout.splitlines()
    assert lines[0] == "tickstock: the configuration is valid; the effective settings:"
    assert f"  --listen                    tcp:{port}:interface={HOST}  (--listen)" in lines
    assert "password=***" in result.stdout and "redis://:***@" in result.stdout
    assert "redis-pw-1" not in result.stdout and "pg-pw-2" not in result.stdout
    assert "test-secret-of-at-least-32-bytes" not in result.stdout
    assert lines[-1].split() == [
        "JWT", "secret", "***", f"({len(TEST_SECRET)}", "bytes)", "(--jwt-secret-file)"]


def test_check_config_lists_every_problem(tmp_path):
    """Every problem in the file, the environment and the flags, one line each; exit 2."""
    config = tmp_path / "t.toml"
    config.write_text('colour = "blue"\nsim_rate = "fast"\n')
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "tickstock", "--check-config", "--config", str(config),
         "--mode", "kafka", "--listen", f"ssl:0:privateKey={tmp_path / 'key.pem'}"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "TICKSTOCK_MAX_SUBSCRIPTIONS": "0"})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"tickstock: --config: unknown option 'colour' in {config}",
        "tickstock: --mode: expected one of pubsub, streams; got 'kafka'",
        "tickstock: --sim-rate: expected a number, got 'fast'",
        "tickstock: TICKSTOCK_MAX_SUBSCRIPTIONS: must be between 1 and 10000, got 0",
        f"tickstock: --listen: cannot read {tmp_path / 'key.pem'}: No such file or directory",
    ]


def test_a_port_in_use_is_one_line_and_a_failed_start(tmp_path, certificate):  # noqa: F811
    """
    A port another process holds, over TCP or TLS, with twistd -n or
    daemonized: one line says so, the exit status is 1 and no traceback is
    printed or left in the log; the pidfile is not left behind.
    """
    cert_path, key_path = certificate
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        for listen in (f"tcp:{port}:interface={HOST}",
                       f"ssl:{port}:privateKey={key_path}:certKey={cert_path}:interface={HOST}"):
            result = twistd("-n", "--pidfile=twistd.pid", "tickstock", "--listen", listen,
                            cwd=tmp_path)
            assert result.returncode == 1
            assert result.stderr.splitlines() == [
                f"tickstock: cannot listen on {listen} (address in use): another process "
                "listens there; stop it, or give another --listen"]
            assert "Traceback" not in result.stdout
            assert not (tmp_path / "twistd.pid").exists()

        daemonized = twistd("--pidfile=twistd.pid", "--logfile=twistd.log", "tickstock",
                            "--listen", f"tcp:{port}:interface={HOST}", cwd=tmp_path)
    assert daemonized.returncode == 1
    assert f"cannot listen on tcp:{port}" in daemonized.stderr
    log = (tmp_path / "twistd.log").read_text()
    assert f"tickstock: cannot listen on tcp:{port}:interface={HOST} (address in use)" in log
    assert "Traceback" not in log
    assert not (tmp_path / "twistd.pid").exists()


def test_a_tls_key_it_cannot_read_is_one_line(tmp_path, certificate):  # noqa: F811
    """An ssl: --listen whose key is missing, or not the certificate's key: one line, exit 2."""
    cert_path, _ = certificate
    missing = tmp_path / "missing-key.pem"
    result = twistd("-n", "--pidfile=", "tickstock", "--listen",
                    f"ssl:0:privateKey={missing}:certKey={cert_path}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"tickstock: --listen: cannot read {missing}: No such file or directory"]
    other = tmp_path / "other.pem"
    other.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    result = twistd("-n", "--pidfile=", "tickstock", "--listen",
                    f"ssl:0:privateKey={other}:certKey={cert_path}")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("tickstock: --listen: bad TLS key or certificate (")
