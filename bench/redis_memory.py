#!/usr/bin/env python3
"""
TickStock Redis memory benchmark: what Redis holds for the events it saw.

Starts its own redis-server and TickStock daemon, publishes pattern events
with producer event_ids at --rate (every --retry-every-th one sent again
--retry-delay seconds later, as a producer retry) and ticks at --tick-rate
for --duration seconds, samples Redis's used_memory as it goes, and reports
it before and after, per million events, how it grew over the last third of
the run, and by kind of key. --pythonpath runs the daemon from another
source tree, to measure an older version the same way. Prints one JSON
object on stdout; see bench/README.md for what each number means.

    .venv/bin/python bench/redis_memory.py --rate 5000 --tick-rate 1000 --duration 600
    .venv/bin/python bench/redis_memory.py --duration 60 --pythonpath /tmp/oldsrc
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import hiredis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ingest import twistd_path  # noqa: E402
from latency import (  # noqa: E402
    LOAD_CORE,
    PATTERNS,
    SERVER_CORE,
    BenchError,
    Procs,
    cpu_seconds,
    free_port,
    http_json,
    pinned,
    rss_mb,
    symbol_list,
    tail,
    wait_until,
)

PATTERNS_CHANNEL = b"tickstock.events.patterns"
TICKS_CHANNEL = b"tickstock.data.ticks"
SEND_EVERY = 0.002
"""The publisher wakes up about this often and sends everything then due, in one write."""
FAMILIES = (
    ("event_id keys", re.compile(rb"^tickstock:eid:")),
    ("tick claim keys", re.compile(rb"^tickstock:tick:")),
    ("dedupe windows", re.compile(rb"^tickstock:dedupe")),
    ("delivery keys", re.compile(rb"^tickstock:seen:")),
    ("history", re.compile(rb"^tickstock:history:")),
    ("producer streams", re.compile(rb"^tickstock\.")),
)
"""Kinds of key, by name (the first that matches; the rest are "other")."""
EXACT_UP_TO = 5000
"""Kinds with more keys than this are measured on a sample of this many."""


def command(*parts: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Connection:
    """One Redis connection: pipelined writes, replies read with hiredis."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        self.sent = 0
        self.replies = 0
        self.no_subscriber = 0
        self.errors: list[str] = []

    def send(self, commands: list[bytes]) -> None:
        if commands:
            self.sock.sendall(b"".join(commands))
            self.sent += len(commands)
        self._read(block=False)

    def _read(self, block: bool) -> list[Any]:
        got: list[Any] = []
        self.sock.setblocking(block)
        try:
            while True:
                try:
                    chunk = self.sock.recv(1 << 20)
                except BlockingIOError:
                    return got
                if not chunk:
                    raise BenchError("redis closed the connection")
                self.reader.feed(chunk)
                while (reply := self.reader.gets()) is not False:
                    self.replies += 1
                    if isinstance(reply, hiredis.ReplyError):
                        if len(self.errors) < 5:
                            self.errors.append(str(reply))
                    elif reply == 0:
                        self.no_subscriber += 1  # a PUBLISH nobody received
                    got.append(reply)
                if block:
                    return got
        finally:
            self.sock.setblocking(True)

    def wait_replies(self) -> None:
        deadline = time.monotonic() + 60
        while self.replies < self.sent:
            if time.monotonic() > deadline:
                raise BenchError(f"redis answered {self.replies} of {self.sent} commands")
            self._read(block=True)

    def call(self, *parts: bytes | str) -> Any:
        """One command, its reply (raises on an error reply)."""
        return self.pipeline([command(*parts)])[0]

    def pipeline(self, commands: list[bytes]) -> list[Any]:
        self.wait_replies()
        self.sock.sendall(b"".join(commands))
        self.sent += len(commands)
        out: list[Any] = []
        while len(out) < len(commands):
            out += self._read(block=True)
        for reply in out:
            if isinstance(reply, hiredis.ReplyError):
                raise BenchError(f"redis: {reply}")
        return out

    def used_memory(self) -> int:
        found = re.search(r"^used_memory:(\d+)", self.call("INFO", "memory").decode(), re.MULTILINE)
        if found is None:
            raise BenchError("INFO memory says no used_memory")
        return int(found.group(1))


