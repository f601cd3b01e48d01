"""
Streams mode keeps each stream's order in the history whatever fails: an
entry whose store failed is read again from the pending list, so nothing
read after it may be stored before it is (issue 22).

The unit tests drive a clock and use fakes, said so where they are: a
command link that records script calls and answers them when told, and a
small in-memory Redis for the stream source (a consumer group's pending
list, XREADGROUP, XAUTOCLAIM and the acknowledging script). The last test
uses a real redis-server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import Clock, deferLater
from zope.interface import implementer

from tests.wsclient import eventually
from tickstock.config import parse_redis_url
from tickstock.connections.redis import RedisLink
from tickstock.domain.events import Event, id_key
from tickstock.domain.interfaces import IHistory
from tickstock.domain.stored import StreamEntry
from tickstock.domain.topics import DEFAULT_REGISTRY
from tickstock.history.redis import RedisHistory
from tickstock.history.redis.scripts import INGEST
from tickstock.ingest.memory import MemoryBus
from tickstock.ingest.normalize import normalize
from tickstock.ingest.router import Overloaded, Router
from tickstock.ingest.streams import GROUP, RedisStreamSource

ADDRESS = parse_redis_url("redis://127.0.0.1:1/0")
STREAM = "tickstock.events.patterns"
INGEST_SHA = hashlib.sha1(INGEST.encode(), usedforsecurity=False).hexdigest()


def raw(n: int) -> bytes:
    return orjson.dumps({"event_type": "pattern_detected", "symbol": "AAPL", "pattern": "Doji",
                         "confidence": 0.9, "timestamp": 1_700_000_000.5, "n": n})


def entry_id(n: int) -> str:
    return f"1700000000000-{n}"


class FakeLink:
    """
    A fake command link (no Redis): records each INGEST call and answers it
    when told, as the script would: a new id for an entry not stored yet,
    the first id again for one stored before (a redelivery).

    @ivar calls: per call, the stream entries it carries, how many events
        (stream entries or not), and its Deferred.
    @ivar stored: entry ids in the order the history first stored them.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int, Deferred[Any]]] = []
        self.stored: list[str] = []
        self._ids: dict[str, str] = {}
        self.refuse: Callable[[int], bool] | None = None
        """If set, each call is answered at once: refused (BUSY) if this
        says so of its number (from 1), else stored."""

    def preload(self, source: str) -> None:
        pass

    def execute(self, *command: Any) -> Deferred[Any]:
        assert command[:2] == ("EVALSHA", INGEST_SHA), command[:2]
        keys = command[3:3 + command[2]]
        events = sum(1 for k in keys if k == "tickstock:history:patterns")
        entries = [a for a in command[3 + command[2]:]
                   if isinstance(a, str) and a.startswith("1700000000000-")]
        d: Deferred[Any] = Deferred()
        self.calls.append((entries, events, d))
        if self.refuse is not None:
            if self.refuse(len(self.calls)):
                d.errback(txredisapi.ResponseError("BUSY Redis is busy running a script"))
            else:
                self.succeed(len(self.calls) - 1)
        return d

    def succeed(self, call: int) -> None:
        entries, events, d = self.calls[call]
        assert events == len(entries), "answers calls of stream entries only"
        out: list[Any] = []
        for entry in entries:
            if entry in self._ids:
                out += [0, self._ids[entry]]
            else:
                self._ids[entry] = f"{2_000_000_000_000 + len(self.stored)}-0"
                self.stored.append(entry)
                out += [1, self._ids[entry]]
        d.callback(out)


def event(n: int) -> Event:
    channel = DEFAULT_REGISTRY.by_redis_name(STREAM)
    assert channel is not None
    return normalize(channel, raw(n), "", 1.0)


def key(n: int) -> StreamEntry:
    return StreamEntry(STREAM, GROUP, entry_id(n))


