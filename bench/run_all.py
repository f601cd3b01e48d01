"""
Every benchmark scenario, TickStock beside the python-socketio peer, in one
command; writes bench/results/latest.json and latest.md and prints the table.

    .venv/bin/python bench/run_all.py            # about 20 minutes
    .venv/bin/python bench/run_all.py --quick    # shorter windows, for a smoke run
    .venv/bin/python bench/run_all.py --only peers   # TickStock, Node, python-socketio

Each scenario is one run of bench/latency.py (its own redis, server and
load generator, pinned to cores 0 and 1), except `ticks` (bench/ingest.py:
ticks into bars in PostgreSQL) and `history_api` (bench/history_api.py:
/api/patterns over 1,000,000 stored events); see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from latency import peer_missing

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RAMP_STEP = 1.25
MAX_P99_MS = 100.0
SOCKETIO_BUDGET = 1.20
"""The claim checked: Socket.IO costs at most 20 % more server CPU per delivery than /ws."""
PEER_SERVERS = {
    # TickStock over its own Socket.IO endpoint: every server speaks the same protocol.
    "tickstock": ("--server", "tickstock", "--endpoint", "socketio"),
    "node": ("--server", "node"),
    "python-socketio": ("--server", "peer"),
}


def latency(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    """One bench/latency.py run: exit status, its JSON (if any), its stderr tail."""
    proc = subprocess.run([sys.executable, str(HERE / "latency.py"), *args],
                          capture_output=True, text=True, timeout=1800, check=False)
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out, "\n".join(proc.stderr.splitlines()[-3:])


def scenario(name: str, *args: str) -> dict[str, Any]:
    print(f"run_all: {name} ...", file=sys.stderr, flush=True)
    status, out, err = latency("--scenario", name, *args)
    if out is None:
        return {"scenario": name, "error": err or f"exit status {status}"}
    out["clean"] = status == 0
    if status != 0:
        out["problems"] = err
    return out


def endpoints(name: str, pairs: int, *args: str) -> dict[str, Any]:
    """
    The same scenario on /ws and on Socket.IO, in pairs, alternating which
    goes first (ws, socketio, socketio, ws, ...) so that a drift in the
    machine's other load falls on both alike; medians of each endpoint's
    runs, and the ratio socketio/ws of their CPU per delivery.
    """
    runs: dict[str, list[dict[str, Any]]] = {"ws": [], "socketio": []}
    for i in range(pairs):
        for endpoint in ("ws", "socketio") if i % 2 == 0 else ("socketio", "ws"):
            runs[endpoint].append(scenario(f"{name} on {endpoint} ({i + 1}/{pairs})",
                                           "--endpoint", endpoint, *args))
    out: dict[str, Any] = {"scenario": name, "pairs": pairs, "runs": runs}
    for endpoint, done in runs.items():
        out[endpoint] = medians(done)
    ws, sio = out["ws"], out["socketio"]
    out["cpu_ratio"] = (round(sio["cpu_s_per_100k_deliveries"] / ws["cpu_s_per_100k_deliveries"], 3)
                        if ws and sio else None)
    # Each pair's own ratio too: the two runs of a pair saw the same load.
    out["pair_ratios"] = [
        round(b["cpu_s_per_100k_deliveries"] / a["cpu_s_per_100k_deliveries"], 3)
        for a, b in zip(runs["ws"], runs["socketio"], strict=True)
        if a.get("cpu_s_per_100k_deliveries") and b.get("cpu_s_per_100k_deliveries")]
    return out


def medians(done: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians of the runs that measured something; loss added up over all of them."""
    ok = [r for r in done if "latency_ms" in r and r.get("cpu_s_per_100k_deliveries")]
    return None if not ok else {
        "runs": len(done),
        "clean": sum(1 for r in done if r.get("clean")),
        "loss": sum(r.get("loss", 0) for r in ok),
        "deliveries_per_s": statistics.median(r["deliveries_per_s"] for r in ok),
        "cpu_s_per_100k_deliveries": statistics.median(
            r["cpu_s_per_100k_deliveries"] for r in ok),
        "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in ok),
        "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in ok),
        "server_rss_mb": statistics.median(r["server_rss_mb"] for r in ok),
    }


