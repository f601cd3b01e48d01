#!/usr/bin/env python3
"""
TickStock tick-ingestion benchmark: producer PUBLISH -> 1-minute bars in
PostgreSQL.

Starts its own redis-server, PostgreSQL cluster and TickStock daemon
(C{--redis} and C{--postgres}), publishes ticks at a fixed rate R over N
symbols for D seconds, and waits until every tick is counted in
C{ohlcv_1min_parts}. Prints one JSON object on stdout; with C{--ramp}, the
rate grows by x1.25 per step until a step loses ticks or falls behind. See
bench/README.md for what each number means.

    .venv/bin/python bench/ingest.py --rate 20000 --duration 20
    .venv/bin/python bench/ingest.py --ramp --start-rate 5000
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.servers, tickstock

from latency import (  # noqa: E402
    CLK_TCK,
    LOAD_CORE,
    SERVER_CORE,
    BenchError,
    Procs,
    Publisher,
    core_busy,
    cpu_seconds,
    free_port,
    http_json,
    pinned,
    rss_mb,
    self_cpu,
    symbol_list,
    tail,
    wait_until,
)

TICKS_CHANNEL = b"tickstock.data.ticks"
RAMP_STEP = 1.25
TARGET = 50_000
"""The issue's target: ticks per second sustained, with zero loss."""
SEND_EVERY = 0.002
"""The publisher wakes up about this often and sends every tick then due, in one write."""


# ------------------------------------------------------------------ helpers


def twistd_path() -> str:
    twistd = str(Path(sys.executable).parent / "twistd")
    if not os.path.exists(twistd):
        twistd = shutil.which("twistd") or "twistd"
    return twistd


