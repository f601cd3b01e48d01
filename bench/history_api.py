#!/usr/bin/env python3
"""
TickStock REST history benchmark: C{GET /api/patterns} latency over a large
C{events} table.

Starts its own PostgreSQL cluster (loaded with --events pattern events
straight into the C{events} table, in SQL) and redis-server, then the daemon
twice, pinned to core 0: with C{--api-cache-ttl 0} (every request reaches
PostgreSQL) and with the default cache. A keep-alive HTTP client in a
separate process on core 1 sends a mix of queries one after another. Prints
one JSON object with p50/p95/p99 and requests/s per query kind, and EXPLAIN
(ANALYZE) of each kind's p95 query. See bench/README.md.

    .venv/bin/python bench/history_api.py
    .venv/bin/python bench/history_api.py --events 200000 --requests 100
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.servers, tickstock

from ingest import Cluster, postgres_cpu, twistd_path  # noqa: E402
from latency import (  # noqa: E402
    LOAD_CORE,
    PATTERNS,
    SERVER_CORE,
    TIMEFRAMES,
    BenchError,
    Procs,
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

PATTERN_NAMES = PATTERNS + [
    "Triple_Top", "Triple_Bottom", "Shooting_Star", "Inverted_Hammer", "Piercing_Line",
    "Dark_Cloud_Cover", "Three_White_Soldiers", "Three_Black_Crows",
]
DAY = 86400
SPAN_DAYS = 30
KINDS = ("latest", "symbol", "symbol_pattern", "pattern", "min_confidence", "since",
         "cursor", "limit_1000")
"""The query kinds, each a share of the mix (see L{Mix})."""
PAGE = 100
TARGET_P95_MS = {"uncached": 20.0, "cached": 5.0}
CONFIDENCES = ("0.5", "0.7", "0.8", "0.9", "0.95", "0.99")

LOAD_SQL = """
INSERT INTO events (id_ms, id_seq, topic, channel, event_type, symbol, pattern, confidence,
                    "timestamp", details)
SELECT ms, seq, 'patterns', 'tickstock.events.patterns', 'pattern_detected', sym, pat, conf,
       to_timestamp(ts),
       jsonb_build_object('event_type', 'pattern_detected', 'symbol', sym, 'pattern', pat,
                          'confidence', conf, 'event_id', 'pl-' || g, 'timeframe', tf,
                          'price', price, 'volume', vol, 'direction', dir,
                          'source', 'TickStockPL', 'timestamp', ts)
