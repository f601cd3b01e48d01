#!/usr/bin/env python3
"""
TickStock chaos run: random faults in combination against a real stack, then
a check that nothing was lost, doubled or miscounted (README, "What it
promises").

Starts its own redis-server (append-only, fsync always), PostgreSQL cluster
(synchronous commits, so a killed server keeps what it confirmed) and the
daemon as a real C{twistd -n tickstock} process in streams mode with a fixed
C{--node-id} and its own spool folder. A producer thread XADDs ticks and
pattern events, each with an C{event_id}, at a steady C{--rate}, retrying
with the same C{event_id} until Redis accepts it; WebSocket clients stay
subscribed to patterns and ticks and resume (C{hello} with
C{resume.last_id}, then their subscriptions again) after every drop. For
C{--duration} seconds, rounds of faults chosen at random (C{--seed}): kill -9
and restart of the daemon, Redis or PostgreSQL; SIGSTOP then SIGCONT of each;
a client that stops reading; half the rounds add a second fault on another
target while the first lasts. After each round the injector waits until
every client got an event sent after it (the recovery time), then 0.5-3 s.
Then the producer stops, the run settles (both streams acknowledged, the
spool empty) and it checks: every pattern delivered once per subscription
and in order per symbol, ticks never twice nor out of order and the newest
of each symbol delivered, every 1-minute bar exactly as computed from the
accepted ticks, every pattern event once in PostgreSQL's C{events}; and it
samples the daemon's RSS and Redis's used_memory. See bench/README.md for
the output.

    .venv/bin/python bench/chaos.py --duration 60 --seed 1
    .venv/bin/python bench/chaos.py --duration 600 --seed 7 --rate 300

Exit status: 0 clean; 2 the run finished but found loss, duplicates,
disorder, wrong bars or rows, a resume not recovered, or a round of faults
it did not recover from (reasons on stderr); 1 it could not run (bad
arguments too). On 1 and 2 the temp folder with the logs is kept and named.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hiredis
import orjson
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.python.failure import Failure

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.*, tickstock

from ingest import twistd_path  # noqa: E402
from latency import BenchError, http_json, rss_mb, symbol_list, tail  # noqa: E402

from tests.servers import PostgresServer, RedisServer, free_port, poll  # noqa: E402
from tests.stream_producer import command  # noqa: E402
from tests.wsclient import RecordingClient, eventually  # noqa: E402
from tickstock.deliver.auth import JWTAuthenticator  # noqa: E402
from tickstock.domain.events import id_key  # noqa: E402
from tickstock.store.migrate import migrate  # noqa: E402

TICKS_STREAM = b"tickstock.data.ticks"
PATTERNS_STREAM = b"tickstock.events.patterns"
GROUP = b"tickstock"
PATTERN_EVERY = 4
"""Every 4th event the producer sends is a pattern, the others are ticks."""
FAULTS = ("kill_daemon", "kill_redis", "kill_postgres", "stop_daemon", "stop_redis",
          "stop_postgres", "stall_client")
FAULT_LENGTH = (0.5, 3.0)
"""Seconds a process stays dead or stopped, or a client does not read."""
GAP = (0.5, 3.0)
"""Seconds between one round of faults' recovery and the next round."""
COMBINED = 0.5
"""The share of rounds with a second fault, on another target."""
XADD_PATIENCE = 60.0
"""Seconds the producer keeps retrying one event before the run gives up."""


# ------------------------------------------------------------------ the stack


def target(kind: str) -> str:
    """What a fault hits: daemon, redis, postgres or client."""
    return kind.split("_")[1]


class Daemon:
    """C{twistd -n tickstock} as a process of its own, to be killed, stopped, restarted."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.log = workdir / "daemon.log"
        self.argv = [twistd_path(), "-n", "--pidfile=", "tickstock",
                     "--listen", f"tcp:{self.port}:interface=127.0.0.1", *args]
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.argv, cwd=self.workdir, stdout=out,
                                            stderr=subprocess.STDOUT)
        self.starts += 1

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise BenchError(f"the daemon exited:\n{tail(self.log)}")
            try:
                return http_json(self.url("/ready"))[0] == 200
            except OSError:
                return False

        poll(ready, timeout, "the daemon ready")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.poll() is None else None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def redis_call(redis: RedisServer, *args: str | bytes) -> Any:
    """One command on a fresh connection, its reply parsed (an error reply raises)."""
    reader = hiredis.Reader()
    reader.feed(redis.command(*args))
    reply = reader.gets()
    if reply is False:
        raise OSError(f"redis {args[0]!r}: a partial reply")
    if isinstance(reply, hiredis.ReplyError):
        raise BenchError(f"redis {args[0]!r}: {reply}")
    return reply


def pairs(flat: list[Any]) -> dict[bytes, Any]:
    """A flat [key, value, ...] reply (XINFO) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def stream_backlog(redis: RedisServer, stream: bytes) -> tuple[int, bool]:
    """(entries pending in the group, whether the group has read up to the stream's end)."""
    info = pairs(redis_call(redis, "XINFO", "STREAM", stream))
    groups = [pairs(g) for g in redis_call(redis, "XINFO", "GROUPS", stream)]
    group = next((g for g in groups if g[b"name"] == GROUP), None)
    if group is None:
        return 0, False
    return int(group[b"pending"]), group[b"last-delivered-id"] == info[b"last-generated-id"]


