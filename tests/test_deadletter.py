"""
C{tickstock-deadletter}, the installed command, against the test's own
redis-server: dead letters made by a real daemon are listed, shown, and
replayed after a config fix to a daemon that now accepts them; records of
every other shape are handled without sending anything they cannot vouch for.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from tests.conftest import Daemon
from tests.servers import RedisServer, free_port
from tests.test_end_to_end import pattern, publish, ready
from tests.wsclient import connect, eventually
from tickstock.config import load_settings

COMMAND = os.path.join(os.path.dirname(sys.executable), "tickstock-deadletter")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("TICKSTOCK_")}
KEY = "tickstock:deadletter"
FIX = '[channels."tickstock.events.patterns"]\naliases = { symbol = ["stock"] }\n'


def run(redis: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COMMAND, "--redis", redis.url, *args], capture_output=True,
                          text=True, timeout=60, env=ENV)


async def run_async(redis: RedisServer, *args: str) -> list[str]:
    """The command's output lines, run without blocking the reactor (a daemon runs in it)."""
    out, err, code = await getProcessOutputAndValue(COMMAND, ["--redis", redis.url, *args],
                                                    env=ENV)
    assert (code, err) == (0, b""), (code, err)
    return out.decode().splitlines()


def dead_letters(redis: RedisServer) -> list[dict[str, Any]]:
    reply = redis.command("LRANGE", KEY, "0", "-1")
    return [orjson.loads(line) for line in reply.split(b"\r\n") if line.startswith(b"{")]


def length(redis: RedisServer) -> int:
    return int(redis.command("LLEN", KEY)[1:])


