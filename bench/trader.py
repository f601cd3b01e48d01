#!/usr/bin/env python3
"""
The trader scenario (issue 25): many clients, each watching a watchlist's
patterns and ticks, a producer publishing both at fixed rates; what one
TickStock daemon sustains.

    .venv/bin/python bench/trader.py --clients 5000 --symbols 500 --watch 20 \\
        --patterns-rate 2000 --ticks-rate 5000 --duration 20 --warmup 5

Starts its own redis-server (pinned to the load core) and TickStock daemon
(auth on, pinned to the server core, C{--tick-rate}: ticks per second per
symbol per client), then a client process (this file with C{--child}, pinned
to the load core): one epoll loop, bench/loadgen.py's WebSocket client, each
client sending hello with a JWT and two subscriptions on /ws, patterns ("p")
and ticks ("t") of the same symbols. Client k watches symbols k*W .. k*W+W-1
(mod S). This process publishes patterns on tickstock.events.patterns and
ticks on tickstock.data.ticks, evenly spread, symbols round-robin, each
message stamped with C{sent_at} (time.time()); latency = the kernel's receive
time of the frame - sent_at.

The offered load is far more than one core delivers at full scale (patterns
alone: rate x clients watching a symbol); the numbers are what it sustains.
Patterns are must-deliver (loss = events x watchers - received, after a
drain); ticks are latest-only (received against offered, no loss).

--server node: the same clients and schedule against the Node peer
(bench/node/server.mjs: Socket.IO 4.8 + the Redis adapter, auth on, pinned to
the server core), the clients subscribing over Socket.IO to the rooms
"patterns:SYM" and "ticks:SYM", fed by bench/node/trader_producer.mjs (the
Redis emitter, on the load core) with the same payloads, which it stamps with
C{sent_at}. The peer does not pace ticks: at 5,000 ticks/s over 500 symbols
(10 per symbol per second) TickStock's --tick-rate 10 drops none either.

One JSON object on stdout; exit status 1 when the run failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import resource
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import latency as lt  # noqa: E402
import loadgen as lg  # noqa: E402

PATTERNS_CHANNEL = b"tickstock.events.patterns"
TICKS_CHANNEL = b"tickstock.data.ticks"
BUCKET_S = 0.0001  # latency histogram resolution
BUCKETS = 1_200_000  # up to 120 s; later ones count in the last bucket


# ------------------------------------------------------------------ client side


class Tally:
    """One topic's measured deliveries: count and a latency histogram."""

    def __init__(self) -> None:
        self.received = 0
        self.warmup = 0
        self.hist = array("I", bytes(4 * BUCKETS))

    def add(self, latency: float) -> None:
        self.received += 1
        slot = int(latency / BUCKET_S)
        self.hist[slot if 0 <= slot < BUCKETS else (0 if slot < 0 else BUCKETS - 1)] += 1

    def percentiles(self) -> dict[str, float | None]:
        points = (50, 90, 99, 99.9)
        total = sum(self.hist) if self.received else 0
        out: dict[str, float | None] = {f"p{p:g}": None for p in points}
        out["max"] = None
        if not total:
            return out
        ranks = [(p, max(1, -(-total * p // 100))) for p in points]
        seen, i = 0, 0
        for slot, n in enumerate(self.hist):
            if not n:
                continue
            seen += n
            while i < len(ranks) and seen >= ranks[i][1]:
                out[f"p{ranks[i][0]:g}"] = round((slot + 1) * BUCKET_S * 1000, 1)
                i += 1
            out["max"] = round((slot + 1) * BUCKET_S * 1000, 1)
        return out


class TraderStats(lg.Stats):
    """Loadgen's counters, plus one tally per topic and a per-second timeline."""

    def __init__(self, warmup_patterns: int, warmup_ticks: int) -> None:
        super().__init__(warmup_patterns)
        self.warmup_ticks = warmup_ticks
        self.patterns = Tally()
        self.ticks = Tally()
        self.all_patterns = 0  # deliveries of any event, warm-up too, for snapshots
        self.all_ticks = 0
        self.other_ops: dict[str, int] = {}
        # By the second of the receive time: [pattern deliveries, tick deliveries]
        self.by_second: dict[int, list[int]] = {}


class Trader(lg.Client):
    """
    A client with two subscriptions, patterns ("p") and ticks ("t"): on /ws,
    or (--server node) on the Node peer's Socket.IO, in its rooms.
    """

    __slots__ = ("acked", "watching")

    def __init__(self, loop: lg.Loop, index: int, symbols: list[str]) -> None:
        super().__init__(loop, index, symbols)
        self.acked: set[str] = set()
        self.watching = frozenset(symbols)

    def text(self, payload: bytes, stamp: float, now: float) -> None:
        if self.loop.endpoint == "peer":
            self.node_text(payload, stamp, now)
            return
        stats = self.stats
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            stats.bad_frames += 1
            return
        op = message.get("op") if isinstance(message, dict) else None
        if op == "event":
            self.event(message, stamp, now)
        elif op == "welcome" and self.state == lg.HELLO:
            self.state = lg.SUBSCRIBING
            for sub_id, topic in (("p", "patterns"), ("t", "ticks")):
                self.send_json({"op": "subscribe", "id": sub_id, "topic": topic,
                                "filter": {"symbols": self.symbols}})
        elif op == "subscribed" and self.state == lg.SUBSCRIBING:
            self.acked.add(message.get("id"))
            if self.acked == {"p", "t"}:
                self.went_live()
        elif op == "error":
            if len(stats.errors) < 10:
                stats.errors.append({"client": self.index, **message})
            if self.state != lg.LIVE:
                raise lg.Failure(f"client {self.index}: {message}")
        elif op != "pong":
            stats.other_ops[str(op)] = stats.other_ops.get(str(op), 0) + 1

    def node_text(self, payload: bytes, stamp: float, now: float) -> None:
        """
        Engine.IO v4 / Socket.IO v5 packets of bench/node/server.mjs: CONNECT
        with the JWT, then one subscribe per topic (rooms "patterns:SYM" and
        "ticks:SYM"); an event's payload is the /ws frame, so the accounting
        is the same.
        """
        stats = self.stats
        if payload.startswith(lg.SIO_EVENT_PREFIX):
            try:
                message = orjson.loads(payload[2:])[1]
            except (orjson.JSONDecodeError, IndexError):
                stats.bad_frames += 1
                return
            self.event(message, stamp, now)
        elif payload == b"2":  # Engine.IO ping
            self.write(lg.client_frame(1, b"3"))
        elif payload.startswith(b"0") and self.state == lg.HELLO:  # Engine.IO open
            token = lg.mint_token(f"bench-{self.index}")
            self.write(lg.client_frame(1, b"40" + orjson.dumps({"token": token})))
        elif payload.startswith(b"40") and self.state == lg.HELLO:  # namespace connected
            self.state = lg.SUBSCRIBING
            for sub_id, topic in (("p", "patterns"), ("t", "ticks")):
                self.write(lg.client_frame(1, b"42" + orjson.dumps(
                    ["subscribe", {"id": sub_id, "topic": topic, "symbols": self.symbols}])))
        elif payload.startswith(b'42["subscribed"') and self.state == lg.SUBSCRIBING:
            try:
                self.acked.add(orjson.loads(payload[2:])[1]["id"])
            except (orjson.JSONDecodeError, IndexError, KeyError, TypeError):
                raise lg.Failure(f"client {self.index}: {payload[:200]!r}") from None
            if self.acked == {"p", "t"}:
                self.went_live()
        elif payload.startswith(b"44") and self.state != lg.LIVE:  # CONNECT_ERROR
            raise lg.Failure(f"client {self.index}: {payload[:200]!r}")
        elif payload in (b"41", b"1"):  # the server ended the session
            self.lost("the server ended the Socket.IO session")
        else:
            op = payload[:20].decode("utf-8", "replace")
            stats.other_ops[op] = stats.other_ops.get(op, 0) + 1

    def event(self, message: dict[str, Any], stamp: float, now: float) -> None:
        stats = self.stats
        try:
            data = message["data"]
            sent_at = data["sent_at"]
            sub = message["sub"]
            if sub == "p":
                event_id = data["event_id"]
                seq = int(event_id[event_id.rfind("-") + 1:])
            else:
                seq = data["bench_seq"]
        except (KeyError, TypeError, ValueError):
            stats.bad_frames += 1
            return
        second = stats.by_second.get(int(stamp))
        if second is None:
            second = stats.by_second[int(stamp)] = [0, 0]
        if data.get("symbol") not in self.watching:
            stats.misrouted += 1
        if sub == "p":
            stats.all_patterns += 1
            second[0] += 1
            # One subscription, one stream: ids only rise (a repeat is counted here too).
            if seq <= self.last_seq:
                stats.out_of_order += 1
            self.last_seq = seq
            if seq < stats.warmup_events:
                stats.warmup_received += 1
                return
            self.count += 1
            stats.patterns.add(stamp - sent_at)
        elif sub == "t":
            stats.all_ticks += 1
            second[1] += 1
            if seq < stats.warmup_ticks:
                return
            stats.ticks.add(stamp - sent_at)
        else:
            stats.misrouted += 1


def child(args: argparse.Namespace) -> None:
    """
    The clients. Control lines as loadgen's: READY; SNAP -> SNAP {counts};
    END {per_symbol} -> drain the measured patterns -> DONE, RESULT.
    """
    node = args.server == "node"
    ns = argparse.Namespace(host="127.0.0.1", port=args.port,
                            endpoint="peer" if node else "ws", offsets=False,
                            peer_token=node, path=None, warmup_events=args.warmup_patterns,
                            symbols=args.symbol_list)
    loop = lg.Loop(ns)
    stats = loop.stats = TraderStats(args.warmup_patterns, args.warmup_ticks)
    symbols = loop.symbols
    n = len(symbols)
    view = memoryview(bytearray(lg.READ_SIZE))

    started = time.monotonic()
    deadline = started + args.connect_timeout
    next_index = 0
    while loop.live < args.clients:
        while next_index < args.clients and len(loop.all) - loop.live < 50:
            k = next_index
            loop.register(Trader(loop, k, [symbols[(k * args.watch + j) % n]
                                           for j in range(args.watch)]))
            next_index += 1
        loop.poll(0.05, view)
        if time.monotonic() > deadline:
            raise lg.Failure(f"only {loop.live} of {args.clients} clients subscribed "
                             f"within {args.connect_timeout:g}s")
    connect_s = time.monotonic() - started
    gc.collect()
    gc.freeze()
    gc.disable()
    loop.epoll.register(0, select.EPOLLIN)
    lg.emit("READY", {"clients": loop.live, "connect_s": round(connect_s, 3)})

    def counts() -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"at": time.time(), "patterns": stats.all_patterns, "ticks": stats.all_ticks,
                "cpu_s": usage.ru_utime + usage.ru_stime}

    command = ""
    while not command.startswith("END "):
        loop.poll(0.05, view)
        while loop.commands:
            command = loop.commands.pop(0)
            if command == "SNAP":
                lg.emit("SNAP", counts())
            elif command.startswith("END "):
                break
            else:
                raise lg.Failure(f"unexpected command {command!r}")
    per_symbol = orjson.loads(command[4:])["per_symbol"]
    for client in loop.all:
        client.expected = sum(int(per_symbol.get(symbol, 0)) for symbol in client.symbols)
    expected = sum(client.expected for client in loop.all)

    end_counts = counts()
    hard_stop = time.monotonic() + args.max_wait
    last_count, last_change = stats.patterns.received, time.monotonic()
    while stats.patterns.received < expected:
        loop.poll(0.01, view)
        now = time.monotonic()
        if stats.patterns.received != last_count:
            last_count, last_change = stats.patterns.received, now
        elif now - last_change > args.drain or now > hard_stop:
            break
    lg.emit("DONE", {"complete": stats.patterns.received >= expected, "at": time.time()})
    short = [c for c in loop.all if c.count != c.expected]
    result = {
        "connect_s": round(connect_s, 3),
        "end": end_counts,
        "patterns": {"expected": expected, "received": stats.patterns.received,
                     "warmup_received": stats.warmup_received,
                     "latency_ms": stats.patterns.percentiles(),
                     "clients_short": len(short)},
        "ticks": {"received": stats.ticks.received, "latency_ms": stats.ticks.percentiles()},
        "out_of_order": stats.out_of_order,
        "misrouted": stats.misrouted,
        "bad_frames": stats.bad_frames,
        "other_ops": stats.other_ops,
        "lost_connections": stats.lost_connections,
        "server_closes": stats.closes,
        "errors": stats.errors,
        "untimed_reads": stats.untimed_reads,
        "by_second": {str(s): v for s, v in sorted(stats.by_second.items())},
    }
    for client in loop.all:
        client.close()
    lg.emit("RESULT", result)


# ------------------------------------------------------------------ producer side


def schedule(patterns_rate: float, ticks_rate: float, seconds: float) -> list[tuple[float, int]]:
    """(due, kind) of every message, in order: kind 0 a pattern, 1 a tick."""
    plan = [(i / patterns_rate, 0) for i in range(round(seconds * patterns_rate))]
    plan += [(j / ticks_rate, 1) for j in range(round(seconds * ticks_rate))]
    plan.sort()
    return plan


def tick_message(symbol: str, seq: int, price: float, sent_at: float) -> bytes:
    """A tick as the producer sends one (tests/socketio_stack.py), stamped and numbered."""
    return (b'{"event_type":"tick","symbol":"%s","price":%.2f,"volume":%d,"bench_seq":%d,'
            b'"timestamp":%s,"sent_at":%s}' % (symbol.encode(), price, 100 + seq % 900, seq,
                                               repr(round(sent_at, 3)).encode(),
                                               repr(sent_at).encode()))


def run(args: argparse.Namespace, procs: lt.Procs, workdir: Path) -> dict[str, Any]:
    cores = os.sched_getaffinity(0)
    pin = shutil.which("taskset") is not None and {lt.SERVER_CORE, lt.LOAD_CORE} <= cores
    server_core, load_core = (lt.SERVER_CORE, lt.LOAD_CORE) if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, {lt.LOAD_CORE})
    else:
        print("trader.py: warning: cannot pin to cores 0 and 1; running unpinned",
              file=sys.stderr)
    symbols = lt.symbol_list(args.symbols)
    n_sym = len(symbols)
    watch = args.watch
    watchers = {s: 0 for s in symbols}
    for k in range(args.clients):
        for j in range(watch):
            watchers[symbols[(k * watch + j) % n_sym]] += 1
    warmup_patterns = round(args.patterns_rate * args.warmup)
    warmup_ticks = round(args.ticks_rate * args.warmup)
    plan = schedule(args.patterns_rate, args.ticks_rate, args.warmup + args.duration)
    total_patterns = sum(1 for _, kind in plan if kind == 0)
    total_ticks = len(plan) - total_patterns

    # ---- redis
    redis_port = lt.free_port()
    redis_log = workdir / "redis.log"
    redis = procs.start("redis", lt.pinned(load_core, [
        args.redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
        "--logfile", str(redis_log), "--daemonize", "no",
        *(() if (mb := args.redis_pubsub_limit) is None else (
            "--client-output-buffer-limit", f"pubsub {mb}mb {mb}mb 0")),
    ]), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def redis_alive() -> None:
        if redis.poll() is not None:
            raise lt.BenchError(f"redis-server exited ({redis.returncode}):\n{lt.tail(redis_log)}")

    def redis_up() -> bool:
        with socket.create_connection(("127.0.0.1", redis_port), timeout=0.5):
            return True

    lt.wait_until("redis-server", redis_up, 10, redis_alive)
    publisher = lt.Publisher(redis_port)
    publisher.ping()

    # ---- daemon, auth on
    port = lt.free_port()
    base = f"http://127.0.0.1:{port}"
    daemon_log = workdir / "daemon.log"
    twistd = str(Path(sys.executable).parent / "twistd")
    secret = secrets.token_urlsafe(48)
    secret_file = workdir / "jwt-secret"
    secret_file.write_text(secret)
    node = lt.node_ready() if args.server == "node" else ""
    if node:
        # Socket.IO 4.8 + the Redis adapter, auth on; no pacing (see trader_producer.mjs)
        server_argv = [node, str(lt.NODE_DIR / "server.mjs"), "--port", str(port),
                       "--redis", f"redis://127.0.0.1:{redis_port}/0",
                       "--jwt-secret-file", str(secret_file)]
    else:
        server_argv = [twistd, "-n", "--pidfile=", "tickstock",
                       "--redis", f"redis://127.0.0.1:{redis_port}/0",
                       "--listen", f"tcp:{port}:interface=127.0.0.1",
                       "--jwt-secret-file", str(secret_file),
                       "--max-connections-per-ip", "0", "--max-connections-per-user", "0",
                       "--tick-rate", f"{args.tick_rate:g}"]
    with open(daemon_log, "wb") as log:
        daemon = procs.start("daemon", lt.pinned(server_core, server_argv), cwd=str(workdir),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def daemon_alive() -> None:
        redis_alive()
        if daemon.poll() is not None:
            hint = ("\n(the Node peer exits when Redis drops its subscription for overcoming "
                    "its output buffer limit: see redis.log, and --redis-pubsub-limit)"
                    if node else "")
            raise lt.BenchError(f"daemon exited ({daemon.returncode}):\n"
                                f"{lt.tail(daemon_log)}{hint}")

    lt.wait_until("the daemon's /ready", lambda: lt.http_json(base + "/ready", 1)[0] == 200,
                  30, daemon_alive)
    rss_idle = lt.rss_mb(daemon.pid)

    # ---- clients
    child_err = workdir / "clients.err"
    with open(child_err, "wb") as err:
        clients = procs.start("clients", lt.pinned(load_core, [
            sys.executable, str(Path(__file__).resolve()), "--child",
            "--port", str(port), "--clients", str(args.clients),
            "--symbol-list", ",".join(symbols), "--watch", str(watch),
            "--warmup-patterns", str(warmup_patterns), "--warmup-ticks", str(warmup_ticks),
            "--drain", str(args.drain), "--max-wait", str(args.max_wait),
            "--server", args.server,
        ]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
            env={**os.environ, "TICKSTOCK_JWT_SECRET": secret})
    lines = lt.LineReader(clients.stdout, "clients")
    try:
        ready = lines.expect("READY", 60 + args.clients * 0.05)
    except lt.BenchError as error:
        daemon_alive()
        raise lt.BenchError(f"{error}\n{lt.tail(child_err)}") from None
    health = lt.http_json(base + "/health")[1]
    if health.get("clients") != args.clients or health.get("subscriptions") != 2 * args.clients:
        raise lt.BenchError(f"daemon reports clients={health.get('clients')} "
                            f"subscriptions={health.get('subscriptions')}, expected "
                            f"{args.clients} and {2 * args.clients}")
    rss_connected = lt.rss_mb(daemon.pid)

    assert clients.stdin is not None
    producer: subprocess.Popen[Any] | None = None

    def publisher_cpu_s() -> float:
        """This process's CPU time, or (--server node) the Node producer's."""
        return lt.cpu_seconds(producer.pid) if producer is not None else lt.self_cpu()

    def snapshot() -> tuple[dict[str, Any], threading.Thread]:
        """
        Counters of the daemon, the clients, Redis and this process, at one
        moment. The CPU times are read at once; the answers of the daemon
        (slow when it is behind) and of the clients arrive in the dict when
        the thread is done, so that publishing is not held up.
        """
        assert clients.stdin is not None
        clients.stdin.write("SNAP\n")
        clients.stdin.flush()
        user, system = lt.cpu_split(daemon.pid)
        snap = {"at": time.time(), "user": user, "system": system,
                "redis": lt.cpu_seconds(redis.pid), "self": publisher_cpu_s(),
                "cores": lt.core_busy()}

        def answers() -> None:
            try:
                snap["health"] = lt.http_json(base + "/health", 30)[1]
            except OSError:  # the server died: daemon_alive() says so, after the drain
                snap["health"] = None
            snap["clients"] = lines.expect("SNAP", 30)

        thread = threading.Thread(target=answers, daemon=True)
        thread.start()
        return snap, thread

    # ---- publish on one absolute schedule; sample when the measured window opens
    rng = random.Random(42)
    run_id = f"trader{os.getpid()}"
    prices = {s: rng.uniform(20, 900) for s in symbols}
    s0: dict[str, Any] | None = None
    if node:
        # The peer's own ingestion path: its producer emits the same messages on
        # the same schedule through @socket.io/redis-emitter; this process only
        # takes the snapshots when the measured window opens and ends.
        plan_file = workdir / "plan.json"
        plan_file.write_text(json.dumps({
            "patterns": [lt.make_event(rng, run_id, seq, symbols[seq % n_sym])
                         for seq in range(total_patterns)],
            "symbols": symbols, "prices": prices,
            "due": [due for due, _ in plan], "kind": [kind for _, kind in plan],
            "warmup": sum(1 for due, _ in plan if due < args.warmup)}))
        producer_err = workdir / "producer.err"
        with open(producer_err, "wb") as err:
            producer = procs.start("producer", lt.pinned(load_core, [
                node, str(lt.NODE_DIR / "trader_producer.mjs"),
                "--redis", f"redis://127.0.0.1:{redis_port}/0", "--plan", str(plan_file),
            ]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                bufsize=1)
        said = lt.LineReader(producer.stdout, "producer")
        try:
            said.expect("READY", 60)
            said.expect("WARMED", args.warmup + 60)
            s0, answering = snapshot()
            assert producer.stdin is not None
            producer.stdin.write("MEASURE\n")
            producer.stdin.flush()
            answering.join()
            sent = said.expect("SENT", args.duration + 120)
        except lt.BenchError as error:
            daemon_alive()
            raise lt.BenchError(f"{error}\n{lt.tail(producer_err)}") from None
        s1, answering = snapshot()
        answering.join()
        no_subscriber, publish_errors = sent["no_subscriber"], sent["errors"]
        lag_ms = {"p99": round(sent["lag_p99"] * 1000, 1),
                  "max": round(sent["lag_max"] * 1000, 1)} if sent["lag_max"] is not None else None
    else:
        command = lt.Publisher.command
        t0 = time.monotonic() + 0.05
        start_at = args.warmup
        answering: threading.Thread | None = None
        lags: list[float] = []
        p_seq = t_seq = 0
        i = 0
        while i < len(plan):
            if s0 is None and plan[i][0] >= start_at:
                s0, answering = snapshot()
            now = time.monotonic()
            batch = []
            while i < len(plan) and t0 + plan[i][0] <= now and (
                    s0 is not None or plan[i][0] < start_at):
                due, kind = plan[i]
                if s0 is not None:
                    lags.append(now - (t0 + due))
                sent_at = time.time()
                if kind == 0:
                    symbol = symbols[p_seq % n_sym]
                    event = lt.make_event(rng, run_id, p_seq, symbol)
                    batch.append(command(b"PUBLISH", PATTERNS_CHANNEL,
                                         lt.encode_event(event, sent_at)))
                    p_seq += 1
                else:
                    symbol = symbols[t_seq % n_sym]
                    prices[symbol] *= 1 + rng.uniform(-0.001, 0.001)
                    batch.append(command(b"PUBLISH", TICKS_CHANNEL,
                                         tick_message(symbol, t_seq, prices[symbol], sent_at)))
                    t_seq += 1
                i += 1
            if batch:
                publisher.send(batch)
            if i < len(plan):
                # at least 1 ms: one wake-up per message would cost this core more
                time.sleep(max(0.001, t0 + plan[i][0] - time.monotonic()))
        assert s0 is not None and answering is not None
        answering.join()
        s1, answering = snapshot()
        answering.join()
        publisher.wait_replies(len(plan), timeout=60)
        no_subscriber, publish_errors = publisher.no_subscriber, publisher.errors
        lags.sort()
        lag_ms = {"p99": round(lags[int(len(lags) * 0.99) - 1] * 1000, 1),
                  "max": round(lags[-1] * 1000, 1)} if lags else None

    # ---- drain the measured patterns
    per_symbol = {s: 0 for s in symbols}
    for seq in range(warmup_patterns, total_patterns):
        per_symbol[symbols[seq % n_sym]] += 1
    clients.stdin.write("END " + json.dumps({"per_symbol": per_symbol}) + "\n")
    clients.stdin.flush()
    done = lines.expect("DONE", args.max_wait + 60)
    daemon_alive()
    rss_end = lt.rss_mb(daemon.pid)
    health_end = lt.http_json(base + "/health", 10)[1]
    source = lt.http_json(base + "/ready", 10)[1].get("components", {}).get("source", {})
    result = lines.expect("RESULT", 120)
    daemon_alive()
    publisher.close()

    # ---- the measured window: from the first measured message to the last one sent
    span = s1["at"] - s0["at"]
    c0, c1 = s0["clients"], s1["clients"]
    client_span = c1["at"] - c0["at"]
    pat_rate = (c1["patterns"] - c0["patterns"]) / client_span
    tick_rate = (c1["ticks"] - c0["ticks"]) / client_span
    user, system = s1["user"] - s0["user"], s1["system"] - s0["system"]
    server_cpu = user + system
    deliveries = (c1["patterns"] - c0["patterns"]) + (c1["ticks"] - c0["ticks"])
    clients_cpu = c1["cpu_s"] - c0["cpu_s"]
    redis_cpu = s1["redis"] - s0["redis"]
    publisher_cpu = s1["self"] - s0["self"]
    other = {}
    if pin:
        other[f"core{lt.SERVER_CORE}"] = round(max(0.0, (
            s1["cores"][lt.SERVER_CORE] - s0["cores"][lt.SERVER_CORE] - server_cpu) / span), 2)
        other[f"core{lt.LOAD_CORE}"] = round(max(0.0, (
            s1["cores"][lt.LOAD_CORE] - s0["cores"][lt.LOAD_CORE] - clients_cpu - redis_cpu
            - publisher_cpu) / span), 2)
    h0, h1 = s0["health"], s1["health"]
    measured_patterns = total_patterns - warmup_patterns
    measured_ticks = total_ticks - warmup_ticks
    pattern_watchers = sum(watchers.values()) / n_sym
    offered_ticks = sum(watchers[symbols[seq % n_sym]]
                        for seq in range(warmup_ticks, total_ticks))
    pats, ticks = result["patterns"], result["ticks"]
    events1 = health_end["events"]
    # TickStock paces ticks per symbol per client; the Node peer does not
    pacing = math.inf if node else args.tick_rate

    return {
        "server": args.server,
        "scenario": (f"trader: {args.clients} clients, {n_sym} symbols, {watch} watched per "
                     f"client (patterns + ticks), {args.patterns_rate:g} patterns/s + "
                     f"{args.ticks_rate:g} ticks/s, "
                     + ("ticks not paced (Node peer)" if node else
                        f"ticks paced to {args.tick_rate:g}/s per symbol per client")),
        "clients": args.clients,
        "symbols": n_sym,
        "watch": watch,
        "watchers_per_symbol": pattern_watchers,
        "patterns_rate": args.patterns_rate,
        "ticks_rate": args.ticks_rate,
        "tick_rate": None if node else args.tick_rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "redis_pubsub_limit_mb": args.redis_pubsub_limit,
        "offered_deliveries_per_s": {
            "patterns": round(args.patterns_rate * pattern_watchers),
            # at most tick_rate per symbol per client, by the daemon's pacing
            "ticks": round(min(args.ticks_rate / n_sym, pacing) * n_sym
                           * pattern_watchers),
        },
        # received by the clients while the producer published the measured window
        "deliveries_per_s": {"patterns": round(pat_rate), "ticks": round(tick_rate),
                             "total": round(pat_rate + tick_rate)},
        "patterns": {
            "events": measured_patterns,
            "expected": pats["expected"],
            "received": pats["received"],
            "loss": pats["expected"] - pats["received"],
            "loss_pct": round(100 * (1 - pats["received"] / pats["expected"]), 2),
            "clients_short": pats["clients_short"],
            "all_delivered": done["complete"],
            "drain_s": round(done["at"] - s1["at"], 1),
            "latency_ms": pats["latency_ms"],
        },
        "ticks": {
            "sent": measured_ticks,
            "offered_deliveries": offered_ticks,
            "received": ticks["received"],
            "received_pct": round(100 * ticks["received"] / offered_ticks, 2),
            "conflated_by_daemon": (health_end.get("ticks_conflated", 0)
                                    - health.get("ticks_conflated", 0)),
            "latency_ms": ticks["latency_ms"],
        },
        "server_cpu": {
            "cpu_s": round(server_cpu, 2),
            "busy": round(server_cpu / span, 3),  # cores' worth, per second of the window
            "user_s": round(user, 2),
            "system_s": round(system, 2),
            "cpu_s_per_100k_deliveries": (
                round(server_cpu / deliveries * 100_000, 3) if deliveries else None),
        },
        "server_rss_mb": {"idle": rss_idle, "clients_connected": rss_connected,
                          "end": rss_end},
        "health": {
            "slow_consumers_closed": health_end.get("slow_consumers_closed"),
            "overload": health_end.get("overload"),
            "live_gaps_closed": health_end.get("live_gaps_closed"),
            "conflated_frames": health_end.get("conflated"),
            "events_received": events1["received"] - health["events"]["received"],
            "events_delivered": events1["delivered"] - health["events"]["delivered"],
            "window_delivered_per_s": round(
                (h1["events"]["delivered"] - h0["events"]["delivered"]) / span),
            "shed": events1.get("shed"),
            "source": {k: source.get(k) for k in (
                "pauses", "fell_behind", "backlog_bytes", "gaps") if k in source},
        },
        "checks": {
            "lost_connections": result["lost_connections"],
            "server_closes": result["server_closes"],
            "client_errors": result["errors"],
            "out_of_order": result["out_of_order"],
            "misrouted": result["misrouted"],
            "bad_frames": result["bad_frames"],
            "other_ops": result["other_ops"],
            "publish_no_subscriber": no_subscriber,
            "publish_errors": publish_errors,
        },
        "diagnostics": {
            "window_s": round(span, 2),
            "connect_s": ready["connect_s"],
            "pinned": pin,
            "clients_busy": round(clients_cpu / client_span, 3),
            "redis_busy": round(redis_cpu / span, 3),
            "publisher_busy": round(publisher_cpu / span, 3),
            "other_load_on_cores": other,
            "publisher_lag_ms": lag_ms,
            "untimed_reads": result["untimed_reads"],
            # deliveries received per second of wall clock: [patterns, ticks]
            "by_second": {str(int(s) - int(s0["at"])): v
                          for s, v in result["by_second"].items()
                          if int(s) >= int(s0["at"])},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TickStock trader scenario benchmark.")
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--watch", type=int, default=20, help="symbols per client (20)")
    parser.add_argument("--patterns-rate", type=float, default=2000.0,
                        help="pattern events published per second (2000)")
    parser.add_argument("--ticks-rate", type=float, default=5000.0,
                        help="ticks published per second (5000)")
    parser.add_argument("--tick-rate", type=float, default=10.0,
                        help="the daemon's --tick-rate: most ticks per second per symbol per "
                             "client (10)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (20)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds published before measuring (5)")
    parser.add_argument("--drain", type=float, default=5.0,
                        help="after publishing, stop waiting for patterns once none came "
                             "for this long (5)")
    parser.add_argument("--max-wait", type=float, default=90.0,
                        help="after publishing, stop waiting for patterns after this long (90)")
    parser.add_argument("--server", choices=("tickstock", "node"), default="tickstock",
                        help="node: Socket.IO 4.8 on Node with the Redis adapter and emitter "
                             "(bench/node/server.mjs, trader_producer.mjs), pinned like the "
                             "daemon, no tick pacing")
    parser.add_argument("--redis-server", default="/usr/bin/redis-server")
    parser.add_argument("--redis-pubsub-limit", type=int, default=None, metavar="MB",
                        help="the bench's Redis gets client-output-buffer-limit pubsub MB MB 0 "
                             "(default: Redis's own, 32, or 8 for a minute; a server that "
                             "falls behind reading its subscription is disconnected past it)")
    parser.add_argument("--keep", action="store_true", help="keep the logs' temp dir")
    # the client process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--symbol-list", help=argparse.SUPPRESS)
    parser.add_argument("--warmup-patterns", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-ticks", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--connect-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        try:
            child(args)
            return 0
        except (EOFError, KeyboardInterrupt, BrokenPipeError):
            return 1
        except Exception as error:
            lg.emit("FAILED", {"error": f"{type(error).__name__}: {error}"})
            return 1

    if min(args.clients, args.symbols, args.watch) < 1 or args.watch > args.symbols:
        parser.error("--clients, --symbols, --watch must be positive, --watch <= --symbols")
    if min(args.patterns_rate, args.ticks_rate, args.duration, args.warmup) <= 0:
        parser.error("rates, --duration and --warmup must be positive")

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.clients + 200 > hard:
        print(f"trader.py: warning: {args.clients} clients need more file descriptors than "
              f"the limit of {hard}", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="tickstock-trader-"))
    procs = lt.Procs()
    keep = args.keep
    try:
        print(json.dumps(run(args, procs, workdir)))
        return 0
    except lt.BenchError as error:
        keep = True
        print(f"trader.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("trader.py: interrupted; stopping everything", file=sys.stderr)
        return 130
    except BaseException:
        keep = True
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if keep:
            print(f"trader.py: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