# ------------------------------------------------------------------ the producer


class Producer(threading.Thread):
    """
    XADDs event after event at C{rate} per second: a pattern every
    L{PATTERN_EVERY}th, ticks otherwise, symbols in turn. An event is
    retried on a new connection, with the same C{event_id}, until Redis
    answers (a retry whose first try was applied is the producer retry the
    daemon must deliver once), and only then recorded as accepted.

    @ivar next_n: the number of the next event to send; events are numbered
        in the order they are sent, and C{n} is in their payload.
    @ivar ticks: the accepted ticks, (symbol, n, price, volume, timestamp).
    @ivar patterns: the accepted patterns, (symbol, n).
    """

    def __init__(self, port: int, rate: float, symbols: list[str], seed: int,
                 maxlen: int) -> None:
        super().__init__(name="producer", daemon=True)
        self.port = port
        self.rate = rate
        self.symbols = symbols
        self.rng = random.Random(f"{seed}:prices")
        self.maxlen = [b"MAXLEN", b"~", b"%d" % maxlen] if maxlen else []
        self.next_n = 0
        self.ticks: list[tuple[str, int, float, int, float]] = []
        self.patterns: list[tuple[str, int]] = []
        self.retries = 0
        self.error: str | None = None
        self._halt = threading.Event()
        self._sock: socket.socket | None = None

    def run(self) -> None:
        try:
            self._produce()
        except Exception as error:  # reported by finish()
            self.error = f"{type(error).__name__}: {error}"

    def finish(self) -> None:
        """Stop after the event in hand is accepted; raise if the producer failed."""
        self._halt.set()
        self.join()
        if self._sock is not None:
            self._sock.close()
        if self.error is not None:
            raise BenchError(f"the producer failed: {self.error}")

    def _produce(self) -> None:
        prices = {s: 100.0 + 10 * i for i, s in enumerate(self.symbols)}
        stamps = dict.fromkeys(self.symbols, 0.0)
        start = time.monotonic()
        while not self._halt.is_set():
            n = self.next_n
            symbol = self.symbols[n % len(self.symbols)]
            if n % PATTERN_EVERY == 0:
                self._xadd(PATTERNS_STREAM, {
                    "event_type": "pattern_detected", "symbol": symbol, "pattern": "Doji",
                    "confidence": 0.9, "timestamp": time.time(), "event_id": f"p{n}", "n": n})
                self.patterns.append((symbol, n))
            else:
                price = prices[symbol] = max(1.0, round(prices[symbol]
                                                        + self.rng.uniform(-0.05, 0.05), 2))
                volume = self.rng.randint(1, 500)
                # Distinct times per symbol: a bar's open and close are then unambiguous.
                stamp = stamps[symbol] = max(time.time(), stamps[symbol] + 1e-6)
                self._xadd(TICKS_STREAM, {
                    "symbol": symbol, "price": price, "volume": volume, "timestamp": stamp,
                    "event_id": f"t{n}", "n": n})
                self.ticks.append((symbol, n, price, volume, stamp))
            self.next_n = n + 1
            delay = start + (n + 1) / self.rate - time.monotonic()
            if delay > 0:
                self._halt.wait(delay)

    def _xadd(self, stream: bytes, message: dict[str, Any]) -> None:
        args = [b"XADD", stream, *self.maxlen, b"*", b"data", orjson.dumps(message)]
        deadline = time.monotonic() + XADD_PATIENCE
        while True:
            try:
                if self._sock is None:
                    self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                command(self._sock, *args)
                return
            except OSError as error:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                if time.monotonic() > deadline:
                    raise BenchError(f"Redis accepted no XADD for {XADD_PATIENCE:g}s: "
                                     f"{error}") from None
                self.retries += 1
                self._halt.wait(0.05)