def test_one_store_call_at_a_time_and_what_waits_behind_a_failed_one_fails():
    """
    250 entries appended at once go out 100 per call, one call at a time:
    when the first is refused (an error reply, after which Redis would run
    the calls behind it), none behind it is sent and all 250 fail, to be
    read again in order. An event that is not a stream entry (pub/sub) is
    not read again: it still goes.
    """
    clock, link = Clock(), FakeLink()
    history = RedisHistory(clock, ADDRESS, link, 10, 60, 10)  # type: ignore[arg-type]
    results = [history.append(event(n), key(n)) for n in range(250)]
    history.append(event(250), "digest:1")
    clock.advance(0)
    clock.advance(1)  # the first call does not answer
    assert [(len(entries), events) for entries, events, _ in link.calls] == [(100, 100)]
    failures: list[Any] = []
    for d in results:
        d.addErrback(failures.append)
    link.calls[0][2].errback(txredisapi.ResponseError("BUSY Redis is busy running a script"))
    clock.advance(0)
    assert len(failures) == 250
    assert [(len(entries), events) for entries, events, _ in link.calls] == [(100, 100), (0, 1)]


def test_a_full_call_goes_at_once_a_partial_one_waits_for_the_window():
    """
    Under load each call waits for the one before it to answer; a full one
    then goes in the same turn, one that is not full at most the window
    after the last call went out.
    """
    clock, link = Clock(), FakeLink()
    history = RedisHistory(clock, ADDRESS, link, 10, 60, 10, store_window=0.002)  # type: ignore[arg-type]
    done = [history.append(event(n), key(n)) for n in range(250)]
    clock.advance(0)
    clock.advance(0.01)
    assert len(link.calls) == 1
    link.succeed(0)
    clock.advance(0)
    assert [len(entries) for entries, _, _ in link.calls] == [100, 100]
    link.succeed(1)
    clock.advance(0.001)
    assert len(link.calls) == 2, "not full: it waits for the window"
    clock.advance(0.009)
    assert [len(entries) for entries, _, _ in link.calls] == [100, 100, 50]
    link.succeed(2)
    assert all(d.called for d in done)
    assert link.stored == [entry_id(n) for n in range(250)]


@implementer(IHistory)
class HoldingHistory:
    """A fake history that stores nothing and never answers: everything stays in flight."""

    def __init__(self) -> None:
        self.appended: list[Any] = []

    def append(self, event: Event, key: object = None) -> Deferred[Any]:
        self.appended.append(key)
        return Deferred()


def test_stream_entries_are_never_shed():
    """
    Past the router's bound on events in flight, pub/sub messages are shed,
    a stream's entries are not: shed, one would be read again after the
    entries behind it were stored.
    """
    history = HoldingHistory()
    router = Router(Clock(), history, MemoryBus(), max_in_flight=2)  # type: ignore[arg-type]
    for n in range(3):
        router.receive(STREAM, raw(n), key(n))
    shed = router.receive(STREAM, raw(3), "digest:3")
    assert history.appended == [key(0), key(1), key(2)]
    failures: list[Any] = []
    shed.addErrback(failures.append)
    assert failures[0].check(Overloaded) and router.shed[STREAM] == 1


class FakeRedis:
    """
    A fake of the stream source's connection (no Redis): one stream, one
    consumer group with its pending list; XREADGROUP (new entries, waiting
    the BLOCK time when there are none, or this consumer's pending ones
    after an id), XAUTOCLAIM (nothing idle) and the acknowledging script.
    """

    def __init__(self, clock: Clock, total: int) -> None:
        self.clock = clock
        self.entries = [(entry_id(n), [b"data", raw(n)]) for n in range(total)]
        self.delivered = 0
        self.pending: list[str] = []

    def execute_command(self, *command: Any, apply_timeout: bool = True) -> Deferred[Any]:
        name = command[0]
        if name == "XGROUP":
            return succeed(b"OK")
        if name == "XAUTOCLAIM":
            return succeed([b"0-0", [], []])
        if name == "EVAL":  # ACK: one stream, the group, how many ids, the ids
            acked = set(command[6:6 + command[5]])
            self.pending = [p for p in self.pending if p not in acked]
            return succeed(1)
        assert name == "XREADGROUP", command
        count, start = command[5], command[-1]
        if start == ">":
            new = self.entries[self.delivered:self.delivered + count]
            self.delivered += len(new)
            self.pending += [e for e, _ in new]
            if not new:
                return deferLater(self.clock, 1.0, lambda: None)  # type: ignore[arg-type]
            return succeed([[STREAM.encode(), new]])
        after = (-1, -1) if start == "0" else id_key(start)
        found = [e for e in self.entries if e[0] in self.pending and id_key(e[0]) > after]
        return succeed([[STREAM.encode(), found[:count]]])