def reaped_cpu_seconds(pid: int) -> float:
    """cutime + cstime: CPU of the process's children that have exited (PostgreSQL backends)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[13]) + int(fields[14])) / CLK_TCK


def postgres_cpu(pid: int) -> float:
    """Every PostgreSQL process's CPU: the postmaster's tree, plus backends already gone."""
    return cpu_seconds(pid) + reaped_cpu_seconds(pid)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, int(len(sorted_values) * q) - 1))]


class Cluster:
    """
    A PostgreSQL cluster of the benchmark's own (L{tests.servers.PostgresServer}:
    initdb in a temp dir, a free loopback port, fsync off), migrated, with
    one connection kept open for counting what was stored.
    """

    def __init__(self) -> None:
        from tests.servers import PostgresServer

        self.server = PostgresServer()
        try:
            self.server.start()
        except BaseException:
            self.server.stop()
            raise
        self.pid = self.server.pid
        self.conn: Any = None

    def migrate(self) -> None:
        from tickstock.store.migrate import migrate

        migrate(self.server.dsn())

    def connect(self) -> Any:
        import psycopg2

        if self.conn is None:
            self.conn = psycopg2.connect(self.server.dsn(application_name="bench"))
            self.conn.autocommit = True
        return self.conn

    def one(self, sql: str, params: Any = None) -> Any:
        with self.connect().cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()

    def stop(self, keep_log_in: Path | None = None) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
        if keep_log_in is not None:
            try:
                shutil.copy(os.path.join(self.server.dir, "log"), keep_log_in / "postgres.log")
            except OSError:
                pass
        self.server.stop()


class TickSource:
    """
    Tick messages ready to PUBLISH: symbol i mod N, a price that wanders a
    little around each symbol's own level, a volume, and the send time as
    C{timestamp} (so bars fall in the current minutes).
    """

    PRICES = 64

    def __init__(self, symbols: list[str]) -> None:
        self.symbols = [s.encode() for s in symbols]
        self.n = len(symbols)
        self.prices = []
        for k, _ in enumerate(symbols):
            level = 20 + (k * 37) % 880
            self.prices.append([b"%.2f" % (level * (1 + 0.002 * ((j * 7919) % 101 - 50) / 50))
                                for j in range(self.PRICES)])
        self.volumes = [100 * (1 + (j * 31) % 97) for j in range(1024)]
        self.head = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(TICKS_CHANNEL), TICKS_CHANNEL)

    def batch(self, first: int, count: int, now: float) -> bytes:
        ts = repr(round(now, 3)).encode()
        n, symbols, prices, volumes, head = self.n, self.symbols, self.prices, self.volumes, \
            self.head
        out = []
        for i in range(first, first + count):
            k = i % n
            body = b'{"symbol":"%s","price":%s,"volume":%d,"timestamp":%s}' % (
                symbols[k], prices[k][(i // n) % self.PRICES], volumes[i & 1023], ts)
            out.append(b"%s$%d\r\n%s\r\n" % (head, len(body), body))
        return b"".join(out)


# ------------------------------------------------------------------ bench


class Progress(threading.Thread):
    """
    Samples the daemon's C{/health} once a second while the publisher runs,
    in a thread, so a slow answer from a busy daemon never holds up publishing.
    """

    def __init__(self, rig: Rig, began: float, routed0: int) -> None:
        super().__init__(daemon=True)
        self.rig = rig
        self.began = began
        self.routed0 = routed0
        self.published = 0
        self.samples: list[dict[str, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                health = self.rig.health()
            except (BenchError, OSError):
                continue
            self.samples.append({
                "t": round(time.monotonic() - self.began, 2), "published": self.published,
                "routed": health["events"]["routed"] - self.routed0,
                "pending": health["persist"]["pending"]})

    def stop(self) -> list[dict[str, Any]]:
        """The samples so far; a /health call still under way is not waited for."""
        self.done.set()
        return list(self.samples)


class Rig:
    """redis-server, PostgreSQL and the daemon, started once for one run or a whole ramp."""

    def __init__(self, args: argparse.Namespace, procs: Procs, workdir: Path) -> None:
        self.args = args
        self.procs = procs
        self.workdir = workdir
        self.cluster: Cluster | None = None

    def start(self) -> None:
        args, procs, workdir = self.args, self.procs, self.workdir
        cores = os.sched_getaffinity(0)
        self.pin = shutil.which("taskset") is not None and {SERVER_CORE, LOAD_CORE} <= cores
        server_core, load_core = (SERVER_CORE, LOAD_CORE) if self.pin else (None, None)
        if self.pin:
            # The publisher (this process) and whatever it starts without
            # taskset (PostgreSQL, through runuser) run on core 1.
            os.sched_setaffinity(0, {LOAD_CORE})
        else:
            print("warning: cannot pin to cores 0 and 1; running unpinned", file=sys.stderr)

        # ---- redis
        redis_port = free_port()
        redis_log = workdir / "redis.log"
        with open(workdir / "redis.out", "wb") as redis_out:
            self.redis = procs.start("redis", pinned(load_core, [
                args.redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(workdir),
                "--logfile", str(redis_log), "--daemonize", "no",
            ]), stdin=subprocess.DEVNULL, stdout=redis_out, stderr=subprocess.STDOUT)

        def redis_up() -> bool:
            with socket.create_connection(("127.0.0.1", redis_port), timeout=0.5):
                return True

        wait_until("redis-server", redis_up, 10, self.redis_alive)
        self.publisher = Publisher(redis_port)
        self.publisher.ping()

        # ---- PostgreSQL
        began = time.monotonic()
        self.cluster = Cluster()
        self.cluster.migrate()
        self.postgres_start_s = round(time.monotonic() - began, 2)

        # ---- daemon
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.daemon_log = workdir / "daemon.log"
        secret_file = workdir / "jwt-secret"
        secret_file.write_text(secrets.token_urlsafe(48))
        argv = [twistd_path(), "-n", "--pidfile=", "tickstock",
                "--redis", f"redis://127.0.0.1:{redis_port}/0",
                "--postgres", self.cluster.server.dsn(),
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--jwt-secret-file", str(secret_file),
                "--spool-dir", str(workdir / "spool")]
        if args.flush_interval is not None:
            argv += ["--flush-interval", f"{args.flush_interval:g}"]
        with open(self.daemon_log, "wb") as log:
            self.daemon = procs.start("daemon", pinned(server_core, argv), cwd=str(workdir),
                                      stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)
        wait_until("the daemon's /ready", lambda: http_json(self.base + "/ready", 1)[0] == 200,
                   30, self.daemon_alive)
        print(f"ingest.py: daemon pid {self.daemon.pid}, redis pid {self.redis.pid}, "
              f"postgres pid {self.cluster.pid}, logs in {workdir}", file=sys.stderr, flush=True)

    def redis_alive(self) -> None:
        if self.redis.poll() is not None:
            raise BenchError(f"redis-server exited ({self.redis.returncode}):\n"
                             f"{tail(self.workdir / 'redis.out')}\n"
                             f"{tail(self.workdir / 'redis.log')}")

    def daemon_alive(self) -> None:
        self.redis_alive()
        if self.daemon.poll() is not None:
            raise BenchError(f"daemon exited ({self.daemon.returncode}):\n{tail(self.daemon_log)}")

    def health(self) -> dict[str, Any]:
        status, body = http_json(self.base + "/health", 5)
        if status != 200 or not isinstance(body, dict):
            raise BenchError(f"/health answered {status}: {body!r}"[:300])
        return body

    def persisted(self) -> int:
        assert self.cluster is not None
        return int(self.cluster.one("SELECT coalesce(sum(ticks), 0) FROM ohlcv_1min_parts")[0])

    def cpu(self) -> dict[str, float]:
        assert self.cluster is not None
        return {"daemon": cpu_seconds(self.daemon.pid), "redis": cpu_seconds(self.redis.pid),
                "postgres": postgres_cpu(self.cluster.pid), "publisher": self_cpu()}

    def step(self, rate: float, duration: float, warmup: float,
             source: TickSource) -> dict[str, Any]:
        """
        Publish for C{warmup + duration} seconds at C{rate}, then wait until
        every tick is in C{ohlcv_1min_parts} (or nothing has changed for
        C{--drain} seconds). Every tick published counts for loss; CPU and
        rates are over the measured window, up to the moment all was stored.
        """
        args, publisher = self.args, self.publisher
        self.daemon_alive()
        persisted0 = self.persisted()
        health0 = self.health()
        gaps0 = self.history_gaps()
        replies0, no_sub0 = publisher.replies, publisher.no_subscriber
        warmup_ticks = round(rate * warmup)
        measured = round(rate * duration)
        total = warmup_ticks + measured
        interval = 1.0 / rate
        seq = 0
        lags: list[float] = []
        cpu0: dict[str, float] = {}
        cores0: dict[int, float] = {}
        window_began = 0.0
        progress: Progress | None = None
        t0 = time.monotonic() + 0.05
        while seq < total:
            now = time.monotonic()
            due = min(total, int((now - t0) * rate) + 1)
            if seq < warmup_ticks < due:
                due = warmup_ticks  # the window begins on a batch of its own
            if seq == warmup_ticks and not cpu0:
                cpu0, cores0 = self.cpu(), core_busy()
                window_began = now
                routed_w = self.health()["events"]["routed"]
                progress = Progress(self, window_began, health0["events"]["routed"])
                progress.start()
            if due > seq:
                if seq >= warmup_ticks:
                    lags.append(now - (t0 + seq * interval))
                publisher.send([source.batch(seq, due - seq, time.time())])
                seq = due
                if progress is not None:
                    progress.published = seq
            if seq < total:
                delay = max(t0 + seq * interval - time.monotonic(), SEND_EVERY)
                time.sleep(delay)
        last_publish = time.monotonic()
        assert progress is not None
        samples = progress.stop()
        self.daemon_alive()
        publisher.wait_replies(replies0 + total, timeout=60)
        health_end = self.health()
        backlog = total - (health_end["events"]["routed"] - health0["events"]["routed"])
        window_s = last_publish - window_began

        # ---- drain: until every tick is counted in a bar part
        stored = self.persisted() - persisted0
        changed = time.monotonic()
        while stored < total:
            time.sleep(0.05)
            now_stored = self.persisted() - persisted0
            if now_stored != stored:
                stored, changed = now_stored, time.monotonic()
            elif time.monotonic() - changed > args.drain:
                break
            self.daemon_alive()
        done = time.monotonic() if stored >= total else changed
        cpu1, cores1 = self.cpu(), core_busy()
        span = done - window_began
        health1 = self.health()
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
        lags.sort()
        events0, events1 = health0["events"], health1["events"]
        persist1 = health1["persist"]
        other: dict[str, float] = {}
        if self.pin:
            other[f"core{SERVER_CORE}"] = round(max(0.0, (
                cores1[SERVER_CORE] - cores0[SERVER_CORE] - cpu["daemon"]) / span), 2)
            other[f"core{LOAD_CORE}"] = round(max(0.0, (
                cores1[LOAD_CORE] - cores0[LOAD_CORE] - cpu["redis"] - cpu["postgres"]
                - cpu["publisher"]) / span), 2)
        published_rate = measured / window_s if window_s > 0 else 0.0
        routed_window = (health_end["events"]["routed"] - routed_w) / window_s \
            if window_s > 0 else 0.0
        out: dict[str, Any] = {
            "rate": rate,
            "symbols": source.n,
            "duration_s": duration,
            "warmup_s": warmup,
            "published": total,
            "routed": events1["routed"] - events0["routed"],
            "persisted": stored,
            "loss": total - stored,
            "lag_s": round(done - last_publish, 3),
            "published_per_s": round(published_rate, 1),
            "daemon_cpu_s": round(cpu["daemon"], 3),
            "cpu_s_per_100k_ticks": round(cpu["daemon"] / measured * 100_000, 3),
            "daemon_rss_mb": rss_mb(self.daemon.pid),
            "redis_cpu_s": round(cpu["redis"], 3),
            "postgres_cpu_s": round(cpu["postgres"], 3),
            "checks": {
                "publish_no_subscriber": publisher.no_subscriber - no_sub0,
                "publish_errors": publisher.errors,
                "received": events1["received"] - events0["received"],
                "malformed": events1.get("malformed", {}),
                "duplicates": events1["duplicates"] - events0["duplicates"],
                "store_failures": events1["store_failures"] - events0["store_failures"],
                "write_failures": persist1["write_failures"]
                - health0["persist"]["write_failures"],
                "spilled": persist1["spilled"] - health0["persist"]["spilled"],
                "spool_files": persist1["spool_files"],
                "pending_at_end": persist1["pending"],
                "history_gaps": 0,
            },
            "diagnostics": {
                "window_s": round(window_s, 3),
                "span_s": round(span, 3),
                "backlog_at_last_publish": backlog,
                "routed_per_s_in_window": round(routed_window, 1),
                "publisher_lag_ms": {"p99": round(percentile(lags, 0.99) * 1000, 2),
                                     "max": round((lags[-1] if lags else 0) * 1000, 2)},
                "daemon_busy": round(cpu["daemon"] / span, 3),
                "redis_busy": round(cpu["redis"] / span, 3),
                "postgres_busy": round(cpu["postgres"] / span, 3),
                "publisher_busy": round(cpu["publisher"] / span, 3),
                "core1_busy": round((cpu["redis"] + cpu["postgres"] + cpu["publisher"])
                                    / span, 3) if self.pin else None,
                "other_load_on_cores": other,
                "bar_parts_written": persist1["bars_written"] - health0["persist"]["bars_written"],
                "redis_rss_mb": rss_mb(self.redis.pid),
                "progress": samples,
                "pinned": self.pin,
            },
        }
        out["checks"]["history_gaps"] = self.history_gaps() - gaps0
        return out

    def history_gaps(self) -> int:
        """Times the daemon's live tail of the Redis history fell behind its trimming."""
        ready = http_json(self.base + "/ready", 5)[1]
        if not isinstance(ready, dict):
            return 0
        return int(ready.get("components", {}).get("history", {}).get("gaps") or 0)