# ------------------------------------------------------------------ the clients


class ChaosClient:
    """
    A browser-like client, as tests/test_streams.py's: it keeps the greatest
    event id it saw and after every drop reconnects with C{resume} and
    subscribes again, to C{patterns} (for C{symbols}, or all) and C{ticks}.
    It keeps what the checks need of each event, not the event.

    @ivar patterns: (symbol, n, connection) of every pattern event received,
        in order; C{connection} counts from 1.
    @ivar pattern_last: the greatest n of a pattern received, per symbol.
    @ivar newest_n: the greatest producer number of any event received.
    @ivar foreign: events without the producer's C{n} (none are expected).
    """

    def __init__(self, index: int, port: int, token: str, symbols: list[str] | None) -> None:
        self.name = f"client-{index}"
        self.port = port
        self.token = token
        self.symbols = symbols
        self.patterns: list[tuple[str, int, int]] = []
        self.pattern_last: dict[str, int] = {}
        self.foreign = 0
        self.ticks_seen: set[int] = set()
        self.tick_last: dict[str, int] = {}
        self.tick_duplicates = 0
        self.tick_out_of_order = 0
        self.newest_n = -1
        self.last_id: str | None = None
        self._last_key = (-1, -1)
        self.connections = 0
        self.subscribed = 0
        self.closes: Counter[str] = Counter()
        self.errors: list[dict[str, Any]] = []
        self.unrecovered: list[dict[str, Any]] = []
        self.current: Any = None
        self.stopped = False
        self._stalled: Any = None

    def received(self, message: dict[str, Any]) -> None:
        data = message["data"]
        n = data.get("n")
        if not isinstance(n, int):
            self.foreign += 1
            return
        self.newest_n = max(self.newest_n, n)
        key = id_key(message["id"])
        if key > self._last_key:
            self._last_key, self.last_id = key, message["id"]
        symbol = data["symbol"]
        if message["sub"] == "p":
            self.patterns.append((symbol, n, self.connections))
            self.pattern_last[symbol] = max(n, self.pattern_last.get(symbol, -1))
        elif n in self.ticks_seen:
            self.tick_duplicates += 1
        else:
            self.ticks_seen.add(n)
            if n < self.tick_last.get(symbol, -1):
                self.tick_out_of_order += 1
            else:
                self.tick_last[symbol] = n

    async def run(self) -> None:
        pattern_filter: dict[str, Any] = {} if self.symbols is None else {"symbols": self.symbols}
        while not self.stopped:
            hello: dict[str, Any] = {"token": self.token}
            if self.last_id is not None:
                hello["resume"] = {"last_id": self.last_id}
            try:
                conn = await self._connect(hello)
            except Exception:
                await deferLater(reactor, 0.1, lambda: None)
                continue
            if self.stopped:
                conn.transport.abortConnection()
                break
            self.connections += 1
            self.current = conn
            try:
                for sub, topic, filter_ in (("p", "patterns", pattern_filter), ("t", "ticks", {})):
                    reply = await conn.request({"op": "subscribe", "id": sub, "topic": topic,
                                                "filter": filter_}, "subscribed", timeout=30)
                    if reply["op"] != "subscribed":
                        self.errors.append(reply)
                    elif reply.get("recovered") is False:
                        self.unrecovered.append({**reply, "connection": self.connections,
                                                 "last_id": self.last_id})
                self.subscribed += 1
            except Exception:
                conn.transport.abortConnection()
            code, _ = await conn.closed
            self.closes[str(code)] += 1
            self.current = None

    async def _connect(self, hello: dict[str, Any]) -> Any:
        """tests/wsclient.connect, with a protocol that hands events to this client."""
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{self.port}/ws")
        factory.protocol = ChaosProtocol
        factory.setProtocolOptions(autoPingInterval=0)
        factory.owner = self
        connecting = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5).connect(factory)
        proto = await connecting
        opened = proto.opened
        opened.addTimeout(30, reactor)  # a stopped daemon accepts, then says nothing
        try:
            await opened
            reply = await proto.request({"op": "hello", "id": "h", **hello}, "welcome",
                                        timeout=30)
            if reply["op"] != "welcome":
                self.errors.append(reply)
                raise ConnectionError(f"hello refused: {reply}")
        except Exception:
            proto.transport.abortConnection()
            raise
        return proto

    def stall(self) -> None:
        """Stop reading: the daemon's writes pile up in the socket, then in its buffers."""
        if self.current is not None and self._stalled is None:
            self._stalled = self.current.transport
            self._stalled.pauseProducing()

    def unstall(self) -> None:
        if self._stalled is not None:
            self._stalled.resumeProducing()
            self._stalled = None

    def close(self) -> None:
        self.stopped = True
        self.unstall()
        if self.current is not None:
            self.current.transport.loseConnection()