@pytest_twisted.ensureDeferred
async def test_replay_after_a_config_fix_reaches_clients(redis_server, daemons, secret_file,
                                                         tmp_path):
    """
    A daemon refuses four messages; list and show read them; a dry run with
    the defaults accepts none and one with the fixed TOML file accepts the
    one that named its symbol C{stock}; the replay sends that one to the
    daemon restarted with the same file, which delivers it, and removes it
    from the list; the three still refused stay, in order.
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    stock = {"event_type": "pattern_detected", "stock": "aapl", "pattern": "Doji",
             "confidence": 0.9, "timestamp": 1_700_000_000.5}
    publish(redis_server, "tickstock.events.patterns", stock)
    publish(redis_server, "tickstock.events.patterns", b"not json")
    publish(redis_server, "tickstock.events.patterns", pattern(timestamp="yesterday"))
    publish(redis_server, "tickstock.ticks.MSFT", {"symbol": "MSFT", "price": -1, "volume": 1})
    await eventually(lambda: length(redis_server) == 4, 5, "four dead letters")
    records = dead_letters(redis_server)

    lines = await run_async(redis_server, "list")
    assert [line.split()[:4] for line in lines] == [
        ["0", lines[0].split()[1], "tickstock.ticks.MSFT", "bad_field:"],
        ["1", lines[1].split()[1], "tickstock.events.patterns", "bad_timestamp:"],
        ["2", lines[2].split()[1], "tickstock.events.patterns", "not_json:"],
        ["3", lines[3].split()[1], "tickstock.events.patterns", "missing_field:"],
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line.split()[1]) for line in lines)
    assert lines[3].endswith("  " + orjson.dumps(stock).decode()[:60] + "...")
    assert [line.split()[0] for line in await run_async(
        redis_server, "list", "--reason", "missing_field")] == ["3"]
    assert [line.split()[0] for line in await run_async(
        redis_server, "list", "--channel", "tickstock.ticks.*")] == ["0"]
    assert await run_async(redis_server, "list", "--limit", "2") == [
        *lines[:2], "(2 more match; --limit 0 shows all)"]
    assert json.loads("\n".join(await run_async(redis_server, "show", "3"))) == records[3]

    summary = (await run_async(redis_server, "replay", "--dry-run"))[-2:]
    assert summary == ["accepted 0 of 4 (dry run: nothing re-sent or removed)",
                       "still refused 4: bad_field 1, bad_timestamp 1, missing_field 1, not_json 1"]
    config = tmp_path / "tickstock.toml"
    config.write_text(FIX)
    lines = await run_async(redis_server, "--config", str(config), "replay", "--dry-run")
    assert lines[3] == "   3  accepted  tickstock.events.patterns"
    assert lines[-2:] == ["accepted 1 of 4 (dry run: nothing re-sent or removed)",
                          "still refused 3: bad_field 1, bad_timestamp 1, not_json 1"]
    assert dead_letters(redis_server) == records

    await daemon.service.stopService()
    fixed = Daemon(load_settings({"listen": f"tcp:{free_port()}:interface=127.0.0.1",
                                  "redis": redis_server.url, "jwt_secret_file": secret_file},
                                 environ={}, config_file=str(config)))
    try:
        await ready(fixed)
        client = await connect(fixed.port, hello=fixed.hello("alice"))
        await client.request({"op": "subscribe", "id": "s", "topic": "patterns"}, "subscribed")
        lines = await run_async(redis_server, "--config", str(config), "replay")
        assert lines[3] == "   3  re-sent   tickstock.events.patterns"
        assert lines[-2:] == ["accepted 1 of 4: 1 re-sent and removed",
                              "still refused 3: bad_field 1, bad_timestamp 1, not_json 1"]
        await eventually(lambda: len(client.events()) == 1, 5, "the replayed event")
        data = client.events()[0]["data"]
        assert (data["symbol"], data["stock"], data["pattern"]) == ("AAPL", "aapl", "Doji")
        assert dead_letters(redis_server) == records[:3]
        assert fixed.service.router.routed == 1 and not fixed.service.router.malformed
    finally:
        await fixed.service.stopService()


def record(channel: str, raw: str, reason: str = "missing_field: no symbol") -> bytes:
    return orjson.dumps({"channel": channel, "reason": reason, "at": 1_700_000_000.25, "raw": raw})


def test_replay_chosen_entries_to_streams(redis_server):
    """
    Replaying chosen indexes in streams mode adds the one accepted to its
    stream (a C{data} field) and removes it alone; a record that may have
    been cut, one whose bytes were altered when kept, and one that is no
    record are refused and stay, as does every entry not chosen. One whose
    send fails stays too. Output escapes what could drive a terminal.
    """
    padded = '{"symbol":"AAPL","pattern":"Doji","confidence":0.9,"pad":"'
    padded += "x" * (4096 - len(padded) - 2) + '"}'
    tick = '{"ticker":"nvda","price":120.5,"volume":3}'
    entries = [
        record("tickstock.data.ticks", tick),
        record("tickstock.events.patterns", padded),
        b"garbage \x1b[2J",
        record("tickstock.events.patterns",
               '{"symbol":"AAPL","pattern":"Do\ufffdji","confidence":0.9}', "not_json: bad"),
        record("tickstock.data.ticks", '{"symbol":"MSFT","price":1,"volume":1}'),
    ]
    for entry in entries:
        redis_server.command("LPUSH", KEY, entry)

    listing = run(redis_server, "list")
    assert listing.returncode == 0 and "\x1b" not in listing.stdout
    assert "   2  ?  ?  bad_record: not a dead-letter record  garbage \\x1b[2J" in listing.stdout
    show = run(redis_server, "show", "1")
    assert "\\ufffd" in show.stdout
    assert json.loads(show.stdout)["raw"] == orjson.loads(entries[3])["raw"]
    wrong = run(redis_server, "replay", "1", "9")
    assert (wrong.returncode, wrong.stdout) == (2, "")
    assert wrong.stderr == ("tickstock-deadletter: no dead letter 9: tickstock:deadletter "
                            "holds 0-4\n")
    assert length(redis_server) == 5
    redis_server.command("SET", "tickstock.data.ticks", "not a stream")
    failed = run(redis_server, "replay", "--mode", "streams", "4")
    assert failed.returncode == 1, failed.stderr
    lines = failed.stdout.splitlines()
    assert lines[0].startswith("   4  failed    tickstock.data.ticks  WRONGTYPE")
    assert lines[1] == "accepted 1 of 1: 0 re-sent and removed, 1 could not be sent (kept)"
    assert length(redis_server) == 5
    redis_server.command("DEL", "tickstock.data.ticks")

    result = run(redis_server, "replay", "--mode", "streams", "4", "3", "2", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "   1  refused   tickstock.events.patterns  altered: its bytes that were not UTF-8 "
        "were replaced when it was kept",
        "   2  refused   ?  bad_record: not a dead-letter record",
        "   3  refused   tickstock.events.patterns  cut: only the first 4096 bytes were kept",
        "   4  re-sent   tickstock.data.ticks",
        "accepted 1 of 4: 1 re-sent and removed",
        "still refused 3: altered 1, bad_record 1, cut 1",
    ]
    stream = redis_server.command("XRANGE", "tickstock.data.ticks", "-", "+")
    assert stream.count(b"\r\ndata\r\n") == 1 and tick.encode() in stream
    left = redis_server.command("LRANGE", KEY, "0", "-1")
    assert all(entry in left for entry in entries[1:]) and entries[0] not in left
    assert redis_server.command("EXISTS", "tickstock.events.patterns") == b":0\r\n"


def test_errors_are_one_line(redis_server, tmp_path: Path):
    """
    A wrong config file stops it with exit 2 and the problem in one line, as
    the daemon says it; an unreachable Redis with exit 1; an empty list is
    said to be empty.
    """
    assert run(redis_server, "list").stdout == "tickstock:deadletter is empty\n"
    config = tmp_path / "bad.toml"
    config.write_text('[channels."tickstock.events.patterns"]\naliases = "stock"\n')
    bad = run(redis_server, "--config", str(config), "replay")
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == (
        "tickstock-deadletter: error: --config: [channels.'tickstock.events.patterns']: "
        "aliases must map a field to a list of names")
    missing = run(redis_server, "--config", str(tmp_path / "none.toml"), "list")
    assert missing.returncode == 2 and "--config: cannot read" in missing.stderr
    down = subprocess.run([COMMAND, "--redis", f"redis://127.0.0.1:{free_port()}/0", "list"],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert down.returncode == 1 and down.stdout == ""
    assert re.fullmatch(r"tickstock-deadletter: cannot connect to redis://127\.0\.0\.1:\d+/0: "
                        r".*refused.*\n", down.stderr)
