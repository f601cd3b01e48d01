"""
Bounded deduplication (issue 22, item 2): producer event_ids and live-tick
claims are remembered in windows of two Redis sets each (the C{_WINDOWS}
script of L{tickstock.history.redis}), bounded by time and by count, not in
a key per event. The window scripts run on a real redis-server; Redis's own
clock decides when a bucket's time is up, so the one test about time polls
with a deadline and asserts only what no slowness can make false.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import hiredis
import orjson
import pytest
import pytest_twisted
from twisted.internet.task import Clock

from tests.servers import RedisServer, poll
from tests.test_end_to_end import pattern, publish, ready
from tests.wsclient import eventually
from tickstock.config import ConfigError, load_settings
from tickstock.history import DEDUPE_MAX
from tickstock.history.memory import MemoryHistory
from tickstock.history.redis.layout import DEDUPE_KEY, DIGEST_BYTES
from tickstock.history.redis.scripts import CLAIM
from tickstock.ingest.normalize import parse_event

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = "tickstock.events.patterns"
MARKET_STATE = "tickstock.events.market_state"
TICKS = "tickstock.data.ticks"
HOUR_MS = "3600000"


class Redis:
    """A plain connection to the test's Redis: one command, its parsed reply."""

    def __init__(self, server: RedisServer) -> None:
        self._sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self._reader = hiredis.Reader()

    def __call__(self, *parts: str | bytes) -> Any:
        out = [b"*%d\r\n" % len(parts)]
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(out))
        while (reply := self._reader.gets()) is False:
            self._reader.feed(self._sock.recv(1 << 16))
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply

    def ms(self) -> int:
        seconds, micros = self("TIME")
        return int(seconds) * 1000 + int(micros) // 1000

    def buckets(self, window: str) -> list[bytes]:
        return sorted(self("KEYS", f"{DEDUPE_KEY}:{window}:*"))

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def redis(redis_server: RedisServer) -> Any:
    client = Redis(redis_server)
    yield client
    client.close()


def claim_script(cap: int) -> str:
    """The live-tick claim script with a window that takes C{cap} members per bucket."""
    default = f"local DEDUPE, CAP = '{DEDUPE_KEY}', {DEDUPE_MAX}\n"
    assert CLAIM.count(default) == 1
    return CLAIM.replace(default, f"local DEDUPE, CAP = '{DEDUPE_KEY}', {cap}\n")


def test_a_window_remembers_a_member_while_fewer_than_cap_came_after_it(redis):
    """
    With room for 4 members per bucket (and all the time in the world), the
    last 4 members are always remembered, the window never holds more than
    two buckets of 4, and one that 29 others followed is forgotten. A key
    twice in one call is claimed once.
    """
    script = claim_script(4)

    def claim(*members: bytes) -> list[int]:
        return list(redis("EVAL", script, "0", HOUR_MS, *members))

    assert claim(b"x", b"x") == [1, 0]
    names = [b"m%d" % i for i in range(30)]
    for i, name in enumerate(names):
        assert claim(name) == [1]
        recent = names[max(0, i - 3):i + 1]
        assert claim(*recent) == [0] * len(recent), f"after m{i}"
        buckets = redis.buckets("tick")
        assert 1 <= len(buckets) <= 2
        assert sum(redis("SCARD", key) for key in buckets) <= 2 * 4
    assert claim(names[0]) == [1]


def test_a_window_remembers_for_its_span_at_least_and_its_buckets_expire(redis):
    """
    A claim is remembered until the window's span (200 ms by Redis's clock)
    has passed, however often it is asked again; its bucket expires by
    itself within twice the span, so a quiet window holds nothing.
    """
    span = 200

    def claim() -> list[int]:
        return list(redis("EVAL", CLAIM, "0", str(span), b"a"))

    began = redis.ms()
    assert claim() == [1]
    ttls = [redis("PTTL", key) for key in redis.buckets("tick")]
    assert ttls and all(0 < ttl <= 2 * span for ttl in ttls), ttls
    poll(lambda: claim() == [1], 10, "the window to forget the claim")
    assert redis.ms() - began >= span
    poll(lambda: not redis.buckets("tick"), 10, "the window's buckets to expire")