class ChaosProtocol(RecordingClient):
    """Events go to the owning L{ChaosClient}; only the other messages are kept."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = orjson.loads(payload)
        if message.get("op") == "event":
            self.factory.owner.received(message)
        else:
            self.messages.append(message)


# ------------------------------------------------------------------ the run


class Chaos:
    """One run: the stack, the producer, the clients, the faults, the checks."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.symbols = symbol_list(args.symbols)
        self.rng = random.Random(f"{args.seed}:faults")
        self.redis = RedisServer(appendonly=True)
        self.postgres = PostgresServer(synchronous_commit=True)
        self.daemon: Daemon | None = None
        self.producer: Producer | None = None
        self.clients: list[ChaosClient] = []
        self.rounds: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.samples: list[tuple[float, float | None, float | None]] = []
        self.interrupted = threading.Event()
        self.settle_s: float | None = None
        self.health: dict[str, Any] = {}
        self.window_start = 0.0
        self.last_pattern: dict[str, int] = {}
        self.last_tick: dict[str, int] = {}

    # -- setup and teardown

    def setup(self) -> None:
        self.redis.start()
        self.postgres.start()
        migrate(self.postgres.dsn())
        secret = secrets.token_hex(32).encode()
        secret_file = self.workdir / "jwt.secret"
        secret_file.write_bytes(secret)
        self.daemon = Daemon(
            self.workdir, "--mode", "streams", "--redis", self.redis.url,
            "--postgres", self.postgres.dsn(), "--node-id", "chaos",
            "--spool-dir", str(self.workdir / "spool"), "--jwt-secret-file", str(secret_file),
            *self.args.daemon_arg)
        self.daemon.start()
        self.daemon.wait_ready(60)
        authenticator = JWTAuthenticator(secret)
        ttl = 3600 + 2 * (self.args.duration + self.args.warmup)
        for k in range(self.args.clients):
            # Odd clients watch two symbols' patterns, even ones every symbol's.
            watched = None if k % 2 == 0 or len(self.symbols) < 3 else \
                [self.symbols[k % len(self.symbols)], self.symbols[(k + 1) % len(self.symbols)]]
            token = authenticator.mint(f"chaos{k}", time.time(), ttl)
            self.clients.append(ChaosClient(k, self.daemon.port, token, watched))
        self.producer = Producer(self.redis.port, self.args.rate, self.symbols, self.args.seed,
                                 self.args.stream_maxlen)

    def teardown(self) -> None:
        self.interrupted.set()
        if self.daemon is not None:
            self.daemon.stop()
        self.redis.stop()
        self.postgres.stop()

    # -- the part that runs in the reactor

    async def drive(self) -> None:
        assert self.producer is not None
        # Interrupted, the reactor joins its threads: they must end soon.
        reactor.addSystemEventTrigger("before", "shutdown", self.interrupted.set)
        loops = [ensureDeferred(c.run()) for c in self.clients]
        await eventually(lambda: all(c.subscribed for c in self.clients), 30,
                         "every client subscribed")
        sampler = threading.Thread(target=self.sample, name="sampler", daemon=True)
        sampler.start()
        self.producer.start()
        await deferToThread(self.inject)
        await deferToThread(self.producer.finish)
        settling = time.monotonic()
        await deferToThread(self.settle)
        self.last_pattern = dict(self.producer.patterns)
        self.last_tick = {s: n for s, n, *_ in self.producer.ticks}
        try:
            await eventually(self.caught_up, self.args.settle_timeout,
                             "every client has the last events")
        except AssertionError as error:
            self.problems.append(str(error))
        self.settle_s = round(time.monotonic() - settling, 2)
        await deferToThread(self.last_sample)
        for client in self.clients:
            client.close()
        for loop in loops:
            await loop

    def caught_up(self) -> bool:
        """Whether every client has the last pattern of each symbol it watches, and tick."""
        for client in self.clients:
            watched = self.symbols if client.symbols is None else client.symbols
            if any(client.pattern_last.get(s, -1) < self.last_pattern.get(s, -1)
                   for s in watched):
                return False
            if any(client.tick_last.get(s, -1) < n for s, n in self.last_tick.items()):
                return False
        return True

    # -- threads

    def inject(self) -> None:
        """
        Rounds of faults until the fault window ends: one fault, or with
        probability L{COMBINED} two on different targets, the second
        starting while the first lasts (PostgreSQL stopped, then the daemon
        killed during the outage); then the round's recovery and a gap.
        """
        assert self.producer is not None
        if self.interrupted.wait(self.args.warmup):
            return
        start = time.monotonic()
        self.window_start = time.time()
        end = start + self.args.duration
        while time.monotonic() < end and not self.interrupted.is_set():
            kinds = [self.rng.choice(FAULTS)]
            if self.rng.random() < COMBINED:
                others = [k for k in FAULTS if target(k) != target(kinds[0])]
                kinds.append(self.rng.choice(others))
            faults: list[dict[str, Any]] = []
            steps: list[tuple[float, Callable[[], None]]] = []
            for kind in kinds:
                offset = round(self.rng.uniform(0, faults[0]["for"]), 2) if faults else 0.0
                length = round(self.rng.uniform(*FAULT_LENGTH), 2)
                begin, finish, fault = self.fault(kind)
                faults.append({"kind": kind, "after": offset, "for": length, **fault})
                steps += [(offset, begin), (offset + length, finish)]
            round_: dict[str, Any] = {"at": round(time.monotonic() - start, 2), "faults": faults}
            self.rounds.append(round_)
            began = time.monotonic()
            for at, action in sorted(steps, key=lambda step: step[0]):
                self.interrupted.wait(max(0.0, began + at - time.monotonic()))
                action()
            ended = time.monotonic()
            try:
                poll(partial(self.recovered, self.producer.next_n + 1),
                     self.args.recovery_timeout, "an event to every client")
            except TimeoutError:
                round_["recovered_in"] = None
                self.problems.append(
                    f"no event reached every client within {self.args.recovery_timeout:g}s "
                    f"of the round at {round_['at']}s ({' + '.join(kinds)}); no more faults "
                    f"injected")
                return
            round_["recovered_in"] = round(time.monotonic() - ended, 3)
            self.interrupted.wait(self.rng.uniform(*GAP))

    def recovered(self, first_after: int) -> bool:
        """Whether every client has an event numbered C{first_after} or later."""
        return self.interrupted.is_set() or all(c.newest_n >= first_after for c in self.clients)

    def fault(self, kind: str) -> tuple[Callable[[], None], Callable[[], None], dict[str, Any]]:
        """What starts and what ends a fault of C{kind}, and what to log of it."""
        assert self.daemon is not None
        if kind == "stall_client":
            client = self.rng.choice(self.clients)
            return (partial(self.in_reactor, client.stall),
                    partial(self.in_reactor, client.unstall), {"client": client.name})
        process: Any = {"daemon": self.daemon, "redis": self.redis,
                        "postgres": self.postgres}[target(kind)]
        if kind.startswith("kill"):
            return process.kill, process.start, {}
        return process.pause, process.resume, {}

    def in_reactor(self, call: Callable[[], None]) -> None:
        """Run C{call} in the reactor, unless it is shutting down (it then joins this thread)."""
        if not self.interrupted.is_set():
            blockingCallFromThread(reactor, call)

    def settle(self) -> None:
        """Until both streams are read to their end and acknowledged, and the spool is empty."""
        def settled() -> bool:
            if self.interrupted.is_set():
                return True
            try:
                backlog = [stream_backlog(self.redis, s) for s in (TICKS_STREAM, PATTERNS_STREAM)]
            except OSError:
                return False
            return all(pending == 0 and at_end for pending, at_end in backlog) \
                and not self.spool_files()

        try:
            poll(settled, self.args.settle_timeout, "the streams acknowledged, the spool empty")
        except TimeoutError as error:
            self.problems.append(f"{error} (spool files: {len(self.spool_files())})")

    def spool_files(self) -> list[Path]:
        return list((self.workdir / "spool").rglob("*.jsonl"))

    def sample(self) -> None:
        while not self.interrupted.wait(self.args.sample_every):
            self.last_sample()

    def last_sample(self) -> None:
        assert self.daemon is not None
        pid = self.daemon.pid
        daemon_mb = rss_mb(pid) if pid is not None else None
        try:
            info = self.redis.command("INFO", "memory")
            found = re.search(rb"used_memory:(\d+)", info)
            redis_mb = round(int(found.group(1)) / 2**20, 1) if found else None
        except OSError:
            redis_mb = None
        self.samples.append((time.monotonic(), daemon_mb, redis_mb))

    # -- the checks, once everything has stopped moving

    def check(self) -> dict[str, Any]:
        assert self.producer is not None and self.daemon is not None
        producer = self.producer
        try:
            self.health = http_json(self.daemon.url("/health"))[1]
        except OSError:
            self.health = {}
        deliveries = self.check_deliveries()
        summary = {
            "scenario": f"chaos, seed {self.args.seed}, {self.args.duration:g}s",
            "seed": self.args.seed,
            "duration_s": self.args.duration,
            "rate": self.args.rate,
            "faults": {kind: sum(f["kind"] == kind for r in self.rounds for f in r["faults"])
                       for kind in FAULTS},
            "rounds": len(self.rounds),
            "combined_rounds": sum(1 for r in self.rounds if len(r["faults"]) > 1),
            "events": {
                "published": len(producer.patterns) + len(producer.ticks),
                "patterns": len(producer.patterns), "ticks": len(producer.ticks),
                "producer_retries": producer.retries, **deliveries,
            },
            "bars": self.check_bars(),
            "rows": self.check_rows(),
            "recovery_s": self.recovery(),
            "clients": {
                "count": len(self.clients),
                "connections": sum(c.connections for c in self.clients),
                "closes": dict(sum((c.closes for c in self.clients), Counter())),
                "resumed_unrecovered": sum(len(c.unrecovered) for c in self.clients),
                "errors": sum(len(c.errors) for c in self.clients),
            },
            "daemon": {
                "starts": self.daemon.starts,
                "last_run": {k: self.health.get("events", {}).get(k)
                             for k in ("received", "routed", "duplicates", "redelivered")}
                | {k: self.health.get("persist", {}).get(k)
                   for k in ("write_failures", "spilled")},
            },
            "memory": self.memory(),
            "settle_s": self.settle_s,
            "fault_log": self.rounds,
        }
        self.judge(summary)
        return summary

    def check_deliveries(self) -> dict[str, Any]:
        """Per subscription: each expected pattern once, in order per symbol; ticks never twice."""
        assert self.producer is not None
        expected_total = delivered = lost = duplicated = unexpected = out_of_order = 0
        ticks_missing = 0
        last_tick: dict[str, int] = {}
        for symbol, n, *_ in self.producer.ticks:
            last_tick[symbol] = n
        for client in self.clients:
            watched = set(self.symbols if client.symbols is None else client.symbols)
            expected = {n for s, n in self.producer.patterns if s in watched}
            counts = Counter(n for _, n, _ in client.patterns)
            expected_total += len(expected)
            delivered += len(client.patterns)
            missing = expected - counts.keys()
            extra = counts.keys() - expected
            twice = sum(c - 1 for c in counts.values())
            lost += len(missing)
            duplicated += twice
            unexpected += len(extra)
            previous: dict[str, tuple[int, int]] = {}
            disordered = 0
            for symbol, n, connection in client.patterns:
                before, before_connection = previous.get(symbol, (-1, 0))
                if n < before:
                    disordered += 1
                    if disordered <= 2:
                        self.problems.append(
                            f"{client.name}: {symbol} pattern n={n} (connection {connection}) "
                            f"after n={before} (connection {before_connection})")
                else:
                    previous[symbol] = (n, connection)
            out_of_order += disordered
            ticks_missing += sum(1 for s, n in last_tick.items() if client.tick_last.get(s) != n)
            if missing or twice or extra:
                self.problems.append(
                    f"{client.name}: {len(missing)} patterns lost (first n: "
                    f"{sorted(missing)[:5]}), {twice} delivered twice (n: "
                    f"{sorted(n for n, c in counts.items() if c > 1)[:5]}), "
                    f"{len(extra)} never accepted")
        return {
            "expected_deliveries": expected_total, "delivered": delivered, "lost": lost,
            "duplicated": duplicated, "unexpected": unexpected, "out_of_order": out_of_order,
            "tick_duplicates": sum(c.tick_duplicates for c in self.clients),
            "ticks_out_of_order": sum(c.tick_out_of_order for c in self.clients),
            "newest_tick_missing": ticks_missing,
        }

    def check_bars(self) -> dict[str, Any]:
        """ohlcv_1min against the bars of the accepted ticks, computed here."""
        assert self.producer is not None
        expected: dict[tuple[str, int], list[Any]] = {}
        for symbol, _, price, volume, stamp in self.producer.ticks:
            key = (symbol, int(stamp // 60) * 60)
            bar = expected.get(key)
            if bar is None:
                expected[key] = [stamp, price, price, price, stamp, price, float(volume)]
                continue
            if stamp < bar[0]:
                bar[0], bar[1] = stamp, price
            bar[2] = max(bar[2], price)
            bar[3] = min(bar[3], price)
            if stamp >= bar[4]:
                bar[4], bar[5] = stamp, price
            bar[6] += volume
        stored = {
            (symbol, int(minute)): (o, h, low, c, v)
            for symbol, minute, o, h, low, c, v in self.postgres.sql(
                'SELECT symbol, extract(epoch FROM "timestamp")::bigint, open, high, low, '
                'close, volume FROM ohlcv_1min')
        }
        wrong = []
        for key, (_, o, h, low, _, c, v) in sorted(expected.items()):
            if stored.get(key) != (o, h, low, c, v):
                wrong.append(key)
                if len(wrong) <= 3:
                    self.problems.append(f"bar {key}: stored {stored.get(key)}, expected "
                                         f"{(o, h, low, c, v)}; {self.parts_of(*key)}")
        extra = stored.keys() - expected.keys()
        if wrong or extra:
            self.problems.append(f"{len(wrong)} bars wrong or missing, {len(extra)} not "
                                 f"expected {sorted(extra)[:3]}")
        return {"checked": len(expected), "wrong": len(wrong), "unexpected": len(extra)}

    def parts_of(self, symbol: str, minute: int) -> str:
        """A wrong bar's parts, and the ticks more than one of them covers (when, in the run)."""
        assert self.producer is not None
        parts = self.postgres.sql(
            "SELECT part, ticks, volume, open_ts, close_ts FROM ohlcv_1min_parts WHERE "
            "symbol = %s AND minute = to_timestamp(%s) ORDER BY open_ts", params=(symbol, minute))
        stamps = [t for s, _, _, _, t in self.producer.ticks
                  if s == symbol and minute <= t < minute + 60]
        covered = Counter(t for t in stamps for _, _, _, low, high in parts if low <= t <= high)
        twice = {t for t, c in covered.items() if c > 1}
        overlapping = [
            (part, ticks, round(low - self.window_start, 3), round(high - self.window_start, 3))
            for part, ticks, _, low, high in parts if any(low <= t <= high for t in twice)]
        return (f"{len(stamps)} ticks accepted, {len(parts)} parts holding "
                f"{sum(p[1] for p in parts)}; {len(twice)} ticks in more than one part: "
                f"(part, ticks, first and last tick's time in s into the fault window) "
                f"{overlapping}")

    def check_rows(self) -> dict[str, Any]:
        """Each accepted pattern event once in events."""
        assert self.producer is not None
        counts = dict(self.postgres.sql(
            "SELECT details->>'event_id', count(*) FROM events WHERE topic = 'patterns' "
            "GROUP BY 1"))
        expected = {f"p{n}" for _, n in self.producer.patterns}
        missing = expected - counts.keys()
        twice = {e: c for e, c in counts.items() if c > 1}
        extra = counts.keys() - expected
        if missing or twice or extra:
            self.problems.append(f"events: {len(missing)} missing ({sorted(missing)[:5]}), "
                                 f"{len(twice)} more than once, {len(extra)} not expected")
        return {"expected": len(expected), "missing": len(missing),
                "duplicated": sum(c - 1 for c in twice.values()), "unexpected": len(extra)}

    def recovery(self) -> dict[str, Any]:
        """From each round's end to an event sent after it delivered to every client."""
        done = [r for r in self.rounds if r.get("recovered_in") is not None]
        worst = max(done, key=lambda r: r["recovered_in"], default=None)
        by_kind: dict[str, float] = {}
        for r in done:
            for f in r["faults"]:
                by_kind[f["kind"]] = max(by_kind.get(f["kind"], 0.0), r["recovered_in"])
        return {
            "worst": None if worst is None else worst["recovered_in"],
            "worst_round": None if worst is None else " + ".join(
                f["kind"] for f in worst["faults"]),
            "median": round(statistics.median(r["recovered_in"] for r in done), 3)
            if done else None,
            "worst_by_kind": by_kind,
            "unrecovered": len(self.rounds) - len(done),
        }

    def memory(self) -> dict[str, Any]:
        """
        Max, and growth from the first and from the middle sample to the last,
        of both processes: bounded memory stops growing once what is kept by
        count or age (streams, history, dedupe window) is full.
        """
        def summary(column: int) -> dict[str, Any]:
            values = [s[column] for s in self.samples if s[column] is not None]
            if not values:
                return {}
            half = values[len(values) // 2]
            return {"first": values[0], "max": max(values), "last": values[-1],
                    "growth": round(values[-1] - values[0], 1),
                    "growth_last_half": round(values[-1] - half, 1)}

        return {"daemon_rss_mb": summary(1), "redis_used_mb": summary(2),
                "samples": len(self.samples),
                "note": "daemon RSS restarts from scratch at each kill_daemon"}

    def judge(self, summary: dict[str, Any]) -> None:
        events = summary["events"]
        for label, value in (
                ("out of order", events["out_of_order"]),
                ("ticks delivered twice", events["tick_duplicates"]),
                ("ticks out of order", events["ticks_out_of_order"]),
                ("newest ticks not delivered", events["newest_tick_missing"]),
                ("events without the producer's n", sum(c.foreign for c in self.clients)),
                ("subscribe errors", summary["clients"]["errors"]),
                ("resumes not recovered", summary["clients"]["resumed_unrecovered"])):
            if value:
                self.problems.append(f"{label}: {value}")
        for client in self.clients:
            for reply in client.unrecovered[:2]:
                self.problems.append(f"{client.name}: resumed, not recovered: {reply}")


def run_in_reactor(work: Callable[[], Any]) -> None:
    """Run the coroutine C{work} in the reactor; re-raise what it raised, or interruption."""
    outcome: list[Any] = []

    def go() -> None:
        d = ensureDeferred(work())
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if not outcome:
        raise KeyboardInterrupt
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="TickStock chaos run (see bench/README.md).")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of faults (60)")
    parser.add_argument("--seed", type=int, default=1, help="picks the faults and prices (1)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="events XADDed per second, a pattern every 4th, ticks "
                             "otherwise (200)")
    parser.add_argument("--clients", type=int, default=4, help="WebSocket clients (4)")
    parser.add_argument("--symbols", type=int, default=5, help="symbols, in turn (5)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of events before the first fault (3)")
    parser.add_argument("--recovery-timeout", type=float, default=60.0,
                        help="seconds a fault may take to recover before the run gives up "
                             "injecting (60)")
    parser.add_argument("--settle-timeout", type=float, default=120.0,
                        help="seconds the end may take to settle (120)")
    parser.add_argument("--sample-every", type=float, default=1.0,
                        help="seconds between memory samples (1)")
    parser.add_argument("--stream-maxlen", type=int, default=20_000,
                        help="the producer trims each stream to about this many entries "
                             "(XADD MAXLEN ~; 0: never), far above any backlog (20000)")
    parser.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for twistd tickstock (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    args = parser.parse_args(argv)
    if not (args.duration > 0 and args.rate > 0 and args.clients >= 1 and args.symbols >= 1
            and args.warmup >= 0 and args.recovery_timeout > 0 and args.settle_timeout > 0
            and args.sample_every > 0 and args.stream_maxlen >= 0):
        parser.error("--duration, --rate, --clients, --symbols, --recovery-timeout, "
                     "--settle-timeout and --sample-every must be positive, --warmup and "
                     "--stream-maxlen not negative")
    if args.stream_maxlen and args.stream_maxlen < 60 * args.rate:
        # Entries may wait 30 s for a claim: trimmed meanwhile, they would be lost.
        parser.error("--stream-maxlen must hold at least 60 s of --rate (0: no trimming)")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except SystemExit as stop:  # bad arguments: could not run (1), not a finding (2)
        return 0 if stop.code in (0, None) else 1

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    workdir = Path(tempfile.mkdtemp(prefix="tickstock-chaos-"))
    chaos = None
    keep = args.keep
    try:
        chaos = Chaos(args, workdir)
        chaos.setup()
        run_in_reactor(chaos.drive)
        summary = chaos.check()
        keep = keep or bool(chaos.problems)
    except (BenchError, OSError, subprocess.SubprocessError, TimeoutError,
            RuntimeError, AssertionError) as error:
        sys.stderr.write(f"chaos: could not run: {error}\n")
        if chaos is not None and chaos.daemon is not None:
            sys.stderr.write(f"daemon log:\n{tail(chaos.daemon.log)}\n")
        keep = True
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("chaos: interrupted\n")
        keep = True
        return 1
    finally:
        if chaos is not None:
            chaos.teardown()
        if keep:
            sys.stderr.write(f"chaos: logs kept in {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    if chaos.problems:
        for problem in chaos.problems:
            sys.stderr.write(f"chaos: {problem}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
