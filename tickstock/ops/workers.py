"""
C{--workers N}: N daemon processes serving one listening socket, so that
fan-out uses N cores.

The parent binds the port once (so a port in use fails at start, as with one
process), then runs N copies of itself (C{twistd -n tickstock} with the same
options) that each accept connections on that socket, handed over as file
descriptor 3. The kernel spreads new connections over the processes that
are waiting to accept. Each worker is a full daemon, a node of its own on
the shared Redis: its own subscriber, history tail and clients. That is
also why workers need C{--redis}: they agree on event ids, deduplicate and
share the history through it, exactly as separate nodes do.

The parent serves nothing itself. It relays each worker's log lines into its
own log, restarts a worker that exits (after L{RESTART_DELAY} seconds), and
at shutdown sends every worker SIGTERM, so each does its own graceful stop
(clients told 1001), killing what still runs after L{STOP_TIMEOUT} seconds.

A worker never outlives its parent (L{ParentWatch}): killed with -9, the
parent cannot tell its workers anything, so each worker watches a pipe only
the parent holds open, and stops when it closes.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import (
    ConnectionDone,
    ProcessDone,
    ProcessExitedAlready,
    ReactorNotRunning,
)
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from tickstock.config import ConfigError
from tickstock.ops.logs import RELAYED

WORKER_ENV = "_TICKSTOCK_WORKER"
"""Set in a worker's environment to its index; not a setting anyone gives."""
LISTEN_FD = 3
PARENT_FD = 0
"""A worker's standard input: a pipe whose other end only the parent holds,
and never writes to (see L{ParentWatch})."""
RESTART_DELAY = 1.0
STOP_TIMEOUT = 15.0
ORPHAN_EXIT = 0.9
"""Seconds an orphaned worker gets to stop cleanly before it exits anyway:
gone within a second of its parent's death, and its port with it."""
_RUN_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def listening_socket(description: str, backlog: int = 1024) -> socket.socket:
    """
    Bind and listen on a C{tcp:PORT[:interface=ADDR][:backlog=N]} endpoint
    (the only kind several processes can share this way).

    @raise ConfigError: for other endpoints, or when the port cannot be bound.
    """
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6"):
        raise ConfigError(f"--workers: needs a tcp: --listen endpoint, not {description!r}")
    port, *params = rest.split(":")
    options = dict(p.split("=", 1) for p in params if "=" in p)
    interface = options.get("interface", "::" if kind == "tcp6" else "")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, int(port)))
        sock.listen(int(options.get("backlog", backlog)))
    except (OSError, ValueError) as error:
        sock.close()
        raise ConfigError(f"--listen: cannot listen on {description!r}: {error}") from None
    sock.setblocking(False)
    return sock


class _Worker(ProcessProtocol):
    """One worker process: its output goes to the parent's log, line by line."""

    _log = Logger()

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.index = index
        self._pool = pool
        self._partial = {1: b"", 2: b""}
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self._partial[fd] = (self._partial.get(fd, b"") + data).split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            try:
                record = orjson.loads(line) if line.startswith(b"{") else None
            except orjson.JSONDecodeError:
                record = None
            # A worker's JSON record is written out as it is (with its index).
            self._log.info("worker {worker}: {line}", worker=self.index, line=text,
                           **({RELAYED: record} if isinstance(record, dict) else {}))

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self._pool._ended(self, reason)