def verdict(out: dict[str, Any], max_lag: float,
            max_backlog: float) -> tuple[bool, str | None, list[str], list[str]]:
    """
    Whether a run sustained its rate: C{(passed, limit, problems, warnings)}.
    The limit names what gave out first: C{"loss"} (ticks never reached
    PostgreSQL), C{"daemon"} (it fell behind: more than C{max_backlog}
    seconds of ticks not yet routed at the last publish, or the last tick
    stored more than C{max_lag} seconds after it), or C{"publisher"} (the
    load side could not publish at the rate). Warnings do not fail a run:
    the live tail of the Redis history falling behind its trimming skips
    live tick delivery to WebSocket clients, not storage.
    """
    problems, warnings = [], []
    checks, diag = out["checks"], out["diagnostics"]
    if out["loss"]:
        problems.append(f"loss={out['loss']}")
    for name in ("publish_no_subscriber", "publish_errors", "malformed", "duplicates",
                 "store_failures", "write_failures"):
        if checks.get(name):
            problems.append(f"{name}={checks[name]}")
    backlog = diag["backlog_at_last_publish"]
    behind = backlog > out["rate"] * max_backlog
    if behind:
        problems.append(f"the daemon fell behind: {backlog} ticks not yet routed at the last "
                        f"publish (over {max_backlog:g}s of ticks)")
    if out["lag_s"] > max_lag:
        problems.append(f"lag {out['lag_s']:.1f}s > {max_lag:g}s: the daemon fell behind")
    publisher_short = out["published_per_s"] < 0.97 * out["rate"]
    if publisher_short:
        problems.append(f"the publisher managed {out['published_per_s']:,.0f}/s of "
                        f"{out['rate']:,.0f}/s (core 1 busy {diag['core1_busy']})")
    if checks.get("history_gaps"):
        warnings.append(f"history_gaps={checks['history_gaps']}: the daemon's live tail of the "
                        f"Redis history fell behind its trimming (live tick delivery skipped)")
    if out["loss"] or checks.get("store_failures") or checks.get("publish_no_subscriber"):
        limit = "loss"
    elif behind or out["lag_s"] > max_lag:
        limit = "daemon"
    elif publisher_short or checks.get("publish_errors"):
        limit = "publisher"
    else:
        limit = None if not problems else "checks"
    return not problems, limit, problems, warnings