def peers(name: str, repeats: int, skip: dict[str, str], *args: str) -> dict[str, Any]:
    """
    One scenario on TickStock, the Node peer and the python-socketio peer,
    C{repeats} rounds, each round in a rotated order (so a drift in the
    machine's other load falls on all alike); medians per server, and the
    ratios TickStock/peer of CPU per delivery, of the medians and round by
    round (the runs of a round saw about the same load). C{skip}: servers
    that cannot run here, and why.
    """
    servers = list(PEER_SERVERS)
    runs: dict[str, list[dict[str, Any]]] = {server: [] for server in servers}
    for i in range(repeats):
        for server in servers[i % 3:] + servers[:i % 3]:
            if server not in skip:
                runs[server].append(scenario(f"{name} on {server} ({i + 1}/{repeats})",
                                             *PEER_SERVERS[server], *args))
    out: dict[str, Any] = {"scenario": name, "repeats": repeats, "runs": runs, "skipped": skip}
    for server in servers:
        out[server] = medians(runs[server])
    ours = out["tickstock"]
    for server in servers[1:]:
        theirs = out[server]
        out[f"cpu_ratio_{server}"] = (
            round(ours["cpu_s_per_100k_deliveries"] / theirs["cpu_s_per_100k_deliveries"], 3)
            if ours and theirs else None)
        out[f"round_ratios_{server}"] = [
            round(a["cpu_s_per_100k_deliveries"] / b["cpu_s_per_100k_deliveries"], 3)
            for a, b in zip(runs["tickstock"], runs[server], strict=False)
            if a.get("cpu_s_per_100k_deliveries") and b.get("cpu_s_per_100k_deliveries")]
    return out


def peers_lines(results: dict[str, Any]) -> list[str]:
    """The TickStock / Node / python-socketio table: medians per server and the CPU ratios."""
    out = results["peers"]
    repeats = next(iter(out.values()))["repeats"]
    lines = [
        f"Peers at 20,000 deliveries/s (`run_all.py --only peers`: TickStock on its Socket.IO "
        f"endpoint, auth on; Node: Socket.IO 4.8 + Redis adapter, events through "
        f"@socket.io/redis-emitter, JWT checked in io.use; python-socketio: "
        f"bench/peer_socketio.py, no auth; each server pinned to core 0; {repeats} rounds "
        f"in rotated order; medians, loss summed):",
        "",
        "| scenario | server | runs (clean) | loss | p50 ms | p99 ms | CPU-s/100k | RSS "
        "| TickStock/this CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in (("fanout", "fan-out: 1000 clients on 1 symbol, 20 ev/s"),
                       ("filtered", "filtered: 100 symbols x 10 clients, 2000 ev/s")):
        scen = out.get(key)
        if scen is None:
            continue
        for server in PEER_SERVERS:
            m = scen.get(server)
            if not m:
                failed = [str(r.get("error") or r.get("problems") or "").strip()
                          for r in scen["runs"][server]]
                why = (scen["skipped"].get(server)
                       or (failed and failed[0] and failed[0].splitlines()[-1])
                       or "did not run").replace("|", "/")
                lines.append(f"| {label} | {server} | - | - | - | - | - | - | {why} |")
                continue
            ratio = scen.get(f"cpu_ratio_{server}")
            rounds = scen.get(f"round_ratios_{server}") or []
            verdict = "" if ratio is None else (
                f"{ratio:.2f} (by round {', '.join(f'{r:.2f}' for r in rounds)})")
            lines.append(
                f"| {label} | {server} | {m['runs']} ({m['clean']}) | {m['loss']} "
                f"| {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['cpu_s_per_100k_deliveries']:.2f} "
                f"| {m['server_rss_mb']:.0f} MB | {verdict} |")
    return lines