FROM (
  SELECT g, ms, seq, sym, pat, conf,
         round((ms / 1000.0 - random() * 0.05)::numeric, 3)::float8 AS ts,
         (%(timeframes)s::text[])[1 + floor(random() * %(n_timeframes)s)::int] AS tf,
         round((20 + random() * 880)::numeric, 2)::float8 AS price,
         (10000 + floor(random() * 4990000))::bigint AS vol,
         CASE WHEN random() < 0.5 THEN 'bullish' ELSE 'bearish' END AS dir
  FROM (
    SELECT g, %(base)s::bigint + (g / %(per_ms)s) * %(step)s::bigint AS ms,
           (g %% %(per_ms)s)::int AS seq,
           (%(symbols)s::text[])[1 + floor(%(n_symbols)s * power(random(), 2))::int] AS sym,
           (%(patterns)s::text[])[1 + floor(%(n_patterns)s * power(random(), 3))::int] AS pat,
           round(random()::numeric, 3)::float8 AS conf
    FROM generate_series(0, %(n)s - 1) AS g
  ) a
) b
"""
"""
Pattern events as the daemon stores them: ids increasing over the last
SPAN_DAYS days, 4 events per millisecond (seq 0-3, as a batch of the
history script gives them); symbol k of N drawn with probability
~ 1/sqrt(k) (the first symbol has ~4.5 % of all events, the last ~0.1 %),
pattern names skewed the same way more steeply (~37 % to ~1.7 %),
confidence uniform on 0..1, and C{details} the producer's payload.
"""


# ------------------------------------------------------------------ load


def load_events(cluster: Cluster, count: int, symbols: list[str], patterns: list[str],
                seed: int) -> dict[str, Any]:
    """
    Fill C{events} in one INSERT ... SELECT: the secondary indexes are
    dropped first and rebuilt after (from their own definitions), which is
    quicker than maintaining them row by row; then VACUUM ANALYZE, as
    autovacuum would have done on a table this old.
    """
    conn = cluster.connect()
    began = time.monotonic()
    now_ms = int(time.time() * 1000)
    span_ms = SPAN_DAYS * DAY * 1000
    per_ms = 4
    with conn.cursor() as cursor:
        cursor.execute("SELECT setseed(%s)", ((seed % 1000) / 1000.0,))
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes "
                       "WHERE tablename = 'events' AND indexdef NOT LIKE 'CREATE UNIQUE%'")
        indexes = cursor.fetchall()
        for name, _ in indexes:
            cursor.execute(f'DROP INDEX "{name}"')
        cursor.execute(LOAD_SQL, {
            "base": now_ms - span_ms, "step": max(1, span_ms // max(1, count // per_ms)),
            "per_ms": per_ms, "n": count,
            "symbols": symbols, "n_symbols": len(symbols),
            "patterns": patterns, "n_patterns": len(patterns),
            "timeframes": TIMEFRAMES, "n_timeframes": len(TIMEFRAMES),
        })
        inserted = time.monotonic()
        for _, definition in indexes:
            cursor.execute(definition)
        cursor.execute("VACUUM ANALYZE events")
        cursor.execute('SELECT count(*), extract(epoch FROM min("timestamp"))::float8, '
                       'extract(epoch FROM max("timestamp"))::float8, '
                       "pg_relation_size('events'), pg_indexes_size('events') FROM events")
        rows, first, last, table_bytes, index_bytes = cursor.fetchone()
        cursor.execute("SELECT symbol, count(*) FROM events GROUP BY 1 ORDER BY 2 DESC")
        per_symbol = cursor.fetchall()
        cursor.execute("SELECT pattern, count(*) FROM events GROUP BY 1 ORDER BY 2 DESC")
        per_pattern = cursor.fetchall()
    return {
        "events": rows,
        "symbols": len(per_symbol),
        "patterns": len(per_pattern),
        "events_per_symbol": {"most": per_symbol[0][1],
                              "median": per_symbol[len(per_symbol) // 2][1],
                              "least": per_symbol[-1][1]},
        "events_per_pattern": {"most": per_pattern[0][1], "least": per_pattern[-1][1]},
        "first_event_time": first,
        "last_event_time": last,
        "table_mb": round(table_bytes / 2**20, 1),
        "indexes_mb": round(index_bytes / 2**20, 1),
        "insert_s": round(inserted - began, 2),
        "load_s": round(time.monotonic() - began, 2),
        "rebuilt_indexes": [name for name, _ in indexes],
        "popular": {"symbols": [s for s, _ in per_symbol], "patterns": [p for p, _ in per_pattern]},
    }


# ------------------------------------------------------------------ the mix


class Mix:
    """
    The queries, as C{/api/patterns} paths, every one with C{limit=100}
    unless its kind says otherwise:

     - C{latest}: no filter, the newest page;
     - C{symbol}: one symbol;
     - C{symbol_pattern}: one symbol and one pattern name;
     - C{pattern}: one pattern name;
     - C{min_confidence}: one of 0.5 ... 0.99;
     - C{since}: events of the last 1 hour to 7 days;
     - C{cursor}: the newest pages 2 to 5 of the unfiltered history, each
       following the previous page's C{next_cursor};
     - C{limit_1000}: the newest 1000 (the largest page).

    Symbols and patterns are drawn half by popularity (as stored), half
    uniformly, so both busy and rare ones are asked for.
    """

    def __init__(self, rng: random.Random, symbols: list[str], patterns: list[str],
                 last_time: float) -> None:
        self.rng = rng
        self.symbols = symbols  # most events first
        self.patterns = patterns
        self.last_time = last_time

    def _symbol(self) -> str:
        if self.rng.random() < 0.5:
            return self.symbols[int(len(self.symbols) * self.rng.random() ** 2)]
        return self.rng.choice(self.symbols)

    def _pattern(self) -> str:
        if self.rng.random() < 0.5:
            return self.patterns[int(len(self.patterns) * self.rng.random() ** 3)]
        return self.rng.choice(self.patterns)

    def item(self, kind: str) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if kind == "symbol":
            params["symbol"] = self._symbol()
        elif kind == "symbol_pattern":
            params["symbol"], params["pattern"] = self._symbol(), self._pattern()
        elif kind == "pattern":
            params["pattern"] = self._pattern()
        elif kind == "min_confidence":
            params["min_confidence"] = self.rng.choice(CONFIDENCES)
        elif kind == "since":
            params["since"] = int(self.last_time - self.rng.uniform(3600, 7 * DAY))
        params["limit"] = 1000 if kind == "limit_1000" else PAGE
        item: dict[str, Any] = {"kind": kind, "path": "/api/patterns?" + urlencode(params)}
        if kind == "cursor":
            item["pages"] = 5
        return item

    def plan(self, per_kind: int, variants: int | None) -> list[dict[str, Any]]:
        """
        C{per_kind} measured requests of every kind, shuffled. With
        C{variants}, each kind has only that many distinct queries, repeated
        (the cached run); without, every request is drawn afresh.
        """
        items = []
        for kind in KINDS:
            count = -(-per_kind // 4) if kind == "cursor" else per_kind  # 4 pages per chain
            if variants:
                distinct = [self.item(kind) for _ in range(variants)]
                items += [distinct[i % variants] for i in range(count)]
            else:
                items += [self.item(kind) for _ in range(count)]
        self.rng.shuffle(items)
        return items


# ------------------------------------------------------------------ client


def client_main(port: int) -> int:
    """
    The HTTP client (run as its own process): one keep-alive connection,
    requests one after another; reads the plan and the token as JSON on
    stdin, prints the timings as JSON on stdout.
    """
    plan = json.load(sys.stdin)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    headers = {"Authorization": "Bearer " + plan["token"]}
    clock = time.perf_counter

    def get(path: str) -> tuple[int, bytes, float]:
        began = clock()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        return response.status, body, clock() - began

    results: list[list[Any]] = []
    statuses: dict[str, int] = {}
    cpu0, began = self_cpu(), time.monotonic()
    for phase in ("warmup", "measure"):
        for item in plan[phase]:
            kind, path = item["kind"], item["path"]
            for page in range(1, item.get("pages", 1) + 1):
                status, body, seconds = get(path)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if phase == "measure" and (page > 1 or "pages" not in item):
                    results.append([kind, path, seconds, status, len(body)])
                if "pages" not in item or status != 200:
                    break
                cursor = json.loads(body).get("next_cursor")
                if not cursor:
                    break
                path = item["path"] + "&cursor=" + cursor
    conn.close()
    print(json.dumps({"results": results, "statuses": statuses,
                      "cpu_s": round(self_cpu() - cpu0, 3),
                      "wall_s": round(time.monotonic() - began, 3)}))
    return 0


# ------------------------------------------------------------------ bench


def stats(values: list[float]) -> dict[str, Any]:
    values = sorted(values)
    n = len(values)

    def pct(q: float) -> float:
        return round(values[min(n - 1, max(0, int(n * q + 0.5) - 1))] * 1000, 3)

    total = sum(values)
    return {"requests": n, "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "max_ms": round(values[-1] * 1000, 3), "mean_ms": round(total / n * 1000, 3),
            "requests_per_s": round(n / total, 1) if total else None}


class Bench:
    """redis-server and PostgreSQL for the whole run, and a daemon and a client per measurement."""

    def __init__(self, args: argparse.Namespace, procs: Procs, workdir: Path) -> None:
        self.args = args
        self.procs = procs
        self.workdir = workdir
        self.cluster: Cluster | None = None

    def start(self) -> None:
        args, workdir = self.args, self.workdir
        cores = os.sched_getaffinity(0)
        self.pin = shutil.which("taskset") is not None and {SERVER_CORE, LOAD_CORE} <= cores
        self.server_core, self.load_core = (SERVER_CORE, LOAD_CORE) if self.pin else (None, None)
        if self.pin:
            os.sched_setaffinity(0, {LOAD_CORE})  # PostgreSQL (started by us) inherits it
        else:
            print("warning: cannot pin to cores 0 and 1; running unpinned", file=sys.stderr)
        self.redis_port = free_port()
        with open(workdir / "redis.out", "wb") as out:
            self.redis = self.procs.start("redis", pinned(self.load_core, [
                args.redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(workdir),
                "--logfile", str(workdir / "redis.log"), "--daemonize", "no",
            ]), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

        def redis_up() -> bool:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5):
                return True

        wait_until("redis-server", redis_up, 10, self.redis_alive)
        self.cluster = Cluster()
        self.cluster.migrate()
        self.secret = secrets.token_urlsafe(48)
        (workdir / "jwt-secret").write_text(self.secret)

    def redis_alive(self) -> None:
        if self.redis.poll() is not None:
            raise BenchError(f"redis-server exited ({self.redis.returncode}):\n"
                             f"{tail(self.workdir / 'redis.out')}")

    def token(self) -> str:
        from tickstock.deliver.auth import JWTAuthenticator

        return JWTAuthenticator(self.secret.encode()).mint("bench", time.time(), 3600)

    def measure(self, mode: str, warmup: list[dict[str, Any]],
                plan: list[dict[str, Any]]) -> dict[str, Any]:
        """One daemon (cache on or off), one client run; the daemon is stopped after."""
        assert self.cluster is not None
        workdir = self.workdir
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = workdir / f"daemon-{mode}.log"
        argv = [twistd_path(), "-n", "--pidfile=", "tickstock",
                "--redis", f"redis://127.0.0.1:{self.redis_port}/0",
                "--postgres", self.cluster.server.dsn(),
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--jwt-secret-file", str(workdir / "jwt-secret"),
                "--spool-dir", str(workdir / "spool"),
                # One load generator as one user: the limiter's cost, not its refusals.
                "--api-rate", "1000000", "--api-burst", "1000000"]
        if mode == "uncached":
            argv += ["--api-cache-ttl", "0"]
        with open(log_path, "wb") as log:
            daemon = self.procs.start(f"daemon-{mode}", pinned(self.server_core, argv),
                                      cwd=str(workdir), stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)

        def alive() -> None:
            self.redis_alive()
            if daemon.poll() is not None:
                raise BenchError(f"daemon exited ({daemon.returncode}):\n{tail(log_path)}")

        try:
            wait_until("the daemon's /ready", lambda: http_json(base + "/ready", 1)[0] == 200,
                       30, alive)
            print(f"history_api.py: {mode}: daemon pid {daemon.pid}, {len(plan)} requests",
                  file=sys.stderr, flush=True)
            self.client(f"{mode}-warmup", port, {"warmup": warmup, "measure": []})
            health0 = http_json(base + "/health")[1]
            cpu0 = {"daemon": cpu_seconds(daemon.pid), "redis": cpu_seconds(self.redis.pid),
                    "postgres": postgres_cpu(self.cluster.pid)}
            report = self.client(mode, port, {"warmup": [], "measure": plan})
            alive()
            cpu = {"daemon": cpu_seconds(daemon.pid) - cpu0["daemon"],
                   "redis": cpu_seconds(self.redis.pid) - cpu0["redis"],
                   "postgres": postgres_cpu(self.cluster.pid) - cpu0["postgres"]}
            health1 = http_json(base + "/health")[1]
            rss = rss_mb(daemon.pid)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        results = report["results"]
        by_kind: dict[str, list[float]] = {}
        slow: dict[str, list[tuple[float, str]]] = {}
        errors = 0
        for kind, path, seconds, status, _ in results:
            if status != 200:
                errors += 1
                continue
            by_kind.setdefault(kind, []).append(seconds)
            slow.setdefault(kind, []).append((seconds, path))
        kinds = {kind: stats(by_kind[kind]) for kind in KINDS if kind in by_kind}
        for kind, timed in slow.items():
            timed.sort()
            kinds[kind]["p95_query"] = timed[min(len(timed) - 1, int(len(timed) * 0.95))][1]
        cache0, cache1 = health0["api"]["cache"], health1["api"]["cache"]
        hits = cache1["hits"] - cache0["hits"]
        misses = cache1["misses"] - cache0["misses"]
        measured = len(results)
        all_ok = [r[2] for r in results if r[3] == 200]
        overall = stats(all_ok) if all_ok else {}
        target = TARGET_P95_MS[mode]
        worst = max(kinds.items(), key=lambda kv: kv[1]["p95_ms"]) if kinds else (None, {})
        return {
            "api_cache_ttl_s": 0 if mode == "uncached" else "default (5)",
            "requests": measured,
            "errors": errors,
            "statuses": report["statuses"],
            "overall": overall,
            "kinds": kinds,
            "slowest_kind": worst[0],
            "target_p95_ms": target,
            "meets_target": bool(kinds) and errors == 0
            and all(k["p95_ms"] < target for k in kinds.values()),
            "cache": {"hits": hits, "misses": misses,
                      "ratio": round(hits / (hits + misses), 4) if hits + misses else None},
            "daemon_cpu_ms_per_request": round(cpu["daemon"] / max(1, measured) * 1000, 3),
            "daemon_cpu_s": round(cpu["daemon"], 3),
            "postgres_cpu_s": round(cpu["postgres"], 3),
            "redis_cpu_s": round(cpu["redis"], 3),
            "client_cpu_s": report["cpu_s"],
            "client_wall_s": report["wall_s"],
            "daemon_rss_mb": rss,
        }

    def client(self, name: str, port: int, plan: dict[str, Any]) -> dict[str, Any]:
        """Run the client process (on core 1) over C{plan}; its report."""
        client_err = self.workdir / f"client-{name}.err"
        with open(client_err, "wb") as err:
            client = self.procs.start(f"client-{name}", pinned(self.load_core, [
                sys.executable, str(Path(__file__).resolve()), "--client", str(port),
            ]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        try:
            stdout, _ = client.communicate(json.dumps({"token": self.token(), **plan}).encode(),
                                           timeout=self.args.client_timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"the client did not finish within {self.args.client_timeout:g}s") from None
        if client.returncode != 0:
            raise BenchError(f"the client failed ({client.returncode}):\n{tail(client_err)}")
        report: dict[str, Any] = json.loads(stdout)
        return report

    def explain(self, path: str, text: bool) -> dict[str, Any]:
        """EXPLAIN (ANALYZE, BUFFERS) of the SQL the daemon runs for C{path}."""
        assert self.cluster is not None
        sql, params = store_sql(path)
        conn = self.cluster.connect()
        with conn.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
            plan = cursor.fetchone()[0]
            lines = None
            if text:
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                lines = [row[0] for row in cursor.fetchall()]
            rendered = cursor.mogrify(sql, params).decode()
        out = {"query": path, "sql": rendered, **summarize(plan)}
        if lines is not None:
            out["plan"] = lines
        return out


def store_sql(path: str) -> tuple[str, list[Any]]:
    """
    The SQL and parameters L{tickstock.store.postgres.PostgresStore.patterns}
    runs for an C{/api/patterns} path (the API asks for one row more than
    the page, to know whether there is a next page), captured from the store
    itself rather than copied.
    """
    from twisted.internet.defer import succeed

    from tickstock.domain.records import PatternQuery
    from tickstock.store.postgres import PostgresStore

    captured: list[tuple[str, list[Any]]] = []

    class Connection:
        def runQuery(self, sql: str, params: list[Any]) -> Any:
            captured.append((sql, list(params)))
            return succeed([])

    class Reader:
        def run(self, call: Any) -> Any:
            return call(Connection())

    query = dict(parse_qsl(urlsplit(path).query))
    store = PostgresStore.__new__(PostgresStore)
    store.reader = Reader()  # type: ignore[assignment]
    store.patterns(PatternQuery(
        symbol=query.get("symbol"), pattern=query.get("pattern"),
        min_confidence=float(query["min_confidence"]) if "min_confidence" in query else None,
        since=float(query["since"]) if "since" in query else None,
        before=query.get("cursor"), limit=int(query.get("limit", PAGE)) + 1,
    ))
    if not captured:
        raise BenchError("could not capture the store's SQL")
    return captured[0]


def summarize(plan: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts of an EXPLAIN (FORMAT JSON) that say what to fix: scans, indexes, rows."""
    root = plan[0]
    nodes: list[dict[str, Any]] = []

    def walk(node: dict[str, Any], depth: int) -> None:
        item: dict[str, Any] = {"depth": depth, "node": node["Node Type"]}
        for name in ("Index Name", "Relation Name", "Scan Direction", "Index Cond", "Filter",
                     "Actual Rows", "Actual Loops", "Rows Removed by Filter", "Heap Fetches",
                     "Shared Hit Blocks", "Shared Read Blocks", "Actual Total Time"):
            if name in node:
                item[name.lower().replace(" ", "_")] = node[name]
        nodes.append(item)
        for child in node.get("Plans", ()):
            walk(child, depth + 1)

    walk(root["Plan"], 0)
    return {
        "execution_ms": round(root["Execution Time"], 3),
        "planning_ms": round(root["Planning Time"], 3),
        "indexes": sorted({n["index_name"] for n in nodes if "index_name" in n}),
        "scans": [n["node"] for n in nodes if "Scan" in n["node"]],
        "nodes": nodes,
    }