def run(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    rig.start()
    source = TickSource(symbol_list(args.symbols))
    common = {"flush_interval_s": args.flush_interval if args.flush_interval is not None else 1.0,
              "postgres_start_s": rig.postgres_start_s}
    if not args.ramp:
        out = rig.step(args.rate, args.duration, args.warmup, source)
        passed, limit, problems, warnings = verdict(out, args.max_lag, args.max_backlog)
        return {"scenario": args.scenario or (
                    f"ticks: {args.rate:g}/s over {args.symbols} symbols for {args.duration:g}s"),
                **out, **common, "sustained": passed, "limited_by": limit,
                "problems": problems, "warnings": warnings}
    steps, best, limit = [], None, "daemon"
    rate: float = round(args.start_rate)
    first = True
    while True:
        print(f"ingest.py: ramp step at {rate:,.0f} ticks/s ...", file=sys.stderr, flush=True)
        out = rig.step(rate, args.duration, args.warmup if first else 0.0, source)
        first = False
        passed, why, problems, warnings = verdict(out, args.max_lag, args.max_backlog)
        steps.append({"rate": rate, "ok": passed, "published_per_s": out["published_per_s"],
                      "loss": out["loss"], "lag_s": out["lag_s"],
                      "cpu_s_per_100k_ticks": out["cpu_s_per_100k_ticks"],
                      "daemon_busy": out["diagnostics"]["daemon_busy"],
                      "core1_busy": out["diagnostics"]["core1_busy"],
                      "backlog_at_last_publish": out["diagnostics"]["backlog_at_last_publish"],
                      "other_load_on_cores": out["diagnostics"]["other_load_on_cores"],
                      "history_gaps": out["checks"]["history_gaps"],
                      "problems": problems, "warnings": warnings})
        if passed:
            best = out
        else:
            limit = why or "checks"
            break
        if args.max_rate and rate * RAMP_STEP > args.max_rate:
            limit = "max_rate"
            break
        rate = round(rate * RAMP_STEP)
    return {"scenario": args.scenario or f"ticks ramp over {args.symbols} symbols, "
                                         f"{args.duration:g}s steps",
            "ramp": steps, "best": best, "limited_by": limit,
            "best_rate": best["rate"] if best else None,
            "history_gaps_from_rate": next((s["rate"] for s in steps if s["history_gaps"]), None),
            "target": TARGET, "meets_target": bool(best and best["rate"] >= TARGET), **common}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TickStock tick-ingestion benchmark "
                                                 "(ticks -> bars in PostgreSQL).")
    parser.add_argument("--rate", type=float, default=float(TARGET),
                        help=f"ticks per second ({TARGET})")
    parser.add_argument("--symbols", type=int, default=500, help="symbols, round-robin (500)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="measured publishing window in seconds (20; with --ramp, per step)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds published first at the same rate, counted for loss only (2)")
    parser.add_argument("--flush-interval", type=float, default=None,
                        help="the daemon's --flush-interval (its default: 1 s)")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="after publishing, give up once the stored count has not "
                             "changed for this long, in seconds (10)")
    parser.add_argument("--max-lag", type=float, default=3.0,
                        help="a run whose last tick is stored later than this after the last "
                             "publish fell behind (3 s)")
    parser.add_argument("--max-backlog", type=float, default=1.0,
                        help="a run with more than this many seconds' worth of ticks not yet "
                             "routed at the last publish fell behind (1 s)")
    parser.add_argument("--ramp", action="store_true",
                        help="raise the rate by x1.25 per step until a step fails")
    parser.add_argument("--start-rate", type=float, default=10_000.0,
                        help="the ramp's first rate (10000)")
    parser.add_argument("--max-rate", type=float, default=0.0,
                        help="stop the ramp before exceeding this rate (0: no limit)")
    parser.add_argument("--scenario", default=None, help="a name for this run in the output")
    parser.add_argument("--redis-server", default="/usr/bin/redis-server")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.symbols < 1 or args.start_rate <= 0:
        parser.error("--rate, --start-rate, --duration and --symbols must be positive")

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="tickstock-ingest-"))
    procs = Procs()
    rig = Rig(args, procs, workdir)
    keep = args.keep
    try:
        out = run(args, rig)
        print(json.dumps(out))
        sys.stdout.flush()
        if args.ramp:
            if out["best"] is None:
                print(f"ingest.py: no rate sustained (from {args.start_rate:g}/s): "
                      + "; ".join(out["ramp"][0]["problems"]), file=sys.stderr)
                return 2
            return 0
        if not out["sustained"]:
            print("ingest.py: NOT SUSTAINED: " + "; ".join(out["problems"]), file=sys.stderr)
            return 2
        return 0
    except BenchError as error:
        keep = True
        print(f"ingest.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ingest.py: interrupted; stopping everything", file=sys.stderr)
        return 130
    except BaseException:
        keep = True
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if rig.cluster is not None:
            rig.cluster.stop(workdir if keep else None)
        if keep:
            print(f"ingest.py: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