def endpoint_lines(results: dict[str, Any]) -> list[str]:
    """The /ws vs Socket.IO table: medians per endpoint and the CPU ratio, per scenario."""
    lines = [
        f"Socket.IO beside /ws (`--endpoint ws|socketio`: the same daemon and scenario, runs "
        f"alternating in pairs; medians; the claim: Socket.IO costs at most "
        f"{SOCKETIO_BUDGET - 1:.0%} more CPU per delivery):",
        "",
        "| scenario | endpoint | runs (clean) | loss | p50 ms | p99 ms | CPU-s/100k "
        "| socketio/ws CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in (("sio_fanout", "fan-out: 1000 clients on 1 symbol, 40 ev/s"),
                       ("sio_filtered", "filtered: 100 symbols x 10 clients, 4000 ev/s")):
        out = results.get(key)
        if out is None:
            continue
        ratio, pairs = out.get("cpu_ratio"), out.get("pair_ratios") or []
        verdict = ("-" if ratio is None else
                   f"{ratio:.2f} ({'within' if ratio <= SOCKETIO_BUDGET else 'over'} budget; "
                   f"by pair {', '.join(f'{r:.2f}' for r in pairs)})")
        for endpoint in ("ws", "socketio"):
            m = out.get(endpoint)
            if not m:
                lines.append(f"| {label} | {endpoint} | - | - | - | - | - | did not run |")
                continue
            lines.append(
                f"| {label} | {endpoint} | {m['runs']} ({m['clean']}) | {m['loss']} "
                f"| {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['cpu_s_per_100k_deliveries']:.2f} "
                f"| {verdict if endpoint == 'socketio' else ''} |")
    return lines


def ramp(name: str, start: float, duration: str, *args: str) -> dict[str, Any]:
    """
    Raise the rate by L{RAMP_STEP} until a run loses anything, is not
    clean or has p99 >= 100 ms; the result is the last run that passed. A
    run that passed but had the load generator's core saturated ends the
    ramp too: beyond it the harness, not the server, is measured.
    """
    rate, best, steps, limit = start, None, [], "server"
    while True:
        out = scenario(f"{name} @ {rate:g} ev/s", "--rate", f"{rate:g}",
                       "--duration", duration, *args)
        passed = (out.get("loss") == 0 and "latency_ms" in out
                  and out["latency_ms"]["p99"] < MAX_P99_MS)
        loadgen_bound = out.get("diagnostics", {}).get("loadgen_busy", 0) > 0.8
        ok = passed and (out.get("clean") or loadgen_bound)
        steps.append({"rate": rate, "ok": bool(ok),
                      "deliveries_per_s": out.get("deliveries_per_s"),
                      "p99_ms": out.get("latency_ms", {}).get("p99"),
                      "server_busy": out.get("diagnostics", {}).get("server_busy"),
                      "loadgen_busy": out.get("diagnostics", {}).get("loadgen_busy"),
                      "loss": out.get("loss"), "problems": out.get("problems")})
        if ok:
            best = out
        if not ok or loadgen_bound:
            limit = "load generator" if ok else "server"
            break
        rate = round(rate * RAMP_STEP, 2)
    return {"scenario": name, "ramp": steps, "best": best, "limited_by": limit}


