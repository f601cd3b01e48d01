"""
Throwaway servers for the test run: a real redis-server on a free loopback
port in a temporary folder, which tests may kill, pause and restart.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Block until C{predicate()} is true, failing after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    waiter = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        waiter.wait(0.02)


class RedisServer:
    """
    A redis-server process of the test's own; a replica of the one on
    port C{replicaof} when given; with C{password}, clients (this one's
    C{command} too) and replicas must authenticate.
    """

    def __init__(self, appendonly: bool = False, replicaof: int | None = None,
                 password: str | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tickstock-redis-")
        self.appendonly = appendonly
        self.replicaof = replicaof
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", self.dir, "--save", "", "--appendonly",
             "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--logfile", "redis.log", *self._extra_args()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        poll(self.answers, 10, f"redis-server on port {self.port}")

    def _extra_args(self) -> list[str]:
        # A replica syncs at once rather than after the default 5 s wait.
        args = ["--repl-diskless-sync-delay", "0"]
        if self.replicaof is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replicaof)]
        if self.password is not None:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        return args

    def answers(self) -> bool:
        try:
            return self.command("PING") == b"+PONG\r\n"
        except OSError:
            return False

    def command(self, *args: str | bytes) -> bytes:
        """Send one command over a fresh connection; the raw RESP reply."""
        request = _resp(*args)
        if self.password is not None:
            request = _resp("AUTH", self.password) + request
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(request)
            reply = sock.recv(1 << 20)
            if self.password is not None:
                while reply == b"+OK\r\n":
                    reply += sock.recv(1 << 20)
                reply = reply.removeprefix(b"+OK\r\n")
            return reply

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _resp(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class SentinelServer(RedisServer):
    """
    A Redis Sentinel (C{redis-server --sentinel}) of the test's own that
    watches the master on port C{master_port} as C{name}, alone (quorum 1)
    and impatient: it names a new master 2-3 s after the old one dies.
    """

    def __init__(self, master_port: int, name: str, password: str | None = None,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        super().__init__()
        self.name = name
        self.master_port = master_port
        self.master_password = password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def start(self) -> None:
        # Sentinel rewrites its config file (its id, what it learned), so the
        # file lives in the server's own folder and is written only once.
        conf = os.path.join(self.dir, "sentinel.conf")
        if not os.path.exists(conf):
            lines = [
                f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
                "logfile sentinel.log",
                f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 1",
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}",
            ]
            if self.master_password is not None:
                lines.append(f"sentinel auth-pass {self.name} {self.master_password}")
            with open(conf, "w") as handle:
                handle.write("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [self.binary, conf, "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        poll(self.answers, 10, f"redis sentinel on port {self.port}")

    def master_port_now(self) -> int | None:
        """The master's port as this sentinel says now (None if it does not know)."""
        reply = self.command("SENTINEL", "get-master-addr-by-name", self.name)
        if not reply.startswith(b"*2"):
            return None
        return int(reply.split(b"\r\n")[4])

    def knows_replica(self, port: int) -> bool:
        """Whether this sentinel sees the replica on C{port} up, so could promote it."""
        reply = self.command("SENTINEL", "replicas", self.name)
        entries = reply.split(b"*")
        return any(b"\r\n%d\r\n" % port in entry and b"\r\nslave\r\n" in entry
                   and b"\r\nmaster-link-status\r\n$2\r\nok\r\n" in entry
                   for entry in entries)


def run_sql(dsn: str, statement: str, params: Any = None) -> list[Any]:
    """Run one statement on a fresh autocommit connection; its rows, if any."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else in Debian's versioned folder."""
    found = shutil.which(name)
    if found is None:
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
        if not candidates:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        found = candidates[-1]
    return found


class PostgresServer:
    """
    A PostgreSQL cluster of the test run's own, in a temporary folder, on a
    free loopback port. PostgreSQL refuses to run as root, so when the tests
    run as root the cluster belongs to the C{postgres} user.

    It commits asynchronously unless C{synchronous_commit}: fast, but a
    server killed with -9 may then lose its last commits, which a test that
    kills it and counts rows cannot allow (fsync stays off: the processes
    die, not the machine).
    """

    def __init__(self, synchronous_commit: bool = False) -> None:
        self.synchronous_commit = synchronous_commit
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tickstock-pg-")
        self.data = os.path.join(self.dir, "data")
        self.process: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*self._as, _postgres_bin("initdb"), "-D", self.data, "-U", "postgres",
             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def dsn(self, dbname: str = "postgres", user: str = "postgres", **extra: str) -> str:
        params = {"host": "127.0.0.1", "port": str(self.port), "dbname": dbname,
                  "user": user, **extra}
        return " ".join(f"{key}={value}" for key, value in params.items())

    def start(self) -> None:
        with open(os.path.join(self.dir, "log"), "ab") as log:
            self.process = subprocess.Popen(
                [*self._as, _postgres_bin("postgres"), "-D", self.data, "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                 "-c", "fsync=off",
                 "-c", f"synchronous_commit={'on' if self.synchronous_commit else 'off'}",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=subprocess.DEVNULL, stderr=log,
            )
        poll(self.answers, 30, f"postgres on port {self.port}")
        # runuser forks: the server's own pid is in postmaster.pid.
        with open(os.path.join(self.data, "postmaster.pid")) as handle:
            self.pid = int(handle.readline())

    def answers(self) -> bool:
        try:
            self.sql("SELECT 1")
            return True
        except Exception:
            return False

    def sql(self, statement: str, dbname: str = "postgres", params: Any = None) -> list[Any]:
        """Run one statement on a fresh autocommit connection; its rows, if any."""
        return run_sql(self.dsn(dbname, connect_timeout="2"), statement, params)

    def _signal(self, signum: int, backends: bool = False) -> None:
        assert self.process is not None
        pids = [self.pid]
        if backends:
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        if int(handle.read().rsplit(")", 1)[1].split()[1]) == self.pid:
                            pids.append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Crash the server (every backend goes with it)."""
        self._signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait()
        self.process = None
        # A killed postmaster leaves its backends to die on their own.
        subprocess.run(["pkill", "-9", "-f", f"postgres.*{self.data}"], check=False)

    def restart(self) -> None:
        """Stop (fast shutdown) and start again on the same port and data."""
        self.stop_server()
        self.start()

    def stop_server(self) -> None:
        if self.process is not None:
            self._signal(signal.SIGINT)
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """Freeze the server and every backend (a hung server, not a dead one)."""
        self._signal(signal.SIGSTOP, backends=True)

    def resume(self) -> None:
        self._signal(signal.SIGCONT, backends=True)
        # runuser stops itself when its child stops; it must go on too.
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            try:
                self.resume()
            except (OSError, ValueError):
                pass
            self.stop_server()
        shutil.rmtree(self.dir, ignore_errors=True)