def test_memory_history_remembers_the_last_event_ids_of_each_channel(monkeypatch):
    """
    The embedded history keeps the same promise: an event_id is a duplicate
    while fewer than DEDUPE_MAX (3 here) others came after it on its
    channel, within the window; the same event_id on another channel is
    another event.
    """
    monkeypatch.setattr("tickstock.history.memory.DEDUPE_MAX", 3)
    clock = Clock()
    history = MemoryHistory(clock, 100, 3600, 10, dedupe_window=60)

    def send(event_id: str, channel: str = PATTERNS) -> str | None:
        data = pattern(event_id=event_id) if channel == PATTERNS else {
            "event_type": "stage_change", "symbol": "MSFT", "timestamp": 1, "event_id": event_id}
        return history.append(parse_event(channel, orjson.dumps(data), "", 0.0)).result

    for event_id in ("a", "b", "c"):
        assert send(event_id) is not None
    assert send("a") is None
    assert send("a", MARKET_STATE) is not None
    assert send("d") is not None
    assert send("b") is None and send("c") is None
    assert send("a") is not None, "three others came after it"
    clock.advance(59.9)
    assert send("a") is None
    clock.advance(0.1)
    assert send("a") is not None, "the window has passed"


def test_the_dedupe_window_is_checked():
    with pytest.raises(ConfigError, match="--dedupe-window"):
        load_settings({"dedupe_window": "0"}, environ={})
    assert load_settings({"dedupe_window": "30"}, environ={}).dedupe_window == 30.0


@pytest_twisted.ensureDeferred
async def test_event_ids_and_tick_claims_leave_no_key_per_event(redis_server, redis, daemons):
    """
    Through a daemon in pub/sub mode: a retry is delivered once, the same
    event_id on another channel is another event, every tick is counted
    once; Redis then holds no key per event, only one window per channel
    (and one for ticks, one for the pub/sub messages stored) whose members
    are 12-byte digests, and a bucket lives no longer than twice
    --dedupe-window.
    """
    daemon = daemons(redis=redis_server.url, dedupe_window=30)
    await ready(daemon)
    router = daemon.service.router
    for n in range(20):
        publish(redis_server, PATTERNS, pattern(seq=n, event_id=f"p-{n}"))
    publish(redis_server, PATTERNS, pattern(seq=3, event_id="p-3", attempt=2))
    publish(redis_server, MARKET_STATE, {"event_type": "stage_change", "symbol": "MSFT",
                                         "timestamp": 1_700_000_000, "metric": "stage",
                                         "event_id": "p-3"})
    for n in range(50):
        publish(redis_server, TICKS, {"symbol": "NVDA", "price": 100 + n, "volume": 1,
                                      "timestamp": 1_700_000_000 + n})
    await eventually(lambda: router.routed == 20 + 1 + 50, 10, "every event routed")
    assert router.duplicates == 1

    for old in ("tickstock:eid:*", "tickstock:tick:*", "tickstock:seen:*"):
        assert redis("KEYS", old) == []
    windows = {name.decode() for name in redis("HKEYS", DEDUPE_KEY)}
    assert windows == {f"eid:{PATTERNS}", f"eid:{MARKET_STATE}", "tick", "seen"}
    for window, members in ((f"eid:{PATTERNS}", 20), (f"eid:{MARKET_STATE}", 1), ("tick", 50),
                            ("seen", 22)):
        [bucket] = redis.buckets(window)
        assert redis("SCARD", bucket) == members
        assert {len(member) for member in redis("SMEMBERS", bucket)} == {DIGEST_BYTES}
    ttl = redis("PTTL", redis.buckets(f"eid:{PATTERNS}")[0])
    assert 30_000 < ttl <= 60_000


def test_the_memory_bench_shows_a_bounded_window(tmp_path):
    """
    A short run of bench/redis_memory.py (1 s dedupe window, 4 s of
    publishing): every retry is caught and every message handled, no key is
    left per event, and the event_id window remembers at most what two
    windows' worth of events hold, not everything published.
    """
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "redis_memory.py"), "--duration", "4",
         "--rate", "500", "--tick-rate", "500", "--retry-every", "10", "--retry-delay", "0.2",
         "--dedupe-window", "1", "--sample-every", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["published"]["retries"] == 200
    assert not any(out["checks"].values()), out["checks"]
    kinds = out["by_kind"]
    assert "event_id keys" not in kinds and "tick claim keys" not in kinds
    windows = kinds["dedupe windows"]["windows"]
    assert windows[f"eid:{PATTERNS}"]["sets"] <= 2
    assert windows[f"eid:{PATTERNS}"]["members"] <= 2 * 500 + 100 < out["published"]["patterns"]
    assert windows["tick"]["members"] == out["published"]["ticks"]