class Messages:
    """
    Pattern events and ticks as the producer sends them: in pub/sub mode
    PUBLISH on their channels; in streams mode XADD to the streams of those
    names, capped (as a producer caps them) at about --stream-maxlen.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.streams = args.mode == "streams"
        self.maxlen = str(args.stream_maxlen).encode()
        self.symbols = symbol_list(args.symbols)
        self.retry_every = args.retry_every

    def _wrap(self, channel: bytes, body: bytes) -> bytes:
        if self.streams:
            return command(b"XADD", channel, b"MAXLEN", b"~", self.maxlen, b"*", b"data", body)
        return command(b"PUBLISH", channel, body)

    def pattern(self, i: int, now: float, attempt: int = 1) -> bytes:
        symbol = self.symbols[i % len(self.symbols)]
        body = json.dumps({
            "event_type": "pattern_detected", "symbol": symbol,
            "pattern": PATTERNS[i % len(PATTERNS)], "confidence": round(0.5 + (i % 50) / 100, 2),
            "timeframe": "1min", "price": 100 + i % 900 / 10, "source": "bench",
            "event_id": self.event_id("p", i), "attempt": attempt, "timestamp": round(now, 3),
        }, separators=(",", ":")).encode()
        return self._wrap(PATTERNS_CHANNEL, body)

    def tick(self, j: int, now: float) -> bytes:
        symbol = self.symbols[j % len(self.symbols)]
        body = b'{"symbol":"%s","price":%.2f,"volume":%d,"timestamp":%.3f,"event_id":"%s"}' % (
            symbol.encode(), 20 + (j * 37) % 880, 100 + j % 97 * 100, now,
            self.event_id("t", j).encode())
        return self._wrap(TICKS_CHANNEL, body)

    @staticmethod
    def event_id(kind: str, n: int) -> str:
        """A UUID, as many producers use: the same one for the same (kind, n)."""
        return str(uuid.UUID(int=(1 if kind == "p" else 2) << 96 | n, version=4))


def families(conn: Connection) -> dict[str, Any]:
    """Every key by kind: how many, and the bytes Redis says each holds (MEMORY USAGE)."""
    names: dict[str, list[bytes]] = {name: [] for name, _ in FAMILIES}
    names["other"] = []
    cursor = b"0"
    while True:
        cursor, keys = conn.call("SCAN", cursor, "COUNT", "10000")
        for key in keys:
            kind = next((name for name, pattern in FAMILIES if pattern.match(key)), "other")
            names[kind].append(key)
        if cursor == b"0":
            break
    out: dict[str, Any] = {}
    for kind, keys in names.items():
        if not keys:
            continue
        step = max(1, len(keys) // EXACT_UP_TO)
        sample = keys[::step]
        sizes = conn.pipeline([command("MEMORY", "USAGE", key, "SAMPLES", "0") for key in sample])
        measured = sum(size or 0 for size in sizes)
        total = measured if step == 1 else round(measured / len(sample) * len(keys))
        out[kind] = {"keys": len(keys), "mb": round(total / 2**20, 2),
                     "estimated": step > 1}
        if kind == "dedupe windows":  # per window: its bucket sets and their members
            windows: dict[str, dict[str, int]] = {}
            sets = [key for key in keys if key.startswith(b"tickstock:dedupe:")]
            counts = conn.pipeline([command("SCARD", key) for key in sets])
            for key, count in zip(sets, counts, strict=True):
                name = key[len(b"tickstock:dedupe:"):].rsplit(b":", 1)[0].decode()
                window = windows.setdefault(name, {"sets": 0, "members": 0})
                window["sets"] += 1
                window["members"] += count
            out[kind]["windows"] = windows
    return out


class Rig:
    """redis-server and the daemon."""

    def __init__(self, args: argparse.Namespace, procs: Procs, workdir: Path) -> None:
        self.args, self.procs, self.workdir = args, procs, workdir

    def start(self) -> None:
        args, procs, workdir = self.args, self.procs, self.workdir
        cores = os.sched_getaffinity(0)
        self.pin = shutil.which("taskset") is not None and {SERVER_CORE, LOAD_CORE} <= cores
        server_core, load_core = (SERVER_CORE, LOAD_CORE) if self.pin else (None, None)
        if self.pin:
            os.sched_setaffinity(0, {LOAD_CORE})
        else:
            print("warning: cannot pin to cores 0 and 1; running unpinned", file=sys.stderr)
        redis_port = free_port()
        with open(workdir / "redis.out", "wb") as redis_out:
            self.redis = procs.start("redis", pinned(load_core, [
                args.redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(workdir),
                "--logfile", str(workdir / "redis.log"), "--daemonize", "no",
            ]), stdin=subprocess.DEVNULL, stdout=redis_out, stderr=subprocess.STDOUT)

        def redis_up() -> bool:
            with socket.create_connection(("127.0.0.1", redis_port), timeout=0.5):
                return True

        wait_until("redis-server", redis_up, 10, self.redis_alive)
        self.control = Connection(redis_port)
        self.publisher = Connection(redis_port)

        env = dict(os.environ)
        if args.pythonpath:
            env["PYTHONPATH"] = os.path.abspath(args.pythonpath)
        self.source = subprocess.run(
            [sys.executable, "-c", "import tickstock; print(tickstock.__file__)"], env=env,
            cwd=str(workdir), capture_output=True, text=True, check=True).stdout.strip()
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.daemon_log = workdir / "daemon.log"
        secret_file = workdir / "jwt-secret"
        secret_file.write_text(secrets.token_urlsafe(48))
        argv = [twistd_path(), "-n", "--pidfile=", "tickstock",
                "--redis", f"redis://127.0.0.1:{redis_port}/0", "--mode", args.mode,
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--jwt-secret-file", str(secret_file)]
        if args.dedupe_window is not None:
            argv += ["--dedupe-window", f"{args.dedupe_window:g}"]
        with open(self.daemon_log, "wb") as log:
            self.daemon = procs.start("daemon", pinned(server_core, argv), cwd=str(workdir),
                                      env=env, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)
        wait_until("the daemon's /ready", lambda: http_json(self.base + "/ready", 1)[0] == 200,
                   30, self.daemon_alive)
        print(f"redis_memory.py: daemon pid {self.daemon.pid} ({self.source}), redis pid "
              f"{self.redis.pid}, logs in {workdir}", file=sys.stderr, flush=True)

    def redis_alive(self) -> None:
        if self.redis.poll() is not None:
            raise BenchError(f"redis-server exited ({self.redis.returncode}):\n"
                             f"{tail(self.workdir / 'redis.log')}")

    def daemon_alive(self) -> None:
        self.redis_alive()
        if self.daemon.poll() is not None:
            raise BenchError(f"daemon exited ({self.daemon.returncode}):\n{tail(self.daemon_log)}")

    def events(self) -> dict[str, Any]:
        status, body = http_json(self.base + "/health", 5)
        if status != 200 or not isinstance(body, dict):
            raise BenchError(f"/health answered {status}: {body!r}"[:300])
        return dict(body["events"])


def run(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    rig.start()
    control, publisher = rig.control, rig.publisher
    messages = Messages(args)
    events0 = rig.events()
    memory0, keys0 = control.used_memory(), int(control.call("DBSIZE"))
    cpu0 = {"daemon": cpu_seconds(rig.daemon.pid), "redis": cpu_seconds(rig.redis.pid)}
    patterns_total = round(args.rate * args.duration)
    ticks_total = round(args.tick_rate * args.duration)
    sent_p = sent_t = retried = 0
    retries: deque[tuple[float, int]] = deque()
    samples: list[dict[str, Any]] = []
    next_sample = 0.0
    t0 = time.monotonic() + 0.05
    end = t0 + args.duration
    while sent_p < patterns_total or sent_t < ticks_total or retries:
        now = time.monotonic()
        elapsed = now - t0
        wall = time.time()
        batch: list[bytes] = []
        due_p = min(patterns_total, int(elapsed * args.rate) + 1) if elapsed >= 0 else 0
        for i in range(sent_p, due_p):
            batch.append(messages.pattern(i, wall))
            if args.retry_every and i % args.retry_every == args.retry_every - 1:
                retries.append((now + args.retry_delay, i))
        sent_p = max(sent_p, due_p)
        due_t = min(ticks_total, int(elapsed * args.tick_rate) + 1) if elapsed >= 0 else 0
        batch += [messages.tick(j, wall) for j in range(sent_t, due_t)]
        sent_t = max(sent_t, due_t)
        while retries and retries[0][0] <= now:
            batch.append(messages.pattern(retries.popleft()[1], wall, attempt=2))
            retried += 1
        publisher.send(batch)
        if elapsed >= next_sample:
            rig.daemon_alive()
            samples.append({"t": round(max(elapsed, 0.0), 1),
                            "used_memory_mb": round(control.used_memory() / 2**20, 2),
                            "keys": int(control.call("DBSIZE")),
                            "published": sent_p + sent_t + retried})
            next_sample += args.sample_every
        time.sleep(max(min(t0 + sent_p / args.rate if args.rate else end,
                           t0 + sent_t / args.tick_rate if args.tick_rate else end,
                           retries[0][0] if retries else end) - time.monotonic(), SEND_EVERY))
    last_publish = time.monotonic()
    publisher.wait_replies()
    messages_sent = sent_p + sent_t + retried

    # Every message published is stored (routed) or known as a retry (a duplicate).
    handled = -1
    changed = time.monotonic()
    while True:
        events = rig.events()
        now_handled = events["routed"] + events["duplicates"] - events0["routed"] \
            - events0["duplicates"]
        if now_handled >= messages_sent:
            break
        if now_handled != handled:
            handled, changed = now_handled, time.monotonic()
        elif time.monotonic() - changed > args.drain:
            break
        rig.daemon_alive()
        time.sleep(0.05)
    drain_s = time.monotonic() - last_publish
    memory1, keys1 = control.used_memory(), int(control.call("DBSIZE"))
    cpu = {"daemon": cpu_seconds(rig.daemon.pid) - cpu0["daemon"],
           "redis": cpu_seconds(rig.redis.pid) - cpu0["redis"]}
    samples.append({"t": round(last_publish - t0, 1), "used_memory_mb": round(memory1 / 2**20, 2),
                    "keys": keys1, "published": messages_sent})
    kinds = families(control)
    third = [s for s in samples if s["t"] >= (last_publish - t0) * 2 / 3]
    growth = None
    if len(third) >= 2 and third[-1]["t"] > third[0]["t"]:
        growth = round((third[-1]["used_memory_mb"] - third[0]["used_memory_mb"])
                       / (third[-1]["t"] - third[0]["t"]) * 60, 2)
    distinct = sent_p + sent_t
    delta = memory1 - memory0
    delta_events = {k: events[k] - events0[k] for k in ("received", "routed", "duplicates",
                                                       "store_failures")}
    return {
        "scenario": args.scenario or (
            f"{args.mode}: {args.rate:g} events/s with event_ids + {args.tick_rate:g} ticks/s "
            f"for {args.duration:g}s"),
        "mode": args.mode,
        "daemon_source": rig.source,
        "dedupe_window_s": args.dedupe_window,
        "rate": args.rate,
        "tick_rate": args.tick_rate,
        "duration_s": args.duration,
        "published": {"patterns": sent_p, "ticks": sent_t, "retries": retried,
                      "events": distinct, "messages": messages_sent},
        "daemon": {**delta_events, "shed": events.get("shed", {})},
        "used_memory_mb": {"before": round(memory0 / 2**20, 2),
                           "after": round(memory1 / 2**20, 2),
                           "delta": round(delta / 2**20, 2),
                           "peak": max(sample["used_memory_mb"] for sample in samples)},
        "bytes_per_event": round(delta / distinct, 1) if distinct else None,
        "mb_per_million_events": round(delta / distinct * 1e6 / 2**20, 1) if distinct else None,
        "growth_last_third_mb_per_min": growth,
        "keys": {"before": keys0, "after": keys1},
        "by_kind": kinds,
        "samples": samples,
        "daemon_cpu_s": round(cpu["daemon"], 2),
        "redis_cpu_s": round(cpu["redis"], 2),
        "daemon_rss_mb": rss_mb(rig.daemon.pid),
        "redis_rss_mb": rss_mb(rig.redis.pid),
        "drain_s": round(drain_s, 2),
        "checks": {"publish_errors": publisher.errors,
                   "publish_no_subscriber": publisher.no_subscriber if not messages.streams else 0,
                   "unhandled": messages_sent - delta_events["routed"]
                   - delta_events["duplicates"],
                   "store_failures": delta_events["store_failures"],
                   "duplicates_missed": retried - delta_events["duplicates"]},
    }


def problems(out: dict[str, Any]) -> list[str]:
    checks = out["checks"]
    found = [f"{name}={value}" for name, value in checks.items() if value]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TickStock Redis memory benchmark.")
    parser.add_argument("--rate", type=float, default=5000.0,
                        help="pattern events with event_ids per second (5000)")
    parser.add_argument("--tick-rate", type=float, default=1000.0, help="ticks per second (1000)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of publishing (60)")
    parser.add_argument("--events", type=int, default=None,
                        help="pattern events to publish: sets --duration to EVENTS / RATE")
    parser.add_argument("--mode", choices=("pubsub", "streams"), default="pubsub",
                        help="the daemon's --mode; streams: XADD instead of PUBLISH (pubsub)")
    parser.add_argument("--symbols", type=int, default=100, help="symbols, round-robin (100)")
    parser.add_argument("--retry-every", type=int, default=100,
                        help="every Nth pattern event is sent again as a retry (100; 0: none)")
    parser.add_argument("--retry-delay", type=float, default=1.0,
                        help="seconds after the first copy a retry is sent (1)")
    parser.add_argument("--dedupe-window", type=float, default=None,
                        help="the daemon's --dedupe-window (default: the daemon's own)")
    parser.add_argument("--stream-maxlen", type=int, default=10_000,
                        help="streams mode: XADD MAXLEN ~ this (10000)")
    parser.add_argument("--sample-every", type=float, default=10.0,
                        help="seconds between used_memory samples (10)")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="after publishing, give up once the daemon has handled nothing "
                             "new for this long, in seconds (10)")
    parser.add_argument("--pythonpath", default=None,
                        help="run the daemon with this PYTHONPATH (another source tree)")
    parser.add_argument("--scenario", default=None, help="a name for this run in the output")
    parser.add_argument("--redis-server", default=shutil.which("redis-server")
                        or "/usr/bin/redis-server")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    args = parser.parse_args(argv)
    if args.events is not None:
        if args.events < 1 or args.rate <= 0:
            parser.error("--events and --rate must be positive")
        args.duration = args.events / args.rate
    if args.duration <= 0 or args.rate < 0 or args.tick_rate < 0 or args.symbols < 1 \
            or args.retry_every < 0 or args.sample_every <= 0 or args.rate + args.tick_rate <= 0:
        parser.error("--duration, --symbols and --sample-every must be positive, the rates "
                     "and --retry-every not negative, and something must be published")

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="tickstock-redis-memory-"))
    procs = Procs()
    keep = args.keep
    try:
        out = run(args, Rig(args, procs, workdir))
        print(json.dumps(out))
        sys.stdout.flush()
        found = problems(out)
        if found:
            print("redis_memory.py: " + "; ".join(found), file=sys.stderr)
            return 2
        return 0
    except BenchError as error:
        keep = True
        print(f"redis_memory.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("redis_memory.py: interrupted; stopping everything", file=sys.stderr)
        return 130
    except BaseException:
        keep = True
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if keep:
            print(f"redis_memory.py: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