class WorkerPool(Service):
    """Runs and supervises the worker processes (see the module docstring)."""

    _log = Logger()

    def __init__(self, reactor: object, listen: str, count: int, args: list[str]) -> None:
        """C{reactor} spawns the workers and times their restarts: it must provide both."""
        self._processes = IReactorProcess(reactor)
        self._clock = IReactorTime(reactor)
        self._listen = listen
        self._count = count
        self._args = args
        self._socket: socket.socket | None = None
        self._workers: dict[int, Any] = {}
        self.restarts = 0

    def privilegedStartService(self) -> None:
        # Bound before twistd drops privileges, like a strports service.
        self._socket = listening_socket(self._listen)
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        if self._socket is None:
            self._socket = listening_socket(self._listen)
        super().startService()  # type: ignore[no-untyped-call]
        for index in range(self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        assert self._socket is not None
        worker = _Worker(self, index)
        env = {**os.environ, WORKER_ENV: str(index)}
        argv = [sys.executable, "-c", _RUN_TWISTD, "-n", "--pidfile=", "tickstock", *self._args]
        transport = self._processes.spawnProcess(
            worker, sys.executable, argv, env=env,
            childFDs={PARENT_FD: "w", 1: "r", 2: "r", LISTEN_FD: self._socket.fileno()},
        )
        self._workers[index] = (worker, transport)
        self._log.info("worker {i} started (pid {pid})", i=index, pid=transport.pid)

    def _ended(self, worker: _Worker, reason: Any) -> None:
        if self._workers.get(worker.index, (None,))[0] is not worker:
            return
        del self._workers[worker.index]
        if not self.running:
            return
        how = "exited" if reason.check(ProcessDone) else reason.getErrorMessage()
        self._log.warn("worker {i} {how}; restarting it in {d:g}s", i=worker.index, how=how,
                       d=RESTART_DELAY)
        self.restarts += 1
        self._clock.callLater(RESTART_DELAY, self._restart, worker.index)

    def _restart(self, index: int) -> None:
        if self.running and index not in self._workers:
            self._spawn(index)

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        running = list(self._workers.values())
        def signal(name: str) -> None:
            for _, transport in running:
                try:
                    transport.signalProcess(name)
                except ProcessExitedAlready:
                    pass

        signal("TERM")
        killer = self._clock.callLater(STOP_TIMEOUT, signal, "KILL")


        def done(_: Any) -> None:
            if killer.active():
                killer.cancel()
            if self._socket is not None:
                self._socket.close()
                self._socket = None

        return DeferredList([worker.ended for worker, _ in running]).addCallback(done)


class AdoptedPort(Service):
    """A worker's side: serve C{factory} on the listening socket it was given."""

    def __init__(self, reactor: Any, fd: int, factory: Any) -> None:
        self._reactor = reactor
        self._fd = fd
        self._factory = factory
        self._port: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        probe = socket.socket(fileno=os.dup(self._fd))
        family = probe.family
        probe.close()
        self._port = self._reactor.adoptStreamPort(self._fd, family, self._factory)
        os.close(self._fd)  # adoptStreamPort keeps a duplicate of its own

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        return self._port.stopListening() if self._port is not None else None


class ParentWatch(Service):
    """
    A worker's side: stop when the parent dies, however it dies.

    The parent holds the write end of the worker's standard input and never
    writes to it; the kernel closes it when the parent process ends, killed
    with -9 included, and the worker reads end-of-file. A parent that died
    before the watch began is seen at once: the end-of-file is already
    there. This is preferred to Linux's C{PR_SET_PDEATHSIG}, which fires when
    the parent I{thread} that spawned the worker ends, would have to be set
    between fork and exec (Twisted spawns with posix_spawn: no such moment),
    races with a parent that dies before it is set, and is Linux only.

    Once orphaned, the worker stops as on SIGTERM (clients told 1001, what it
    holds finished), and exits after L{ORPHAN_EXIT} seconds whatever is not
    done: a stream entry not yet acknowledged is read again later.
    """

    _log = Logger()

    def __init__(self, reactor: Any, fd: int = PARENT_FD,
                 stop: Callable[[], None] | None = None,
                 exit: Callable[[int], None] = os._exit) -> None:
        """
        @param stop: starts the clean stop (default: stop the reactor).
        @param exit: ends the process at once.
        """
        self._reactor = reactor
        self._fd = fd
        self._stop = stop or reactor.stop
        self._exit = exit
        self.orphaned = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        os.set_blocking(self._fd, False)
        # Watched until the process ends: a parent that dies while this
        # worker stops cuts the stop short too.
        self._reactor.addReader(self)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "parent"

    def doRead(self) -> ConnectionDone | None:
        try:
            if os.read(self._fd, 4096):
                return None  # the parent never writes; nothing to do with it
        except BlockingIOError:
            return None
        except OSError:
            pass
        return ConnectionDone("the parent process is gone")

    def connectionLost(self, reason: Any) -> None:
        """The pipe closed (read end-of-file, or hung up): the parent is gone."""
        if self.orphaned:
            return
        self.orphaned = True
        self._log.warn("the parent process is gone (pid {ppid} now); stopping, and exiting "
                       "within {t:g}s", ppid=os.getppid(), t=ORPHAN_EXIT)
        self._reactor.callLater(ORPHAN_EXIT, self._exit, 1)
        try:
            self._stop()
        except ReactorNotRunning:
            pass