def run(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    bench.start()
    assert bench.cluster is not None
    print(f"history_api.py: loading {args.events:,} events ...", file=sys.stderr, flush=True)
    loaded = load_events(bench.cluster, args.events, symbol_list(args.symbols),
                         PATTERN_NAMES[:args.patterns], args.seed)
    popular = loaded.pop("popular")
    mix = Mix(random.Random(args.seed), popular["symbols"], popular["patterns"],
              loaded["last_event_time"])
    warmup = mix.plan(max(1, args.warmup // len(KINDS)), None)
    uncached = bench.measure("uncached", warmup, mix.plan(args.requests, None))
    cached = bench.measure("cached", warmup,
                           mix.plan(args.cached_requests, args.variants))
    plans: dict[str, Any] = {}
    for kind, kstats in uncached["kinds"].items():
        try:
            plans[kind] = bench.explain(kstats["p95_query"],
                                        text=kind == uncached["slowest_kind"])
        except Exception as error:  # a plan is a diagnostic, not the result
            plans[kind] = {"query": kstats["p95_query"], "error": str(error)}
    slowest = uncached["slowest_kind"]
    return {
        "scenario": args.scenario or f"/api/patterns over {loaded['events']:,} events",
        "data": loaded,
        "uncached": uncached,
        "cached": cached,
        "explain_slowest_uncached": {"kind": slowest, **plans.get(slowest, {})},
        "explain": {k: {key: v for key, v in p.items() if key not in ("nodes", "plan")}
                    for k, p in plans.items()},
        "meets_target": uncached["meets_target"] and cached["meets_target"],
        "diagnostics": {"pinned": bench.pin, "daemon_core": bench.server_core,
                        "client_redis_postgres_core": bench.load_core,
                        "warmup_requests": len(warmup), "variants_cached": args.variants},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TickStock /api/patterns latency benchmark.")
    parser.add_argument("--events", type=int, default=1_000_000,
                        help="pattern events loaded into the events table (1000000)")
    parser.add_argument("--symbols", type=int, default=500, help="symbols (500)")
    parser.add_argument("--patterns", type=int, default=20,
                        help=f"pattern names (20, at most {len(PATTERN_NAMES)})")
    parser.add_argument("--requests", type=int, default=400,
                        help="measured uncached requests per query kind (400)")
    parser.add_argument("--cached-requests", type=int, default=1500,
                        help="measured requests per query kind with the cache on (1500)")
    parser.add_argument("--variants", type=int, default=5,
                        help="distinct queries per kind in the cached run, repeated (5)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="requests sent before measuring, each run (100)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--client-timeout", type=float, default=600.0)
    parser.add_argument("--scenario", default=None, help="a name for this run in the output")
    parser.add_argument("--redis-server", default="/usr/bin/redis-server")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    parser.add_argument("--client", type=int, default=None, metavar="PORT",
                        help=argparse.SUPPRESS)  # the client process
    args = parser.parse_args(argv)
    if args.client is not None:
        return client_main(args.client)
    if not 1 <= args.patterns <= len(PATTERN_NAMES) or args.events < 1000 or args.requests < 1:
        parser.error("--patterns out of range, or --events < 1000, or --requests < 1")

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="tickstock-history-api-"))
    procs = Procs()
    bench = Bench(args, procs, workdir)
    keep = args.keep
    try:
        out = run(args, bench)
        print(json.dumps(out))
        sys.stdout.flush()
        errors = out["uncached"]["errors"] + out["cached"]["errors"]
        if errors:
            print(f"history_api.py: NOT CLEAN: {errors} requests did not answer 200",
                  file=sys.stderr)
            return 2
        if not out["meets_target"]:
            print("history_api.py: p95 target missed (uncached < 20 ms, cached < 5 ms); "
                  f"slowest uncached kind: {out['uncached']['slowest_kind']}", file=sys.stderr)
        return 0
    except BenchError as error:
        keep = True
        print(f"history_api.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("history_api.py: interrupted; stopping everything", file=sys.stderr)
        return 130
    except BaseException:
        keep = True
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if bench.cluster is not None:
            bench.cluster.stop(workdir if keep else None)
        if keep:
            print(f"history_api.py: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
