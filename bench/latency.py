#!/usr/bin/env python3
"""
TickStock delivery-latency benchmark: producer publish -> WebSocket client receive.

Starts its own redis-server and TickStock daemon, a load generator with C
WebSocket clients (bench/loadgen.py, a separate process), publishes pattern
events at a fixed rate R for D seconds, and prints one JSON object on stdout.
See bench/README.md for what each number means and the caveats.

    .venv/bin/python bench/latency.py --clients 100 --rate 100 --duration 10
    .venv/bin/python bench/latency.py --clients 100 --rate 100 --duration 10 --endpoint socketio

--endpoint socketio: the clients use TickStock's Socket.IO (/socket.io/,
Engine.IO v4 websocket-only) instead of /ws; same daemon, same events.

--server peer: python-socketio (bench/peer_socketio.py) instead of TickStock;
--server node: Node's Socket.IO with the Redis adapter (bench/node/server.mjs,
auth on), fed by its own producer (bench/node/producer.mjs, the Redis emitter)
with the same events on the same schedule.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"
PEER_MODULES = ("aiohttp", "socketio", "redis")
CHANNEL = b"tickstock.events.patterns"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CORE = 0
LOAD_CORE = 1

TICKERS = [
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK.B", "JPM", "V",
    "UNH", "XOM", "JNJ", "WMT", "MA", "PG", "AVGO", "HD", "CVX", "MRK",
    "ABBV", "KO", "PEP", "COST", "ADBE", "CRM", "NFLX", "AMD", "INTC", "CSCO",
    "SPY", "QQQ", "IWM", "XLF", "XLE", "XLK", "DIA", "TLT", "GLD", "SMH",
]
PATTERNS = [
    "Doji", "Hammer", "Bull_Flag", "Bear_Flag", "Engulfing_Bullish", "Engulfing_Bearish",
    "Morning_Star", "Evening_Star", "Head_Shoulders", "Double_Bottom", "Cup_Handle",
    "Ascending_Triangle",
]
TIMEFRAMES = ["1min", "5min", "15min", "daily"]
CAUGHT_UP_MS = 100.0


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


# ------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree(pid: int) -> list[int]:
    """A process and its descendants (the daemon's workers, with --workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as handle:
                pids += [int(p) for p in handle.read().split()]
        except OSError:
            pass
        i += 1
    return pids


def cpu_split(pid: int) -> tuple[float, float]:
    """utime and stime of a process and its descendants, from /proc/PID/stat."""
    user = system = 0.0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # fields[0] is field 3 (state)
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its descendants."""
    return sum(cpu_split(pid))


def core_busy() -> dict[int, float]:
    """Busy seconds (all but idle and iowait) of each CPU, from /proc/stat."""
    busy = {}
    with open("/proc/stat") as handle:
        for line in handle:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in values[:8]]
                busy[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
    return busy


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def rss_mb(pid: int) -> float:
    """VmRSS of a process and its descendants."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as handle:
                total += next(int(line.split()[1]) for line in handle
                              if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return round(total / 1024, 1)


def http_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, body.decode("utf-8", "replace")


def wait_until(what: str, check: Callable[[], bool], timeout: float,
               alive: Callable[[], None] = lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive()
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def pinned(core: int | None, argv: list[str]) -> list[str]:
    return argv if core is None else ["taskset", "-c", str(core), *argv]


# --------------------------------------------------------------- publisher


class Publisher:
    """
    PUBLISH (or XADD) over one plain socket, pipelined: every event due at a
    wake-up is written in one send. Replies (the number of subscribers each
    message reached, or the entry's id) are read as they come and checked.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending = b""
        self._bulk = False  # the next line is the body of a bulk reply
        self.replies = 0
        self.no_subscriber = 0
        self.errors: list[str] = []

    @staticmethod
    def command(*parts: bytes) -> bytes:
        out = [b"*%d\r\n" % len(parts)]
        for part in parts:
            out.append(b"$%d\r\n%s\r\n" % (len(part), part))
        return b"".join(out)

    def send(self, commands: list[bytes]) -> None:
        self.sock.sendall(b"".join(commands))
        self._read(block=False)

    def _read(self, block: bool) -> None:
        self.sock.setblocking(block)
        try:
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except BlockingIOError:
                    return
                if not chunk:
                    raise BenchError("redis closed the publisher connection")
                data = self._pending + chunk
                *lines, self._pending = data.split(b"\r\n")
                for line in lines:
                    if self._bulk:
                        self._bulk = False
                        continue
                    self.replies += 1
                    if line.startswith(b"$") and line != b"$-1":
                        self._bulk = True  # XADD's entry id follows
                    elif line.startswith(b":"):
                        if int(line[1:]) == 0:
                            self.no_subscriber += 1
                    elif len(self.errors) < 5:
                        self.errors.append(line.decode("utf-8", "replace"))
                if block:
                    return
        finally:
            self.sock.setblocking(True)

    def wait_replies(self, count: int, timeout: float = 10.0) -> None:
        self.sock.settimeout(timeout)
        try:
            while self.replies < count:
                self._read(block=True)
        finally:
            self.sock.settimeout(None)

    def ping(self) -> None:
        self.sock.sendall(self.command(b"PING"))
        self.sock.settimeout(5)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = self.sock.recv(64)
            if not chunk:
                raise BenchError("redis closed the connection")
            data += chunk
        self.sock.settimeout(None)
        if data != b"+PONG\r\n":
            raise BenchError(f"redis PING answered {data!r}")

    def close(self) -> None:
        self.sock.close()


def make_event(rng: random.Random, run_id: str, seq: int, symbol: str) -> dict[str, Any]:
    """
    A realistic pattern_detected event (docs/contract.md §1), made ahead of
    time; L{encode_event} adds C{timestamp} and C{sent_at} when it is sent.
    """
    return {
        "event_type": "pattern_detected",
        "symbol": symbol,
        "pattern": rng.choice(PATTERNS),
        "confidence": round(rng.uniform(0.5, 0.99), 3),
        "event_id": f"{run_id}-{seq}",
        "timeframe": rng.choice(TIMEFRAMES),
        "price": round(rng.uniform(20, 900), 2),
        "volume": rng.randint(10_000, 5_000_000),
        "direction": rng.choice(("bullish", "bearish")),
        "source": "TickStockPL",
    }


def encode_event(event: dict[str, Any], sent_at: float) -> bytes:
    """The message, stamped at publish time; repr(float) keeps every digit."""
    body = json.dumps(event, separators=(",", ":"))
    return (body[:-1] + ',"timestamp":' + repr(round(sent_at, 3))
            + ',"sent_at":' + repr(sent_at) + "}").encode()


# -------------------------------------------------------------- processes


class Procs:
    """The child processes, all stopped by L{stop_all} whatever happened."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        # Own session: a Ctrl-C reaches only this script, which then stops
        # the children in order (loadgen, daemon, redis).
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.items.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.items):
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for _name, proc in reversed(self.items):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


class LineReader:
    """Lines of a child's stdout, read by a thread, handed out with timeouts."""

    def __init__(self, stream: Any, name: str = "loadgen") -> None:
        self.name = name
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no {tag} line within {timeout:g}s")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise BenchError(f"{self.name} exited before {tag}")
            word, _, rest = line.partition(" ")
            if word == tag:
                return json.loads(rest)
            if word == "FAILED":
                raise BenchError(f"{self.name} failed: {json.loads(rest)['error']}")
            print(f"{self.name}: {line}", file=sys.stderr)


# ------------------------------------------------------------------ bench


def profile(args: argparse.Namespace) -> list[tuple[float, float]]:
    """
    The measured window as (seconds, events/s) segments: C{--rate} for
    C{--duration}; with C{--ramp-to}, C{--ramp-steps} equal steps from
    C{--rate} up to C{--ramp-to} over C{--duration} (geometric), then
    C{--recover} seconds at C{--rate} again.
    """
    if args.ramp_to is None:
        return [(args.duration, args.rate)]
    steps = args.ramp_steps
    step = args.duration / steps
    growth = (args.ramp_to / args.rate) ** (1 / max(1, steps - 1))
    return [*((step, args.rate * growth ** j) for j in range(steps)),
            (args.recover, args.rate)]


def due_times(segments: list[tuple[float, float]]) -> list[float]:
    """When each event is due, in seconds from the start, segment after segment."""
    due, start = [], 0.0
    for length, rate in segments:
        due += [start + i / rate for i in range(round(length * rate))]
        start += length
    return due


def timeline(result: dict[str, Any], first_measured: float, segments: list[tuple[float, float]],
             ) -> dict[str, Any]:
    """
    Per second of publishing (from the first measured event): the rate
    published, deliveries, and the worst latency; and, after a ramp, how
    long after its last step ended every later second's worst latency was
    under L{CAUGHT_UP_MS} again.
    """
    rates, start = {}, 0.0
    for length, rate in segments:
        for second in range(int(start), int(start + length)):
            rates[second] = round(rate)
        start += length
    seconds = []
    for key, (count, worst) in sorted(result["timeline"].items(), key=lambda kv: int(kv[0])):
        second = int(key) - int(first_measured)
        if second >= 0:
            seconds.append({"s": second, "rate": rates.get(second), "deliveries": count,
                            "worst_ms": worst})
    out: dict[str, Any] = {"seconds": seconds}
    if len(segments) > 1:
        overload_end = sum(length for length, _ in segments[:-1])
        late = [row["s"] for row in seconds if row["worst_ms"] >= CAUGHT_UP_MS]
        out["ramp_end_s"] = round(overload_end, 1)
        out["caught_up_s"] = max(0.0, late[-1] + 1 - overload_end) if late else 0.0
        if (late and late[-1] >= start - 1) or not seconds or seconds[-1]["s"] < start - 1:
            out["caught_up_s"] = None  # late, or nothing delivered, to the end
    return out


def symbol_list(n: int) -> list[str]:
    symbols = TICKERS[:n]
    i = 0
    while len(symbols) < n:
        symbols.append(f"SYM{i}")
        i += 1
    return symbols


def endpoint_of(args: argparse.Namespace) -> str:
    """The endpoint the clients use: the peers serve only Socket.IO."""
    return "socketio" if args.server in ("peer", "node") else args.endpoint


def peer_missing() -> list[str]:
    """What the python-socketio peer needs and this Python lacks (the "bench" extra)."""
    return [name for name in PEER_MODULES if importlib.util.find_spec(name) is None]


def node_ready() -> str:
    """
    The node binary, with bench/node's packages installed from its lockfile
    (npm ci) if they are not there yet.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        raise BenchError("--server node needs node (Node.js 18 or later) on the PATH")
    if not (NODE_DIR / "node_modules").is_dir():
        if npm is None:
            raise BenchError("--server node needs npm to install bench/node's packages")
        print("latency.py: npm ci in bench/node", file=sys.stderr)
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            raise BenchError(f"npm ci in {NODE_DIR} failed:\n{proc.stderr[-2000:]}")
    return node


def run(args: argparse.Namespace, procs: Procs, workdir: Path) -> dict[str, Any]:
    cores = os.sched_getaffinity(0)
    pin = shutil.which("taskset") is not None and {SERVER_CORE, LOAD_CORE} <= cores
    server_core, load_core = (SERVER_CORE, LOAD_CORE) if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, {LOAD_CORE})  # the publisher (this process) shares core 1
    else:
        print("warning: cannot pin to cores 0 and 1; running unpinned", file=sys.stderr)

    endpoint = endpoint_of(args)
    symbols = symbol_list(args.symbols)
    n_sym = len(symbols)
    watch = min(args.watch, n_sym)
    segments = profile(args)
    due_at = due_times([(args.warmup, args.rate), *segments])
    warmup_events = round(args.rate * args.warmup)
    total_events = len(due_at)
    measured_events = total_events - warmup_events
    measured_s = sum(length for length, _ in segments)
    if measured_events < 1:
        raise BenchError("--rate x --duration gives no events")

    # ---- redis
    redis_port = free_port()
    redis_log = workdir / "redis.log"
    redis_out = open(workdir / "redis.out", "wb")
    redis = procs.start("redis", pinned(load_core, [
        args.redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
        "--logfile", str(redis_log), "--daemonize", "no",
        *(() if (mb := args.redis_pubsub_limit) is None else (
            "--client-output-buffer-limit", f"pubsub {mb}mb {mb}mb 0")),
    ]), stdin=subprocess.DEVNULL, stdout=redis_out, stderr=subprocess.STDOUT)
    redis_out.close()

    def redis_alive() -> None:
        if redis.poll() is not None:
            raise BenchError(f"redis-server exited ({redis.returncode}):\n"
                             f"{tail(workdir / 'redis.out')}\n{tail(redis_log)}")

    def redis_up() -> bool:
        with socket.create_connection(("127.0.0.1", redis_port), timeout=0.5):
            return True

    wait_until("redis-server", redis_up, 10, redis_alive)
    publisher = Publisher(redis_port)
    publisher.ping()

    # ---- daemon
    ws_port = free_port()
    base = f"http://127.0.0.1:{ws_port}"
    daemon_log = workdir / "daemon.log"
    twistd = str(Path(sys.executable).parent / "twistd")
    if not os.path.exists(twistd):
        twistd = shutil.which("twistd") or "twistd"
    # Auth on, as in production: the daemon reads the secret from a file, the
    # load generator from its environment, and each client sends a JWT.
    secret = secrets.token_urlsafe(48)
    secret_file = workdir / "jwt-secret"
    secret_file.write_text(secret)
    node = node_ready() if args.server == "node" else ""
    if args.server == "peer":
        if missing := peer_missing():
            raise BenchError(f"--server peer needs {', '.join(missing)} in {sys.executable} "
                             f"(the \"bench\" extra: pip install -c constraints.txt "
                             f"'.[bench]')")
        server_argv = [sys.executable, str(HERE / "peer_socketio.py"), "--port", str(ws_port),
                       "--redis", f"redis://127.0.0.1:{redis_port}/0"]
    elif args.server == "node":
        server_argv = [node, str(NODE_DIR / "server.mjs"), "--port", str(ws_port),
                       "--redis", f"redis://127.0.0.1:{redis_port}/0",
                       "--jwt-secret-file", str(secret_file)]
    else:
        server_argv = [twistd, "-n", "--pidfile=", "tickstock",
                       "--redis", f"redis://127.0.0.1:{redis_port}/0",
                       "--listen", f"tcp:{ws_port}:interface=127.0.0.1",
                       "--jwt-secret-file", str(secret_file),
                       # Every client comes from one address (and may share a user).
                       "--max-connections-per-ip", "0", "--max-connections-per-user", "0",
                       "--mode", args.mode]
    with open(daemon_log, "wb") as log:
        if args.workers > 1:
            # One core is not enough for several workers; none is pinned.
            server_argv += ["--workers", str(args.workers)]
        unpinned = args.workers > 1 or args.unpinned_server
        daemon = procs.start("daemon", pinned(None if unpinned else server_core,
                                              server_argv), cwd=str(workdir),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def daemon_alive() -> None:
        redis_alive()
        if daemon.poll() is not None:
            raise BenchError(f"daemon exited ({daemon.returncode}):\n{tail(daemon_log)}")

    wait_until("the daemon's /ready", lambda: http_json(base + "/ready", 1)[0] == 200,
               30, daemon_alive)
    rss_before_clients = rss_mb(daemon.pid)

    # ---- load generator
    loadgen_err = workdir / "loadgen.err"
    with open(loadgen_err, "wb") as err:
        loadgen = procs.start("loadgen", pinned(load_core, [
            sys.executable, str(HERE / "loadgen.py"),
            "--port", str(ws_port), "--clients", str(args.clients),
            "--symbols", ",".join(symbols), "--watch", str(watch),
            "--warmup-events", str(warmup_events),
            "--drain", str(args.drain),
            "--endpoint", "peer" if args.server in ("peer", "node") else args.endpoint,
            *(("--offsets",) if args.offsets else ()),
            *(("--peer-token",) if args.server == "node" else ()),
        ]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
            env={**os.environ, "TICKSTOCK_JWT_SECRET": secret})
    lines = LineReader(loadgen.stdout)
    try:
        ready = lines.expect("READY", 60 + args.clients * 0.05)
    except BenchError as error:
        daemon_alive()
        raise BenchError(f"{error}\n{tail(loadgen_err)}") from None
    status, health = http_json(base + "/health")
    # A Socket.IO session is also subscribed to its user's backtests and to
    # system health, at CONNECT.
    subs_each = 3 if endpoint == "socketio" and args.server == "tickstock" else 1
    # (with --workers, /health is one worker's: each answers for itself)
    if args.workers == 1 and (health.get("clients") != args.clients
                              or health.get("subscriptions") != args.clients * subs_each):
        raise BenchError(f"daemon reports clients={health.get('clients')} "
                         f"subscriptions={health.get('subscriptions')}, expected "
                         f"{args.clients} and {args.clients * subs_each}")

    if args.idle:
        return idle(args, daemon.pid, rss_before_clients, ready, loadgen, lines)

    clients_of = {symbol: 0 for symbol in symbols}
    for k in range(args.clients):
        for j in range(watch):
            clients_of[symbols[(k + j) % n_sym]] += 1
    warmup_deliveries = sum(clients_of[symbols[s % n_sym]] for s in range(warmup_events))
    settled = True

    # ---- publish: warm-up, then the measured window, on one absolute schedule
    rng = random.Random(42)
    run_id = f"bench{os.getpid()}"
    templates = [make_event(rng, run_id, seq, symbols[seq % n_sym]) for seq in range(total_events)]
    server_user0 = server_sys0 = loadgen_cpu0 = redis_cpu0 = self_cpu0 = producer_cpu0 = 0.0
    cores0: dict[int, float] = {}
    health0: dict[str, Any] = {}
    interval = 1.0 / args.rate
    producer: subprocess.Popen[Any] | None = None

    def sample(due: float) -> None:
        """
        Between the last warm-up event and the first measured one (due at
        monotonic time C{due}): let the server finish the warm-up fan-out
        first (if it can before then), so that the window's CPU and counters
        belong to the measured events only; then take the baselines.
        """
        nonlocal health0, settled, server_user0, server_sys0, loadgen_cpu0, redis_cpu0
        nonlocal cores0, self_cpu0, producer_cpu0
        while True:
            health0 = http_json(base + "/health")[1]["events"]
            settled = (health0["received"] >= warmup_events
                       and health0["delivered"] >= warmup_deliveries)
            if args.workers > 1:
                settled = False  # one worker's counters: wait until the event is due
            if settled or time.monotonic() >= due:
                break
            time.sleep(0.002)
        server_user0, server_sys0 = cpu_split(daemon.pid)
        loadgen_cpu0 = cpu_seconds(loadgen.pid)
        redis_cpu0 = cpu_seconds(redis.pid)
        producer_cpu0 = cpu_seconds(producer.pid) if producer else 0.0
        cores0, self_cpu0 = core_busy(), self_cpu()

    if args.server == "node":
        # The peer's own ingestion path: its producer emits the same events on
        # the same schedule through @socket.io/redis-emitter; this process
        # only takes the baselines between warm-up and measured window.
        plan = workdir / "plan.json"
        plan.write_text(json.dumps({"events": templates, "due": due_at,
                                    "warmup": warmup_events}))
        producer_err = workdir / "producer.err"
        with open(producer_err, "wb") as err:
            producer = procs.start("producer", pinned(load_core, [
                node, str(NODE_DIR / "producer.mjs"),
                "--redis", f"redis://127.0.0.1:{redis_port}/0", "--plan", str(plan),
            ]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                bufsize=1)
        said = LineReader(producer.stdout, "producer")
        try:
            said.expect("READY", 30)
            warmed = said.expect("WARMED", args.warmup + 30)
            sample(time.monotonic() + warmed["due_in"])
            assert producer.stdin is not None
            producer.stdin.write("MEASURE\n")
            producer.stdin.flush()
            sent = said.expect("SENT", measured_s + 60)
        except BenchError as error:
            daemon_alive()
            raise BenchError(f"{error}\n{tail(producer_err)}") from None
        first_measured, last_sent, lags = sent["first_measured"], sent["last_sent"], sent["lags"]
        no_subscriber, publish_errors = sent["no_subscriber"], sent["errors"]
    else:
        publish = Publisher.command
        sampled = False
        first_measured = last_sent = 0.0
        lags = []
        verb = ((b"PUBLISH", CHANNEL) if args.mode == "pubsub"
                else (b"XADD", CHANNEL, b"*", b"data"))
        t0 = time.monotonic() + 0.05
        seq = 0
        while seq < total_events:
            if seq == warmup_events and not sampled:
                sample(t0 + due_at[seq])
                sampled = True
            limit = total_events if sampled else warmup_events
            now = time.monotonic()
            batch = []
            while seq < limit and t0 + due_at[seq] <= now:
                if sampled:
                    lags.append(now - (t0 + due_at[seq]))
                sent_at = time.time()
                if seq == warmup_events:
                    first_measured = sent_at
                batch.append(publish(*verb, encode_event(templates[seq], sent_at)))
                last_sent = sent_at
                seq += 1
            if batch:
                publisher.send(batch)
            if seq < limit:
                delay = t0 + due_at[seq] - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        publisher.wait_replies(total_events)
        no_subscriber, publish_errors = publisher.no_subscriber, publisher.errors
    window_s = last_sent - first_measured + interval  # as published, with its jitter

    # ---- drain: wait until every expected delivery has arrived (or loss is certain)
    per_symbol = {symbol: 0 for symbol in symbols}
    for s in range(warmup_events, total_events):
        per_symbol[symbols[s % n_sym]] += 1
    assert loadgen.stdin is not None
    loadgen.stdin.write("END " + json.dumps({"per_symbol": per_symbol}) + "\n")
    loadgen.stdin.flush()
    lines.expect("DONE", args.drain + 180)
    server_user, server_sys = cpu_split(daemon.pid)
    server_user, server_sys = server_user - server_user0, server_sys - server_sys0
    server_cpu = server_user + server_sys
    loadgen_cpu = cpu_seconds(loadgen.pid) - loadgen_cpu0
    redis_cpu = cpu_seconds(redis.pid) - redis_cpu0
    cores1, bench_cpu = core_busy(), self_cpu() - self_cpu0
    producer_cpu = cpu_seconds(producer.pid) - producer_cpu0 if producer else 0.0
    drained_at = time.time()
    server_rss = rss_mb(daemon.pid)
    health1 = http_json(base + "/health")[1]
    source1 = http_json(base + "/ready")[1].get("components", {}).get("source", {})
    result = lines.expect("RESULT", 120)
    daemon_alive()

    expected = sum(per_symbol[s] * clients_of[s] for s in symbols)
    received = result["received"]
    lat = result["latency_ms"]
    lags.sort()
    span = drained_at - first_measured
    # CPU time spent on our two cores by anything that is not this benchmark:
    # other work on the machine shows up here, and in the latency tails.
    other = {}
    if pin:
        # (accurate to a few hundredths: /proc counts in ticks)
        other[f"core{SERVER_CORE}"] = round(max(0.0, (
            cores1[SERVER_CORE] - cores0[SERVER_CORE] - server_cpu) / span), 2)
        other[f"core{LOAD_CORE}"] = round(max(0.0, (
            cores1[LOAD_CORE] - cores0[LOAD_CORE] - loadgen_cpu - redis_cpu - bench_cpu
            - producer_cpu)
            / span), 2)
    events1, slow = health1["events"], health1.get("slow_consumers_closed")
    overload = health1.get("overload", {})

    out: dict[str, Any] = {
        "server": args.server,
        "endpoint": endpoint,
        "socketio_offsets": args.offsets if endpoint == "socketio" else None,
        "workers": args.workers,
        "scenario": args.scenario or (
            f"patterns fan-out: {args.clients} clients, {n_sym} symbol(s)"
            + (f", {watch} watched per client" if watch > 1 else "")
            + (f", {args.rate:g} ev/s for {args.duration:g}s" if args.ramp_to is None else
               f", {args.rate:g} up to {args.ramp_to:g} ev/s over {args.duration:g}s, then "
               f"{args.rate:g} for {args.recover:g}s")
            + ("" if args.mode == "pubsub" else " (streams)")),
        "mode": args.mode,
        "redis_pubsub_limit_mb": args.redis_pubsub_limit,
        "clients": args.clients,
        "symbols": n_sym,
        "watch": watch,
        "rate": args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "events": measured_events,
        "expected": expected,
        "received": received,
        "loss": expected - received,
        "latency_ms": {k: lat[k] for k in ("p50", "p90", "p99", "max")},
        "server_cpu_s": round(server_cpu, 3),
        "cpu_s_per_100k_deliveries": (
            round(server_cpu / received * 100_000, 3) if received else None),
        "server_rss_mb": server_rss,
        "deliveries_per_s": round(received / measured_s, 1),
        "checks": {
            "duplicates": result["duplicates"],
            "out_of_order": result["out_of_order"],
            "misrouted": result["misrouted"],
            "server_closes": result["server_closes"],
            "lost_connections": result["lost_connections"],
            "client_errors": result["errors"],
            "per_client_received": result["per_client"],
            "server_events_received": events1["received"] - health0["received"],
            "server_events_routed": events1.get("routed", 0) - health0.get("routed", 0),
            "server_delivered": events1["delivered"] - health0["delivered"],
            "server_malformed": events1.get("malformed", 0),
            "slow_consumers_closed": slow,
            "live_gaps_closed": health1.get("live_gaps_closed"),
            "publish_no_subscriber": no_subscriber,
            "publish_errors": publish_errors,
        },
        "diagnostics": {
            "latency_ms_more": {k: lat[k] for k in ("min", "mean", "p99.9")},
            # the same deliveries, timed when the load generator read them
            # rather than when the kernel queued them on the client's socket
            "latency_ms_loadgen_read": {
                k: result["app_latency_ms"][k] for k in ("p50", "p90", "p99", "max")},
            "untimed_reads": result["untimed_reads"],
            "window_s": round(window_s, 3),
            "warmup_settled": settled,
            "drain_s": round(drained_at - last_sent, 3),
            "publisher_lag_ms": {
                "p99": round(lags[int(len(lags) * 0.99) - 1 if len(lags) > 1 else 0] * 1000, 3),
                "max": round(lags[-1] * 1000, 3),
            },
            "loadgen_cpu_s": round(loadgen_cpu, 3),
            "loadgen_busy": round(loadgen_cpu / span, 3),
            "server_busy": round(server_cpu / span, 3),
            # where the server's CPU went: its own code (user) or the kernel's
            # (system: mostly the socket writes, on loopback the receive path too)
            "server_cpu_user_s": round(server_user, 3),
            "server_cpu_system_s": round(server_sys, 3),
            # the node producer's, or this process's (the python publisher)
            "publisher_cpu_s": round(producer_cpu if producer else bench_cpu, 3),
            "other_load_on_cores": other,
            "redis_cpu_s": round(redis_cpu, 3),
            "connect_s": ready["connect_s"],
            "pinned": pin,
            # whether the daemon was behind (late events, clients backlogged) and why
            # it closed clients it did close
            "overload": overload,
            "shed": events1.get("shed"),
            # a pub/sub subscriber: how often it stopped reading, fell behind its
            # input, and the most Redis held for it (see --redis-pubsub-limit)
            "source": {k: source1.get(k) for k in (
                "pauses", "fell_behind", "backlog_bytes", "gaps") if k in source1},
        },
        "timeline": timeline(result, first_measured, segments),
    }
    if args.ramp_to is not None:
        out["profile"] = [{"seconds": round(length, 2), "rate": round(rate, 1)}
                          for length, rate in segments]
    publisher.close()
    return out


def idle(args: argparse.Namespace, pid: int, rss_before: float, ready: dict[str, Any],
         loadgen: subprocess.Popen[Any], lines: LineReader) -> dict[str, Any]:
    """
    Memory of idle connections: every client authenticated and subscribed,
    nothing published; RSS growth from before the first client, per client.
    """
    time.sleep(args.duration)  # let allocator and garbage collector settle
    rss_after = rss_mb(pid)
    cpu = cpu_seconds(pid)
    assert loadgen.stdin is not None
    loadgen.stdin.write("END " + json.dumps({"per_symbol": {}}) + "\n")
    loadgen.stdin.flush()
    lines.expect("DONE", 60)
    result = lines.expect("RESULT", 60)
    return {
        "server": args.server,
        "endpoint": endpoint_of(args),
        "scenario": args.scenario or f"idle: {args.clients} subscribed clients",
        "clients": args.clients,
        "server_rss_mb_before": rss_before,
        "server_rss_mb": rss_after,
        "kb_per_connection": round((rss_after - rss_before) * 1024 / args.clients, 2),
        "server_cpu_s_total": round(cpu, 3),
        "connect_s": ready["connect_s"],
        "checks": {"lost_connections": result["lost_connections"],
                   "server_closes": result["server_closes"], "client_errors": result["errors"]},
    }


def faults(out: dict[str, Any]) -> list[str]:
    """What makes a run's numbers untrustworthy (exit status 2)."""
    checks, problems = out["checks"], []
    if out.get("loss"):
        problems.append(f"loss={out['loss']}")
    for name in ("duplicates", "out_of_order", "misrouted", "lost_connections",
                 "publish_no_subscriber", "slow_consumers_closed", "live_gaps_closed"):
        if checks.get(name):
            problems.append(f"{name}={checks[name]}")
    for name in ("server_closes", "client_errors", "publish_errors", "server_malformed"):
        if checks.get(name):
            problems.append(f"{name}={checks[name]}")
    if "diagnostics" in out and out["diagnostics"]["loadgen_busy"] > 0.8:
        problems.append("the load generator was over 80% busy: it may be the bottleneck")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TickStock delivery-latency benchmark.")
    parser.add_argument("--clients", type=int, default=100, help="WebSocket clients (100)")
    parser.add_argument("--rate", type=float, default=100.0, help="events per second (100)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="measured publishing window in seconds (10)")
    parser.add_argument("--symbols", type=int, default=1,
                        help="symbols; clients spread evenly, events round-robin (1)")
    parser.add_argument("--watch", type=int, default=1,
                        help="symbols per client (a watchlist): client k watches symbols "
                             "k .. k+W-1 (mod --symbols) in one subscription (1)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds published at the same rate before measuring (2)")
    parser.add_argument("--drain", type=float, default=3.0,
                        help="after publishing, give up waiting once nothing arrives for "
                             "this long, in seconds (3)")
    parser.add_argument("--scenario", default=None, help="a name for this run in the output")
    parser.add_argument("--server", choices=("tickstock", "peer", "node"), default="tickstock",
                        help="peer: the python-socketio reference (bench/peer_socketio.py); "
                             "node: Socket.IO 4.8 on Node with the Redis adapter and emitter "
                             "(bench/node/), pinned like the daemon")
    parser.add_argument("--endpoint", choices=("ws", "socketio"), default="ws",
                        help="TickStock's endpoint the clients use: /ws, or Socket.IO on "
                             "/socket.io/ over Engine.IO's websocket-only transport (ws)")
    parser.add_argument("--offsets", action="store_true",
                        help="socketio: clients take each event's id as its last argument "
                             "(the Socket.IO offset); by default they CONNECT with "
                             "offsets: false")
    parser.add_argument("--workers", type=int, default=1,
                        help="run the daemon with --workers N (then unpinned)")
    parser.add_argument("--unpinned-server", action="store_true",
                        help="do not pin the server to core 0 (implied by --workers > 1)")
    parser.add_argument("--idle", action="store_true",
                        help="publish nothing; measure memory per idle connection "
                             "(--duration: seconds to let it settle)")
    parser.add_argument("--mode", choices=("pubsub", "streams"), default="pubsub",
                        help="the daemon's --mode; streams: the bench XADDs instead of "
                             "PUBLISH (pubsub)")
    parser.add_argument("--ramp-to", type=float, default=None,
                        help="overload: raise the rate from --rate to this over --duration, "
                             "in --ramp-steps steps, then --recover seconds at --rate")
    parser.add_argument("--ramp-steps", type=int, default=5, help="steps of --ramp-to (5)")
    parser.add_argument("--recover", type=float, default=15.0,
                        help="seconds at --rate after --ramp-to's last step (15)")
    parser.add_argument("--redis-server", default="/usr/bin/redis-server")
    parser.add_argument("--redis-pubsub-limit", type=int, default=None, metavar="MB",
                        help="Redis's pub/sub output-buffer limit for a subscriber, in MB "
                             "(default Redis's own: 32, or 8 for a minute); a pub/sub daemon "
                             "behind its clients lets Redis hold up to half of it")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (logs of redis, daemon, loadgen)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rate <= 0 or args.duration <= 0 or args.symbols < 1:
        parser.error("--clients, --rate, --duration and --symbols must be positive")
    if args.ramp_to is not None and (args.ramp_to <= args.rate or args.ramp_steps < 1
                                     or args.recover <= 0):
        parser.error("--ramp-to must exceed --rate, --ramp-steps and --recover be positive")
    if args.offsets and (args.endpoint != "socketio" or args.server != "tickstock"):
        parser.error("--offsets needs --endpoint socketio (and the TickStock server)")
    if args.server == "node" and (args.mode != "pubsub" or args.workers > 1):
        parser.error("--server node: one process, fed by its emitter (no --mode streams, "
                     "no --workers)")
    if args.symbols > args.clients:
        parser.error("--symbols must not exceed --clients (a symbol nobody receives)")

    # SIGTERM stops the run like Ctrl-C, so the finally below still cleans up.
    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Many connections need many descriptors, here and in the children.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.clients * 2 + 100 > hard:
        print(f"latency.py: warning: {args.clients} clients need more file descriptors than "
              f"the limit of {hard}", file=sys.stderr)  # even if started with it ignored
    workdir = Path(tempfile.mkdtemp(prefix="tickstock-bench-"))
    procs = Procs()
    keep = args.keep
    try:
        out = run(args, procs, workdir)
        print(json.dumps(out))
        sys.stdout.flush()
        problems = faults(out)
        if problems:
            print("latency.py: NOT CLEAN: " + "; ".join(problems), file=sys.stderr)
            return 2
        return 0
    except BenchError as error:
        keep = True
        print(f"latency.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("latency.py: interrupted; stopping everything", file=sys.stderr)
        return 130
    except BaseException:
        keep = True
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if keep:
            print(f"latency.py: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