def api_latency(requests: int) -> dict[str, Any]:
    """
    GET /health and /ready against an embedded daemon, one keep-alive
    connection at a time (the REST history API: L{history_api}).
    """
    import http.client
    import socket
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    twistd = str(Path(sys.executable).parent / "twistd")
    workdir = tempfile.mkdtemp(prefix="tickstock-api-")
    proc = subprocess.Popen(
        ["taskset", "-c", "0", twistd, "-n", "--pidfile=", "tickstock",
         "--listen", f"tcp:{port}:interface=127.0.0.1",
         # One load generator as one user: measure the limiter's cost, not its refusals.
         "--api-rate", "1000000", "--api-burst", "1000000"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    return {"scenario": "api", "error": "the daemon did not start"}
                time.sleep(0.1)
        out: dict[str, Any] = {"scenario": "API latency (embedded daemon, keep-alive)"}
        for path in ("/health", "/ready"):
            conn = http.client.HTTPConnection("127.0.0.1", port)
            times = []
            for _ in range(requests):
                t = time.perf_counter()
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                times.append(time.perf_counter() - t)
            conn.close()
            times.sort()
            out[path] = {"requests": requests,
                         "p50_ms": round(times[len(times) // 2] * 1000, 3),
                         "p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 3)}
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def script(name: str, path: str, *args: str) -> dict[str, Any]:
    """
    One run of another bench script that prints one JSON object (ingest.py,
    history_api.py): its output, with C{clean} and, if not, its stderr tail.
    """
    print(f"run_all: {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, str(HERE / path), *args],
                          capture_output=True, text=True, timeout=1800, check=False)
    err = "\n".join(proc.stderr.splitlines()[-3:])
    if not proc.stdout.strip():
        return {"scenario": name, "error": err or f"exit status {proc.returncode}"}
    out: dict[str, Any] = json.loads(proc.stdout)
    out["clean"] = proc.returncode == 0
    if proc.returncode != 0:
        out["problems"] = err
    return out


def ticks_lines(out: dict[str, Any]) -> list[str]:
    """The tick-ingestion table: a ramp's best step and the one that failed, or one run."""
    lines = [
        "Tick ingestion (`bench/ingest.py`: ticks -> 1-minute bars in PostgreSQL, claimed once "
        "across daemons in Redis; daemon on core 0; publisher, redis and PostgreSQL on core 1; "
        f"target {out.get('target', 50_000):,} ticks/s with zero loss):",
        "",
        "| run | ticks/s | loss | lag s | daemon CPU-s/100k ticks | daemon busy | daemon RSS "
        "| redis CPU-s | PostgreSQL CPU-s | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def line(label: str, run: dict[str, Any], note: str) -> str:
        diag = run["diagnostics"]
        return (f"| {label} | {run['published_per_s']:,.0f} | {run['loss']:,} | {run['lag_s']:.2f} "
                f"| {run['cpu_s_per_100k_ticks']:.2f} | {diag['daemon_busy']:.2f} "
                f"| {run['daemon_rss_mb']:.0f} MB | {run['redis_cpu_s']:.1f} "
                f"| {run['postgres_cpu_s']:.1f} | {note} |")

    if "error" in out:
        return lines + [f"| ticks | - | - | - | - | - | - | - | - | {out['error']} |"]
    if "ramp" not in out:
        note = "sustained" if out.get("sustained") else "; ".join(out.get("problems", []))
        return lines + [line(f"{out['rate']:,.0f} ticks/s for {out['duration_s']:g} s, "
                             f"{out['symbols']} symbols", out, note)]
    best, steps = out["best"], out["ramp"]
    if best is not None:
        gaps = (f"; live tail gaps from {out['history_gaps_from_rate']:,} ticks/s"
                if out.get("history_gaps_from_rate") else "")
        lines.append(line(f"ramp: highest zero-loss rate (x1.25 steps of "
                          f"{best['duration_s']:g} s; limited by: {out['limited_by']})",
                          best, "meets the target" if out["meets_target"]
                          else f"below the target{gaps}"))
    failed = steps[-1] if steps and not steps[-1]["ok"] else None
    if failed is not None:
        lines.append(f"| ramp: next step, failed | {failed['published_per_s']:,.0f} "
                     f"| {failed['loss']:,} | {failed['lag_s']:.2f} "
                     f"| {failed['cpu_s_per_100k_ticks']:.2f} | {failed['daemon_busy']:.2f} "
                     f"| - | - | - | {'; '.join(failed['problems'])} |")
    return lines


def history_lines(out: dict[str, Any]) -> list[str]:
    """The /api/patterns table: every query kind, without and with the cache."""
    if "error" in out:
        return [f"- /api/patterns history: {out['error']}"]
    data, unc, cac = out["data"], out["uncached"], out["cached"]
    lines = [
        f"REST history (`bench/history_api.py`: `GET /api/patterns` over "
        f"{data['events']:,} stored events, {data['symbols']} symbols, {data['patterns']} "
        f"patterns; one keep-alive client on core 1, requests one at a time; target p95 "
        f"< {unc['target_p95_ms']:g} ms uncached, < {cac['target_p95_ms']:g} ms cached):",
        "",
        "| query kind | uncached p50 / p95 / p99 ms | uncached req/s | cached p50 / p95 / p99 ms "
        "| cached req/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind in ("all", *unc["kinds"]):
        u = unc["overall"] if kind == "all" else unc["kinds"][kind]
        c = cac["overall"] if kind == "all" else cac["kinds"].get(kind)
        cached = (f"{c['p50_ms']:.2f} / {c['p95_ms']:.2f} / {c['p99_ms']:.2f} "
                  f"| {c['requests_per_s']:,.0f}" if c else "- | -")
        lines.append(f"| {'**all**' if kind == 'all' else kind} | {u['p50_ms']:.2f} / "
                     f"{u['p95_ms']:.2f} / {u['p99_ms']:.2f} | {u['requests_per_s']:,.0f} "
                     f"| {cached} |")
    slow = out.get("explain_slowest_uncached", {})
    lines += [
        "",
        f"- Targets: uncached {'met' if unc['meets_target'] else 'missed'}, cached "
        f"{'met' if cac['meets_target'] else 'missed'} (cache hit ratio "
        f"{cac['cache']['ratio']}); daemon CPU per request {unc['daemon_cpu_ms_per_request']:.2f} "
        f"ms uncached, {cac['daemon_cpu_ms_per_request']:.2f} ms cached",
    ]
    if slow.get("indexes") is not None:
        removed = sum(n.get("rows_removed_by_filter", 0) for n in slow.get("nodes", []))
        lines.append(f"- Slowest uncached kind: {slow['kind']} (`{slow['query']}`): "
                     f"{', '.join(slow['scans'])} on {', '.join(slow['indexes']) or 'no index'}, "
                     f"{removed:,} rows removed by filter, {slow['execution_ms']:.1f} ms in "
                     f"PostgreSQL")
    return lines


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release()}


def row(label: str, out: dict[str, Any] | None, note: str | None = None) -> str:
    if not out or "latency_ms" not in out:
        error = (out or {}).get("error", "did not pass")
        return f"| {label} | - | - | - | - | - | - | {error} |"
    lat = out["latency_ms"]
    if note is None:
        note = "" if out.get("clean") else "not clean: " + str(out.get("problems", "")).strip()
    return (f"| {label} | {out['clients']} | {out['deliveries_per_s']:,.0f} | {out['loss']} "
            f"| {lat['p50']:.1f} | {lat['p99']:.1f} | {out['cpu_s_per_100k_deliveries']:.2f} "
            f"| {out['server_rss_mb']:.0f} MB {note}|")


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"Python {results['machine']['python']}; server on core 0, load generator, "
        f"publisher and redis on core 1. {results['date']}.",
        "",
        "| scenario | clients | deliveries/s | loss | p50 ms | p99 ms | CPU-s/100k | RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in (
        ("fanout", "TickStock: 1000 clients on 1 symbol, 40 ev/s"),
        ("filtered", "TickStock: 100 symbols x 10 clients, 4000 ev/s"),
        ("steady", "TickStock: 1000 clients, 5,000 deliveries/s"),
        ("peer_fanout", "peer: 1000 clients on 1 symbol, 2 ev/s"),
        ("peer_filtered", "peer: 100 symbols x 10 clients, 200 ev/s"),
    ):
        if key in results:
            lines.append(row(label, results[key]))
    for key, label in (("ramp", "TickStock: fan-out"), ("peer_ramp", "peer: fan-out"),
                       ("node_ramp", "Node: fan-out"), ("filtered_ramp", "TickStock: filtered"),
                       ("node_filtered_ramp", "Node: filtered")):
        if key not in results:
            continue
        best, limit, first = (results[key]["best"], results[key]["limited_by"],
                              results[key]["ramp"][0])
        if best is None:
            lines.append(f"| {label} ramp: no rate passed | 1000 | - | {first['loss']} "
                         f"| - | {first['p99_ms']} at {first['deliveries_per_s']:,.0f}/s "
                         f"| - | - |")
        else:
            lines.append(row(f"{label} ramp, highest passing rate "
                             f"(limited by the {limit})", best, ""))
    lines.append("")
    for key, label in (("idle", "TickStock"), ("peer_idle", "peer")):
        out = results.get(key)
        if out and "kb_per_connection" in out:
            auth = "authenticated, " if key == "idle" else ""
            lines.append(f"- {label}, idle: {out['clients']:,} {auth}subscribed "
                         f"connections: {out['kb_per_connection']:.1f} KB each "
                         f"(RSS {out['server_rss_mb_before']:.0f} -> "
                         f"{out['server_rss_mb']:.0f} MB)")
    ramp_t, ramp_p = results.get("ramp", {}).get("best"), results.get("peer_ramp", {}).get("best")
    if ramp_t and ramp_p is None and "peer_ramp" in results:
        first = results["peer_ramp"]["ramp"][0]
        lines.append(f"- Fan-out ramp (zero loss, p99 < 100 ms): TickStock at least "
                     f"{ramp_t['deliveries_per_s']:,.0f} deliveries/s; the peer passed no "
                     f"rate (at {first['deliveries_per_s']:,.0f}/s, the lowest tried, its p99 "
                     f"was {first['p99_ms']:.0f} ms): over "
                     f"{ramp_t['deliveries_per_s'] / first['deliveries_per_s']:.0f}x")
    if ramp_t and ramp_p:
        at_least = "at least " if results["ramp"]["limited_by"] != "server" else ""
        lines.append(f"- Fan-out ramp (zero loss, p99 < 100 ms): TickStock {at_least}"
                     f"{ramp_t['deliveries_per_s']:,.0f} deliveries/s, peer "
                     f"{ramp_p['deliveries_per_s']:,.0f}: {at_least}"
                     f"{ramp_t['deliveries_per_s'] / ramp_p['deliveries_per_s']:.0f}x")
    one, two = results.get("workers1"), results.get("workers2")
    if one and two and "cpu_s_per_100k_deliveries" in one and "cpu_s_per_100k_deliveries" in two:
        ratio = one["cpu_s_per_100k_deliveries"] / two["cpu_s_per_100k_deliveries"]
        lines.append(f"- `--workers 2` vs 1 (1000 clients, 30,000 deliveries/s, unpinned): "
                     f"{two['cpu_s_per_100k_deliveries']:.2f} vs "
                     f"{one['cpu_s_per_100k_deliveries']:.2f} CPU-s/100k, so two cores carry "
                     f"{2 * ratio:.2f}x what one does (projected: this machine has no third "
                     f"core for the load generator); p99 {two['latency_ms']['p99']:.1f} vs "
                     f"{one['latency_ms']['p99']:.1f} ms")
    api = results.get("api")
    if api and "/health" in api:
        lines.append(f"- API (GET /health, /ready, keep-alive): p50 "
                     f"{api['/health']['p50_ms']:.2f} / {api['/ready']['p50_ms']:.2f} ms, "
                     f"p99 {api['/health']['p99_ms']:.2f} / {api['/ready']['p99_ms']:.2f} ms")
    if "sio_fanout" in results or "sio_filtered" in results:
        lines += ["", *endpoint_lines(results)]
    if "peers" in results:
        lines += ["", *peers_lines(results)]
    for key, render in (("ticks", ticks_lines), ("history_api", history_lines)):
        if key in results:
            lines += ["", *render(results[key])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer idle clients")
    parser.add_argument("--only", default="", help="comma-separated scenario keys")
    parser.add_argument("--pairs", type=int, default=None,
                        help="ws/socketio pairs per scenario for sio_* (3; --quick: 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of TickStock, Node and python-socketio for peers "
                             "(3; --quick: 1)")
    parser.add_argument("--render", action="store_true",
                        help="only remake latest.md from latest.json")
    args = parser.parse_args()
    if args.render:
        markdown = table(json.loads((RESULTS / "latest.json").read_text()))
        (RESULTS / "latest.md").write_text(markdown)
        print(markdown)
        return 0
    d = "4" if args.quick else "10"
    idle_clients = "2000" if args.quick else "10000"
    pairs = args.pairs or (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 3)
    missing = peer_missing()
    skip = {} if not missing else {"python-socketio": f"not run: {', '.join(missing)} missing "
                                   f"from {sys.executable} (the \"bench\" extra)"}
    plan = {
        "fanout": lambda: scenario("fan-out", "--clients", "1000", "--rate", "40",
                                   "--duration", d),
        "filtered": lambda: scenario("filtered", "--clients", "1000", "--symbols", "100",
                                     "--rate", "4000", "--duration", d),
        "sio_fanout": lambda: endpoints("fan-out", pairs, "--clients", "1000", "--rate", "40",
                                        "--duration", d),
        "sio_filtered": lambda: endpoints("filtered", pairs, "--clients", "1000",
                                          "--symbols", "100", "--rate", "4000",
                                          "--duration", d),
        "steady": lambda: scenario("steady 5k/s", "--clients", "1000", "--rate", "5",
                                   "--duration", "20" if not args.quick else "6"),
        "idle": lambda: scenario("idle", "--idle", "--clients", idle_clients,
                                 "--duration", "3"),
        "ramp": lambda: ramp("fan-out ramp", 60, "5", "--clients", "1000"),
        "workers1": lambda: scenario("1 worker, unpinned", "--unpinned-server",
                                     "--clients", "1000", "--rate", "30", "--duration", d),
        "workers2": lambda: scenario("2 workers", "--workers", "2",
                                     "--clients", "1000", "--rate", "30", "--duration", d),
        "api": lambda: api_latency(500 if args.quick else 2000),
        # A quick run checks one rate; a full one ramps (about 2 minutes).
        "ticks": lambda: script("ticks", "ingest.py", "--rate", "10000", "--duration", "5")
        if args.quick else script("ticks ramp", "ingest.py", "--ramp", "--start-rate", "10000",
                                  "--duration", "15"),
        "history_api": lambda: script(
            "history api", "history_api.py",
            *(("--events", "300000", "--requests", "60", "--cached-requests", "200")
              if args.quick else ())),
        "peer_fanout": lambda: scenario("peer fan-out", "--server", "peer", "--clients", "1000",
                                        "--rate", "2", "--duration", d),
        "peer_filtered": lambda: scenario("peer filtered", "--server", "peer",
                                          "--clients", "1000", "--symbols", "100",
                                          "--rate", "200", "--duration", d),
        "peer_idle": lambda: scenario("peer idle", "--server", "peer", "--idle",
                                      "--clients", idle_clients, "--duration", "3"),
        "peer_ramp": lambda: ramp("peer fan-out ramp", 0.8, "10", "--server", "peer",
                                  "--clients", "1000"),
        # The highest passing rates beside Node's: fan-out and filtered, both servers.
        "node_ramp": lambda: ramp("node fan-out ramp", 60, "5", "--server", "node",
                                  "--clients", "1000"),
        "filtered_ramp": lambda: ramp("filtered ramp", 3000, "5", "--clients", "1000",
                                      "--symbols", "100"),
        "node_filtered_ramp": lambda: ramp("node filtered ramp", 3000, "5", "--server", "node",
                                           "--clients", "1000", "--symbols", "100"),
        # 20,000 deliveries/s on every server, fanned out or filtered.
        "peers": lambda: {
            "fanout": peers("fan-out", repeats, skip, "--clients", "1000", "--rate", "20",
                            "--duration", d),
            "filtered": peers("filtered", repeats, skip, "--clients", "1000",
                              "--symbols", "100", "--rate", "2000", "--duration", d),
        },
    }
    only = [k for k in args.only.split(",") if k]
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    for key, run in plan.items():
        if not only or key in only:
            results[key] = run()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = table(results)
    (RESULTS / "latest.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