class FakeSource(RedisStreamSource):
    """The stream source on a L{FakeRedis} instead of a txredisapi connection."""

    def __init__(self, clock: Clock, redis: FakeRedis) -> None:
        super().__init__(clock, ADDRESS, "node", streams=(STREAM,))  # type: ignore[arg-type]
        self.fake = redis
        self._redis._make_factory = lambda: SimpleNamespace(
            pool=[redis], stopped=False, startConnecting=lambda endpoint: None,
            disconnect=lambda: succeed(None))


def test_entries_read_after_a_failed_store_are_stored_after_it():
    """
    The source, the router and the history together, on fakes of Redis: a
    batch of 250 entries whose first script call is refused. The entries
    are read again from the pending list and stored; in the history they
    come in the stream's order, none read later before them.
    """
    clock, link = Clock(), FakeLink()
    link.refuse = lambda call: call == 1
    history = RedisHistory(clock, ADDRESS, link, 10, 60, 10)  # type: ignore[arg-type]
    router = Router(clock, history, MemoryBus())  # type: ignore[arg-type]
    redis = FakeRedis(clock, 250)
    source = FakeSource(clock, redis)
    source.listen(router.receive)
    source.startService()
    for _ in range(30):
        clock.advance(0.1)
    assert router.failed == 250 and redis.delivered == 250 and redis.pending == []
    assert link.stored == [entry_id(n) for n in range(250)]


SPIN = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] > start + tonumber(ARGV[1])
return 1
"""
"""A script that keeps Redis busy for ARGV[1] microseconds."""


@pytest_twisted.ensureDeferred
async def test_refused_store_calls_keep_the_order_in_a_real_redis(redis_server):
    """
    Against a real redis-server: while 500 pending entries are stored, a
    slow script on another connection makes Redis refuse calls (BUSY) for
    a while; the entries that failed are appended again, in stream order,
    every 20 ms as a source reads them again, until all are stored. The
    history holds them in the stream's order.
    """
    redis_server.command("CONFIG", "SET", "busy-reply-threshold", "10")
    redis_server.command("XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM")
    for n in range(500):
        redis_server.command("XADD", STREAM, entry_id(n), "data", raw(n))
    redis_server.command("XREADGROUP", "GROUP", GROUP, "node", "COUNT", "500",
                         "STREAMS", STREAM, ">")
    address = parse_redis_url(redis_server.url)
    link, spinner = RedisLink(reactor, address, 10), RedisLink(reactor, address, 10, 0)
    history = RedisHistory(reactor, address, link, 10_000, 3600, 100)
    link.startService()
    spinner.startService()
    try:
        await eventually(lambda: link.connected and spinner.connected, 10, "connected")
        busy = spinner.execute("EVAL", SPIN, 0, 150_000)
        await deferLater(reactor, 0.03, lambda: None)
        left, rounds = list(range(500)), 0
        while left and rounds < 100:
            rounds += 1
            outcomes = await DeferredList([history.append(event(n), key(n)) for n in left],
                                          consumeErrors=True)
            left = [n for n, (ok, _) in zip(left, outcomes, strict=True) if not ok]
            await deferLater(reactor, 0.02, lambda: None)
        await busy
        assert left == [] and rounds > 1
        stored = await link.execute("XRANGE", "tickstock:history:patterns", "-", "+")
        assert [orjson.loads(dict(zip(f[::2], f[1::2], strict=True))["d"])["n"]
                for _, f in stored] == list(range(500))
    finally:
        await spinner.stopService()
        await link.stopService()

