"""
Resume (docs/contract.md §3): a reconnecting client says C{hello} with
C{resume.last_id}, re-sends its subscriptions and gets every matching event
it missed, in order, once, then live events with no gap and no duplicate;
or C{recovered:false} with what was lost when the history no longer reaches
back that far. Also the per-user offline queue of backtest events, and
producer duplicates across daemons.

End-to-end tests run the daemon's real service tree in the test reactor on a
real redis-server with append-only persistence, with real WebSockets. They
poll with deadlines and never assert on timing. The last tests are unit
tests of the embedded history and of pub/sub message naming, on a Clock.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tests.servers import RedisServer
from tests.test_end_to_end import pattern, ready
from tests.test_jobs import job_listener  # noqa: F401 - fixture
from tests.wsclient import RecordingClient, connect, eventually
from tickstock.domain.events import id_key
from tickstock.history import BOOKMARK_EVERY
from tickstock.history.memory import MemoryHistory
from tickstock.ingest.normalize import parse_event
from tickstock.ingest.pubsub import Occurrences

PATTERNS = "tickstock.events.patterns"
TICKS = "tickstock.data.ticks"
PROGRESS = "tickstock.events.backtesting.progress"
RESULTS = "tickstock.events.backtesting.results"
HISTORY = "tickstock:history:"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """This module's Redis keeps an append-only file, as a deployment would."""
    server = RedisServer(appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Producer:
    """
    Publishes like the producer, over one persistent Redis connection, many
    messages per round trip (PUBLISH replies come back in order).
    """

    def __init__(self, redis: RedisServer) -> None:
        self._sock = socket.create_connection(("127.0.0.1", redis.port), timeout=10)

    def publish(self, messages: list[tuple[str, dict[str, Any] | bytes]]) -> list[int]:
        """Publish each C{(channel, payload)}; the subscriber count of each."""
        out = []
        for channel, payload in messages:
            data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            out.append(_resp(b"PUBLISH", channel.encode(), data))
        self._sock.sendall(b"".join(out))
        buffer = b""
        while buffer.count(b"\r\n") < len(messages):
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buffer += chunk
        replies = buffer.split(b"\r\n")[: len(messages)]
        assert all(r.startswith(b":") for r in replies), replies
        return [int(r[1:]) for r in replies]

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def producer(redis_server: RedisServer) -> Iterator[Producer]:
    p = Producer(redis_server)
    try:
        yield p
    finally:
        p.close()


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def redis_int(redis: RedisServer, *command: str) -> int:
    reply = redis.command(*command)
    assert reply.startswith(b":"), reply
    return int(reply[1:].strip())


def redis_str(redis: RedisServer, *command: str) -> str | None:
    reply = redis.command(*command)
    if reply.startswith(b"$-1"):
        return None
    assert reply.startswith(b"$"), reply
    return reply.split(b"\r\n")[1].decode()


def ordered(ids: list[str]) -> bool:
    """Strictly increasing: in order and no duplicate."""
    keys = [id_key(i) for i in ids]
    return all(a < b for a, b in pairwise(keys))


def seqs(client: RecordingClient, sub: str) -> list[Any]:
    return [e["data"]["seq"] for e in client.events(sub)]


def held_subscriptions(daemon: Any) -> list[Any]:
    """The daemon's subscriptions still replaying (holding live events back)."""
    return [sub for state in daemon.service.gateway.connections.values()
            for sub in state.subscriptions.values() if sub.held is not None]


def users_connected(daemon: Any) -> set[str | None]:
    return {conn.user for conn in daemon.service.gateway.connections}


async def close(client: RecordingClient) -> None:
    client.sendClose(1000)
    await client.closed


async def routed(daemons: list[Any], n: int, what: str, timeout: float = 20) -> None:
    """Wait until the daemons together stored C{n} events (each once)."""
    await eventually(lambda: sum(d.service.router.routed for d in daemons) == n, timeout, what)


class LaggingTail:
    """
    Stands in for a daemon's live tail falling behind its command link (it
    delivers at most 64 events per reactor turn, and reads on a connection
    of its own): live events are held back until L{catch_up}.
    """

    def __init__(self, broadcaster: Any) -> None:
        self._deliver = broadcaster.deliver
        self.behind: list[Any] | None = []

    def __call__(self, event: Any) -> int:
        if self.behind is None:
            return self._deliver(event)
        self.behind.append(event)
        return 0

    def catch_up(self) -> None:
        behind, self.behind = self.behind or [], None
        for event in behind:
            self._deliver(event)


async def watching(daemon: Any) -> RecordingClient:
    """
    A client on every pattern event: once it has seen an event, the
    daemon's live tail has passed it. Tests that are not about the tail
    lagging wait for it (see test_replay_then_lagging_live_tail_...).
    """
    watch = await connect(daemon.port, hello=daemon.hello("watcher"))
    await watch.request({"op": "subscribe", "id": "w", "topic": "patterns"}, "subscribed")
    return watch


class GatedReplay:
    """
    Wraps a history's C{replay} so a test decides when the replay is read
    from Redis (C{before}) and when its answer reaches the gateway
    (C{after}): live events can then be published exactly while a
    subscription's replay is in flight, on either side of the read.
    """

    def __init__(self, history: Any) -> None:
        self._real = history.replay
        self.started: Deferred[None] = Deferred()
        self.fetched: Deferred[None] = Deferred()
        self.before: Deferred[None] = Deferred()
        self.after: Deferred[None] = Deferred()

    def __call__(self, topic: str, after: str | None, user: str | None) -> Deferred[Any]:
        self.started.callback(None)
        d = self.before
        d.addCallback(lambda _: self._real(topic, after, user))

        def got(replay: Any) -> Deferred[Any]:
            self.fetched.callback(None)
            return self.after.addCallback(lambda _: replay)

        return d.addCallback(got)


@pytest_twisted.ensureDeferred
async def test_resume_after_500_missed_events(redis_server, daemons, producer, monkeypatch):
    """
    A client on AAPL patterns keeps the id of the last event it saw and
    goes away; 500 pattern events (AAPL and MSFT interleaved) and 50 ticks
    are published. It comes back with resume.last_id and the same
    subscription: recovered:true, exactly the 250 missed AAPL events in
    order, then, with no gap and no duplicate, the live events published
    while its replay was in flight (both before the history was read, so
    they are in the replay and also held live, and after it was read, so
    they are only held), then later live events.
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    sub = {"op": "subscribe", "id": "s1", "topic": "patterns", "filter": {"symbols": ["AAPL"]}}

    first = await connect(daemon.port, hello=daemon.hello("alice"))
    assert (await first.request(sub, "subscribed")) == {"op": "subscribed", "id": "s1"}
    producer.publish([(PATTERNS, pattern(s, seq=-3 + i))
                      for i, s in enumerate(["AAPL", "MSFT", "AAPL"])])
    await eventually(lambda: len(first.events("s1")) == 2, 10, "the first AAPL events")
    last_id = first.events("s1")[-1]["id"]
    await close(first)

    missed: list[tuple[str, dict[str, Any]]] = []
    for n in range(500):
        missed.append((PATTERNS, pattern("AAPL" if n % 2 == 0 else "MSFT", seq=n)))
        if n % 10 == 0:
            missed.append((TICKS, {"symbol": "AAPL", "price": 100 + n, "volume": n,
                                   "timestamp": 1_700_000_000.0}))
    producer.publish(missed)
    await routed([daemon], 3 + 550, "the missed events stored")

    gate = GatedReplay(daemon.service.history)
    monkeypatch.setattr(daemon.service.history, "replay", gate)
    second = await connect(daemon.port,
                           hello={**daemon.hello("alice"), "resume": {"last_id": last_id}})
    start = len(second.messages)
    second.send(sub)
    await gate.started
    # Live while the replay is in flight, before the history is read.
    producer.publish([(PATTERNS, pattern(s, seq=1000 + n))
                      for n in range(5) for s in ("AAPL", "MSFT")])
    await eventually(lambda: sum(len(s.held) for s in held_subscriptions(daemon)) == 5, 10,
                     "five AAPL events held")
    gate.before.callback(None)
    await gate.fetched
    # Live while the replay is in flight, after the history was read.
    producer.publish([(PATTERNS, pattern(s, seq=2000 + n))
                      for n in range(5) for s in ("MSFT", "AAPL")])
    await eventually(lambda: sum(len(s.held) for s in held_subscriptions(daemon)) == 10, 10,
                     "ten AAPL events held")
    gate.after.callback(None)

    expected = [*range(0, 500, 2), *range(1000, 1005), *range(2000, 2005)]
    await eventually(lambda: len(second.events("s1")) >= len(expected), 20, "the replay")
    reply = next(m for m in second.messages[start:] if m.get("op") == "subscribed")
    assert reply == {"op": "subscribed", "id": "s1", "recovered": True, "replayed": len(expected)}

    # Later live events follow on; a marker shows nothing else came.
    producer.publish([(PATTERNS, pattern(s, seq=3000 + n))
                      for n in range(5) for s in ("AAPL", "MSFT")])
    producer.publish([(PATTERNS, pattern("AAPL", seq=9999))])
    await eventually(lambda: seqs(second, "s1")[-1:] == [9999], 10, "the marker")
    assert seqs(second, "s1") == [*expected, *range(3000, 3005), 9999]
    ids = [e["id"] for e in second.events("s1")]
    assert ordered([last_id, *ids])
    assert all(e["data"]["symbol"] == "AAPL" and e["type"] == "pattern_detected"
               for e in second.events("s1"))
    assert second.of("error") == []


@pytest_twisted.ensureDeferred
async def test_resume_on_another_daemon(redis_server, daemons, producer):
    """
    Two daemons share one Redis history: a client that saw events on daemon
    A resumes on daemon B with A's last id and gets exactly what it missed,
    in order, then live events, each once (every daemon receives every
    pub/sub message; the history stores each once, under one id).
    """
    a = daemons(redis=redis_server.url)
    b = daemons(redis=redis_server.url)
    await ready(a)
    await ready(b)
    watch = await watching(b)
    sub = {"op": "subscribe", "id": "p", "topic": "patterns"}

    on_a = await connect(a.port, hello=a.hello("alice"))
    await on_a.request(sub, "subscribed")
    producer.publish([(PATTERNS, pattern("AAPL", seq=n)) for n in range(10)])
    await eventually(lambda: len(on_a.events("p")) == 10, 10, "events on A")
    last_id = on_a.events("p")[-1]["id"]
    await close(on_a)

    symbols = ["AAPL", "MSFT", "NVDA"]
    producer.publish([(PATTERNS, pattern(symbols[n % 3], seq=n)) for n in range(10, 210)])
    await routed([a, b], 210, "the missed events stored once")
    await eventually(lambda: len(watch.events("w")) == 210, 10, "B's live tail at the end")

    on_b = await connect(b.port, hello={**b.hello("alice"), "resume": {"last_id": last_id}})
    reply = await on_b.request(sub, "subscribed")
    assert reply == {"op": "subscribed", "id": "p", "recovered": True, "replayed": 200}
    producer.publish([(PATTERNS, pattern("NVDA", seq=n)) for n in range(210, 230)])
    await eventually(lambda: len(on_b.events("p")) >= 220, 20, "missed and live on B")
    await routed([a, b], 230, "all stored once")
    producer.publish([(PATTERNS, pattern("AAPL", seq=9999))])
    await eventually(lambda: seqs(on_b, "p")[-1:] == [9999], 10, "the marker")
    assert seqs(on_b, "p") == [*range(10, 230), 9999]
    assert ordered([last_id, *(e["id"] for e in on_b.events("p"))])
    assert [e["id"] for e in on_b.events("p")] == [e["id"] for e in watch.events("w")[10:]]
    assert redis_int(redis_server, "XLEN", HISTORY + "patterns") == 231



@pytest_twisted.ensureDeferred
async def test_live_ticks_are_counted_once_across_daemons_and_resume_with_the_newest(
        redis_server, daemons, producer):
    """
    Pub/sub ticks skip the history: both daemons deliver every tick they
    receive to their own clients, and exactly one of them counts each in
    the bars (the same bytes published twice are two ticks). Tick ids are
    distinct from each other and from the stored events', and a client
    resuming after the last id it saw gets the stored events it missed and
    the newest tick of each symbol that changed since, nothing older.
    """
    a = daemons(redis=redis_server.url, tick_rate=1000)
    b = daemons(redis=redis_server.url, tick_rate=1000)
    await ready(a)
    await ready(b)
    subs = [{"op": "subscribe", "id": "t", "topic": "ticks"},
            {"op": "subscribe", "id": "p", "topic": "patterns"}]
    clients = []
    for daemon in (a, b):
        client = await connect(daemon.port, hello=daemon.hello("alice"))
        for sub in subs:
            await client.request(sub, "subscribed")
        clients.append(client)

    def tick(symbol: str, n: int) -> tuple[str, dict[str, Any]]:
        return TICKS, {"symbol": symbol, "price": 100 + n, "volume": 1,
                       "timestamp": 1_700_000_000.0 + n, "n": n}

    messages = []
    for n in range(100):
        messages.append(tick("NVDA" if n % 2 else "AAPL", n))
        if n % 10 == 0:
            messages.append((PATTERNS, pattern("AAPL", seq=n)))
    messages += [tick("MSFT", 0), tick("MSFT", 0)]
    producer.publish(messages)
    # Each daemon receives every message; the one that did not count it says so when its
    # own claim or store call answers, which may be after the other counted them all.
    await eventually(lambda: sum(d.service.router.routed for d in (a, b)) == 112
                     and sum(d.service.router.duplicates for d in (a, b)) == 112, 20,
                     "each event stored or counted once, and seen twice")
    assert sum(d.service.router.routed for d in (a, b)) == 112
    assert sum(d.service.persister.ticks for d in (a, b)) == 102
    assert redis_int(redis_server, "XLEN", HISTORY + "ticks") == 0

    def newest(client: RecordingClient) -> dict[str, int]:
        return {e["data"]["symbol"]: e["data"]["n"] for e in client.events("t")}

    for client in clients:
        await eventually(lambda client=client: newest(client) == {"AAPL": 98, "NVDA": 99, "MSFT": 0}
                         and len(client.events("p")) == 10, 10, "the newest ticks and patterns")
        ids = [id_key(e["id"]) for e in client.events()]
        assert len(set(ids)) == len(ids)
        for symbol in ("AAPL", "NVDA", "MSFT"):  # the throttle may let one symbol pass another
            assert ordered([e["id"] for e in client.events("t") if e["data"]["symbol"] == symbol])
        assert ordered([e["id"] for e in client.events("p")])

    first = clients[0]
    last_id = max((e["id"] for e in first.events()), key=id_key)
    await close(first)
    producer.publish([tick("AAPL", 200), (PATTERNS, pattern("AAPL", seq=200))])
    await eventually(lambda: sum(d.service.router.routed for d in (a, b)) == 114, 20, "stored")
    again = await connect(a.port, hello={**a.hello("alice"), "resume": {"last_id": last_id}})
    replies = [await again.request(sub, "subscribed") for sub in subs]
    assert replies == [{"op": "subscribed", "id": "t", "recovered": True, "replayed": 1},
                       {"op": "subscribed", "id": "p", "recovered": True, "replayed": 1}]
    await eventually(lambda: len(again.events()) == 2, 10, "the replay")
    assert [e["data"]["n"] for e in again.events("t")] == [200]
    assert seqs(again, "p") == [200]
    assert all(id_key(e["id"]) > id_key(last_id) for e in again.events())


@pytest_twisted.ensureDeferred
async def test_each_daemon_decodes_only_the_events_another_daemon_stored(
        redis_server, daemons, producer, monkeypatch):
    """
    A daemon's live tail hands on the event objects it stored itself rather
    than decoding their stream entries again; what another daemon stored is
    decoded. Two daemons on one Redis both receive every pub/sub message and
    each event is stored by one of them, so of 60 events delivered on both,
    60 entries are decoded in all (a tail read is taken once the store calls
    sent before it answered, whichever reply Redis wrote first), and both
    deliver the same ids and data.
    """
    import tickstock.history.redis.tailer as redis_history

    decoded = []
    decode = redis_history._entry_event
    monkeypatch.setattr(redis_history, "_entry_event",
                        lambda entry, topic: decoded.append(entry) or decode(entry, topic))
    a = daemons(redis=redis_server.url)
    b = daemons(redis=redis_server.url)
    await ready(a)
    await ready(b)
    on_a, on_b = await watching(a), await watching(b)
    producer.publish([(PATTERNS, pattern("AAPL", seq=n)) for n in range(60)])
    await routed([a, b], 60, "60 events stored once")
    await eventually(lambda: len(on_a.events("w")) == len(on_b.events("w")) == 60, 10,
                     "every event delivered on both")
    assert len(decoded) == 60
    assert on_a.events("w") == on_b.events("w")
    assert [e["data"]["seq"] for e in on_a.events("w")] == list(range(60))
    assert a.service.history._stored == b.service.history._stored == {}


@pytest_twisted.ensureDeferred
async def test_the_events_a_daemon_keeps_for_its_tail_are_bounded(
        redis_server, daemons, producer, monkeypatch):
    """
    Past STORED_KEPT (here 3) the oldest kept event goes and its entry is
    decoded instead: the store never holds more than the bound, exactly the
    events it let go are decoded, and every event is delivered once, in
    order.
    """
    from collections import OrderedDict

    import tickstock.history.redis.tailer as redis_history

    class Watched(OrderedDict):
        most = evicted = 0

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            Watched.most = max(Watched.most, len(self))

        def popitem(self, last=True):
            Watched.evicted += 1
            return super().popitem(last)

    decoded = []
    decode = redis_history._entry_event
    monkeypatch.setattr(redis_history, "_entry_event",
                        lambda entry, topic: decoded.append(entry) or decode(entry, topic))
    monkeypatch.setattr(redis_history, "STORED_KEPT", 3)
    a = daemons(redis=redis_server.url)
    await ready(a)
    a.service.history._stored = Watched()
    on_a = await watching(a)
    producer.publish([(PATTERNS, pattern("AAPL", seq=n)) for n in range(60)])
    await eventually(lambda: len(on_a.events("w")) == 60, 10, "every event delivered")
    assert [e["data"]["seq"] for e in on_a.events("w")] == list(range(60))
    assert Watched.most <= 3 and len(decoded) == Watched.evicted
    assert a.service.history._stored == {}


@pytest_twisted.ensureDeferred
async def test_replay_then_lagging_live_tail_deliver_each_event_once(
        redis_server, daemons, producer, monkeypatch):
    """
    Events stored in Redis before a resuming subscription reads the
    history, which the daemon's live tail has not delivered yet (it reads
    on its own connection and delivers 64 events per reactor turn; with two
    daemons, the other one may have stored them), are sent once: by the
    replay, not again when the tail catches up.
    """
    daemon = daemons(redis=redis_server.url)
    await ready(daemon)
    sub = {"op": "subscribe", "id": "p", "topic": "patterns"}
    first = await connect(daemon.port, hello=daemon.hello("alice"))
    await first.request(sub, "subscribed")
    producer.publish([(PATTERNS, pattern(seq=-1))])
    await eventually(lambda: first.events("p"), 10, "a first event")
    last_id = first.events("p")[-1]["id"]
    await close(first)

    tail = LaggingTail(daemon.service.broadcaster)
    monkeypatch.setattr(daemon.service.broadcaster, "deliver", tail)
    producer.publish([(PATTERNS, pattern(seq=n)) for n in range(20)])
    await routed([daemon], 21, "stored")
    await eventually(lambda: len(tail.behind or ()) == 20, 10, "read by the tail, not delivered")
    second = await connect(daemon.port,
                           hello={**daemon.hello("alice"), "resume": {"last_id": last_id}})
    reply = await second.request(sub, "subscribed")
    assert reply == {"op": "subscribed", "id": "p", "recovered": True, "replayed": 20}
    await eventually(lambda: len(second.events("p")) >= 20, 10, "the replay")
    tail.catch_up()
    producer.publish([(PATTERNS, pattern(seq=9999))])
    await eventually(lambda: seqs(second, "p")[-1:] == [9999], 10, "the marker")
    assert seqs(second, "p") == [*range(20), 9999]



@pytest_twisted.ensureDeferred
async def test_gap_is_reported_when_history_was_trimmed(redis_server, daemons, producer):
    """
    With history_max=100, a client that missed 1000 events is told
    recovered:false with missed.from its last id, missed.to the newest
    dropped id, and missed.count at least the number of events dropped
    after its id and at most 100 more (Redis trims in nodes of 100); the
    kept tail is still replayed, in order, then live events follow.
    """
    daemon = daemons(redis=redis_server.url, history_max=100)
    await ready(daemon)
    watch = await watching(daemon)
    sub = {"op": "subscribe", "id": "p", "topic": "patterns"}
    first = await connect(daemon.port, hello=daemon.hello("alice"))
    await first.request(sub, "subscribed")
    producer.publish([(PATTERNS, pattern(seq=-5 + n)) for n in range(5)])
    await eventually(lambda: len(first.events("p")) == 5, 10, "first events")
    last_id = first.events("p")[-1]["id"]
    await close(first)

    # In batches the live tail keeps up with: it must not fall further
    # behind than the history keeps (see the report on live-tail loss).
    for start in range(0, 1000, 50):
        producer.publish([(PATTERNS, pattern(["AAPL", "MSFT"][n % 2], seq=n))
                          for n in range(start, start + 50)])
        await eventually(lambda n=5 + start + 50: len(watch.events("w")) == n, 5, "the live tail")
    await routed([daemon], 1005, "all stored")
    kept = redis_int(redis_server, "XLEN", HISTORY + "patterns")
    assert 100 <= kept < 1000
    dropped_after = 1000 - kept  # every kept event is newer than last_id

    second = await connect(daemon.port,
                           hello={**daemon.hello("alice"), "resume": {"last_id": last_id}})
    reply = await second.request(sub, "subscribed")
    assert reply["recovered"] is False, reply
    gap = reply["missed"]
    assert gap["from"] == last_id
    assert isinstance(gap["to"], str) and id_key(last_id) < id_key(gap["to"])
    assert dropped_after <= gap["count"] <= dropped_after + BOOKMARK_EVERY
    await eventually(lambda: len(second.events("p")) >= kept, 10, "the kept tail")
    producer.publish([(PATTERNS, pattern(seq=9999))])
    await eventually(lambda: seqs(second, "p")[-1:] == [9999], 10, "a live event")
    assert seqs(second, "p") == [*range(1000 - kept, 1000), 9999]
    ids = [e["id"] for e in second.events("p")]
    assert ordered([gap["to"], *ids])



@pytest_twisted.ensureDeferred
async def test_every_kept_event_is_replayed_when_history_max_is_small(
        redis_server, daemons, producer):
    """
    With history_max=10 the history may keep more than 10 events (Redis
    trims whole nodes): whatever it kept after the resume point is
    replayed, in order; if it kept less than was missed, the reply says so.
    """
    daemon = daemons(redis=redis_server.url, history_max=10)
    await ready(daemon)
    watch = await watching(daemon)
    sub = {"op": "subscribe", "id": "p", "topic": "patterns"}
    first = await connect(daemon.port, hello=daemon.hello("alice"))
    await first.request(sub, "subscribed")
    producer.publish([(PATTERNS, pattern(seq=-1))])
    await eventually(lambda: first.events("p"), 10, "a first event")
    last_id = first.events("p")[-1]["id"]
    await close(first)

    producer.publish([(PATTERNS, pattern(seq=n)) for n in range(60)])
    await routed([daemon], 61, "stored", timeout=5)
    await eventually(lambda: len(watch.events("w")) == 61, 10, "the live tail at the end")
    kept = redis_int(redis_server, "XLEN", HISTORY + "patterns")
    second = await connect(daemon.port,
                           hello={**daemon.hello("alice"), "resume": {"last_id": last_id}})
    reply = await second.request(sub, "subscribed")
    producer.publish([(PATTERNS, pattern(seq=9999))])
    await eventually(lambda: seqs(second, "p")[-1:] == [9999], 10, "the marker")
    if reply["recovered"]:
        assert seqs(second, "p") == [*range(60), 9999]
    else:
        assert seqs(second, "p") == [*range(max(0, 60 - kept), 60), 9999]


@pytest_twisted.ensureDeferred
async def test_replay_longer_than_the_client_queue_is_delivered(redis_server, daemons, producer):
    """
    A client that reads normally and missed more events than
    client_queue_limit gets all of them on resume, in order, paced by
    its socket, and is not closed as a slow consumer: the queue bound is
    for live events a client cannot keep up with, and the replay is
    bounded by the history.
    """
    daemon = daemons(redis=redis_server.url, client_queue_limit=50)
    await ready(daemon)
    watch = await watching(daemon)
    sub = {"op": "subscribe", "id": "p", "topic": "patterns"}
    first = await connect(daemon.port, hello=daemon.hello("alice"))
    await first.request(sub, "subscribed")
    producer.publish([(PATTERNS, pattern(seq=-1))])
    await eventually(lambda: first.events("p"), 10, "a first event")
    last_id = first.events("p")[-1]["id"]
    await close(first)

    filler = "x" * 1000  # about 1 MB in all: far more than a socket buffer
    for start in range(0, 1000, 100):
        producer.publish([(PATTERNS, pattern(seq=n, pad=filler))
                          for n in range(start, start + 100)])
        await eventually(lambda n=1 + start + 100: len(watch.events("w")) == n, 10, "the tail")
    second = await connect(daemon.port,
                           hello={**daemon.hello("alice"), "resume": {"last_id": last_id}})
    reply = await second.request(sub, "subscribed")
    assert reply == {"op": "subscribed", "id": "p", "recovered": True, "replayed": 1000}
    await eventually(lambda: len(second.events("p")) >= 1000 or second.close_code is not None,
                     20, "the replay")
    producer.publish([(PATTERNS, pattern(seq=9999))])
    await eventually(lambda: seqs(second, "p")[-1:] == [9999] or second.close_code is not None,
                     10, "a live event")
    assert second.close_code is None
    assert seqs(second, "p") == [*range(1000), 9999]
    assert daemon.service.gateway.slow_consumers_closed == 0


@pytest_twisted.ensureDeferred
async def test_live_clients_are_told_when_the_tail_fell_behind_trimming(
        redis_server, daemons, producer, monkeypatch):
    """
    While a daemon's live tail cannot read (its own Redis connection is
    down) the other daemons' events, or its own, keep being stored and the
    history trims the oldest. When the tail reads again, its connected
    clients must not silently skip what was trimmed: they either get every
    event or are closed with 4001 (resume), and resuming then reports the
    gap.
    """
    from tickstock.connections.redis import NotConnected
    from tickstock.deliver.gateway import CLOSE_SLOW_CONSUMER

    daemon = daemons(redis=redis_server.url, history_max=10)
    await ready(daemon)
    client = await connect(daemon.port, hello=daemon.hello("alice"))
    await client.request({"op": "subscribe", "id": "p", "topic": "patterns"}, "subscribed")
    producer.publish([(PATTERNS, pattern(seq=-1))])
    await eventually(lambda: client.events("p"), 10, "a first event")
    last_id = client.events("p")[-1]["id"]

    history = daemon.service.history

    def down() -> Any:
        raise NotConnected("the tail's connection is down (test)")

    monkeypatch.setattr(history._redis, "connection", down)
    producer.publish([(PATTERNS, pattern(seq=n)) for n in range(300)])
    await routed([daemon], 301, "stored while the tail is down")
    assert redis_int(redis_server, "XLEN", HISTORY + "patterns") < 300  # trimmed
    monkeypatch.undo()
    producer.publish([(PATTERNS, pattern(seq=9999))])
    await eventually(lambda: seqs(client, "p")[-1:] == [9999] or client.close_code is not None,
                     10, "the tail back")
    if client.close_code is None:
        assert seqs(client, "p") == [-1, *range(300), 9999]
        return
    assert client.close_code == CLOSE_SLOW_CONSUMER
    again = await connect(daemon.port,
                          hello={**daemon.hello("alice"), "resume": {"last_id": last_id}})
    reply = await again.request({"op": "subscribe", "id": "p", "topic": "patterns"}, "subscribed")
    assert reply["recovered"] is False and reply["missed"]["from"] == last_id


@pytest_twisted.ensureDeferred
async def test_job_events_reach_owner_on_every_node_and_queue_while_offline(
        redis_server, daemons, producer, job_listener):
    """
    A job's progress and result reach every tab of its owner on every daemon
    (and nobody else's); what is published while the owner has no tab open
    is queued in Redis and delivered, newest progress and the result, in
    order and once, when she subscribes to backtests again on any daemon;
    after that the queue is empty, and a new subscription gets only the
    running job's current progress (a snapshot; the finished job's none).
    """
    a = daemons(redis=redis_server.url)
    b = daemons(redis=redis_server.url)
    await ready(a)
    await ready(b)
    bt = {"op": "subscribe", "id": "bt", "topic": "backtests"}
    tab_a = await connect(a.port, hello=a.hello("alice"))
    tab_b = await connect(b.port, hello=b.hello("alice"))
    bob = await connect(a.port, hello=a.hello("bob"))
    for client in (tab_a, tab_b, bob):
        assert (await client.request(bt, "subscribed")) == {"op": "subscribed", "id": "bt"}

    params = {"symbols": ["AAPL"], "start_date": "2024-01-02", "end_date": "2024-03-01"}
    job = (await tab_a.request({"op": "submit_backtest", "id": "r1", "params": params},
                               "job_accepted"))["job_id"]
    bob_job = (await bob.request({"op": "submit_backtest", "id": "r1", "params": params},
                                 "job_accepted"))["job_id"]

    def progress(job_id: str, p: float) -> tuple[str, dict[str, Any]]:
        return (PROGRESS, {"job_id": job_id, "progress": p, "status": "running",
                           "timestamp": 1_700_000_000.0 + p})

    def result(job_id: str) -> tuple[str, dict[str, Any]]:
        return (RESULTS, {"job_id": job_id, "completed_at": 1_700_000_100.0, "results": {
            "win_rate": 0.5, "roi": 0.1, "sharpe_ratio": 1.2, "max_drawdown": 0.05}})

    def seen(client: RecordingClient) -> list[tuple[str, Any]]:
        return [(e["data"]["job_id"], e["data"].get("progress", "result"))
                for e in client.events("bt")]

    producer.publish([progress(job, 0.25)])
    await eventually(lambda: seen(tab_a) == seen(tab_b) == [(job, 0.25)], 10,
                     "progress on both tabs")
    # Bob's event goes first: were it misrouted, alice's tabs would get it
    # before the next one of hers.
    producer.publish([progress(bob_job, 0.1), progress(job, 0.5)])
    await eventually(lambda: seen(bob) == [(bob_job, 0.1)], 10, "bob's own progress")
    await eventually(lambda: len(seen(tab_a)) >= 2 and len(seen(tab_b)) >= 2, 10,
                     "the second progress on both tabs")
    assert seen(tab_a) == seen(tab_b) == [(job, 0.25), (job, 0.5)]
    online_last = tab_a.events("bt")[-1]["id"]
    assert tab_b.events("bt")[-1]["id"] == online_last
    pointer = "tickstock:user:alice:delivered"
    await eventually(lambda: redis_str(redis_server, "GET", pointer) == online_last, 10,
                     "delivered pointer at the last online event")

    await close(tab_a)
    await close(tab_b)
    await eventually(lambda: "alice" not in users_connected(a) | users_connected(b), 10,
                     "both daemons saw alice go")
    producer.publish([progress(job, 0.75), progress(job, 0.9), result(job)])
    await eventually(lambda: redis_int(redis_server, "XLEN", "tickstock:user:alice") == 5, 10,
                     "the offline events queued")
    await routed([a, b], 6, "every event stored once")

    fresh = await connect(b.port, hello=b.hello("alice"))
    assert (await fresh.request(bt, "subscribed")) == {"op": "subscribed", "id": "bt"}
    await eventually(lambda: len(fresh.events("bt")) >= 2, 10, "the queued events")
    # Latest-only: of the progress published offline only the newest is kept.
    job2 = (await fresh.request({"op": "submit_backtest", "id": "r2", "params": params},
                                "job_accepted"))["job_id"]
    producer.publish([progress(job2, 0.5)])
    await eventually(lambda: seen(fresh)[-1:] == [(job2, 0.5)], 10, "a live marker")
    assert seen(fresh) == [(job, 0.9), (job, "result"), (job2, 0.5)]
    assert ordered([online_last, *(e["id"] for e in fresh.events("bt"))])
    marker = fresh.events("bt")[-1]["id"]
    await eventually(lambda: redis_str(redis_server, "GET", pointer) == marker, 10,
                     "delivered pointer at the marker")
    await close(fresh)
    await eventually(lambda: "alice" not in users_connected(b), 10, "B saw alice go")

    again = await connect(a.port, hello=a.hello("alice"))
    assert (await again.request(bt, "subscribed")) == {"op": "subscribed", "id": "bt"}
    producer.publish([result(job2)])
    await eventually(lambda: len(again.events("bt")) >= 2, 10, "a live result")
    # The queue is empty: only the running job's current progress comes first.
    assert seen(again) == [(job2, 0.5), (job2, "result")]
    first, live = again.events("bt")
    assert first.get("snapshot") is True and "snapshot" not in live
    assert seen(bob) == [(bob_job, 0.1)]


@pytest_twisted.ensureDeferred
async def test_duplicate_producer_event_id_across_daemons_delivered_once(
        redis_server, daemons, producer):
    """
    Two daemons in pub/sub mode each receive every message. A producer
    retry (the same event_id, same bytes or not) is stored and delivered
    once; two byte-identical messages without event_id are two events,
    stored and delivered twice; both daemons agree on every id.
    """
    a = daemons(redis=redis_server.url, mode="pubsub")
    b = daemons(redis=redis_server.url, mode="pubsub")
    await ready(a)
    await ready(b)
    sub = {"op": "subscribe", "id": "p", "topic": "patterns"}
    on_a = await connect(a.port, hello=a.hello("alice"))
    on_b = await connect(b.port, hello=b.hello("bob"))
    for client in (on_a, on_b):
        await client.request(sub, "subscribed")

    retried = orjson.dumps(pattern(seq=1, event_id="evt-1"))
    twice = orjson.dumps(pattern(seq=3))
    subscribers = producer.publish([
        (PATTERNS, retried), (PATTERNS, retried),
        (PATTERNS, pattern(seq=2, event_id="evt-2", attempt=1)),
        (PATTERNS, pattern(seq=2, event_id="evt-2", attempt=2)),
        (PATTERNS, twice), (PATTERNS, twice),
        (PATTERNS, pattern(seq=4)),
    ])
    assert subscribers == [2] * 7
    await eventually(lambda: a.service.router.received == b.service.router.received == 7, 10,
                     "every message on both daemons")
    await routed([a, b], 5, "five events stored")
    for client in (on_a, on_b):
        await eventually(lambda c=client: seqs(c, "p")[-1:] == [4], 10, "the last event")
        assert seqs(client, "p") == [1, 2, 3, 3, 4]
        assert client.events("p")[1]["data"]["attempt"] == 1
        assert ordered([e["id"] for e in client.events("p")])
    assert [e["id"] for e in on_a.events("p")] == [e["id"] for e in on_b.events("p")]
    assert a.service.router.duplicates + b.service.router.duplicates == 2 * 7 - 5
    assert redis_int(redis_server, "XLEN", HISTORY + "patterns") == 5


def _event(channel: str, now: float, **data: Any) -> Any:
    return parse_event(channel, orjson.dumps(data), "", now)


def _tick(symbol: str, now: float, **extra: Any) -> Any:
    return _event(TICKS, now, symbol=symbol, price=1.0, volume=1, timestamp=now + 1, **extra)


def test_memory_history_drops_by_age_and_resume_reports_it():
    """
    The embedded history drops events older than history_max_age as new
    ones arrive: resuming from before them reports the gap (from, to the
    newest dropped id, a count at least the number dropped after from and
    at most BOOKMARK_EVERY more) and replays what is kept; resuming from
    the newest dropped id or later is a full recovery. A producer event_id
    is forgotten once its dedupe window (here as long as the history's age)
    has passed.
    """
    clock = Clock()
    clock.advance(1000)
    history = MemoryHistory(clock, max_events=1000, max_age=60, user_max=100, dedupe_window=60)
    first, second = _tick("AAPL", clock.seconds()), _tick("MSFT", clock.seconds(), event_id="x")
    history.append(first)
    history.append(second)
    assert history.append(_tick("MSFT", clock.seconds(), event_id="x")).result is None
    clock.advance(30)
    third = _tick("AAPL", clock.seconds())
    history.append(third)
    replay = history.replay("ticks", first.id, None).result
    assert replay.missed is None and [e.id for e in replay.events] == [second.id, third.id]

    clock.advance(31)  # first and second are now older than 60 s
    fourth = _tick("NVDA", clock.seconds())
    history.append(fourth)
    replay = history.replay("ticks", first.id, None).result
    assert [e.id for e in replay.events] == [third.id, fourth.id]
    assert replay.missed is not None
    assert replay.missed["from"] == first.id and replay.missed["to"] == second.id
    assert 1 <= replay.missed["count"] <= 1 + BOOKMARK_EVERY
    before_all = f"{id_key(first.id)[0] - 1}-0"
    gap = history.replay("ticks", before_all, None).result.missed
    assert gap is not None and 2 <= gap["count"] <= 2 + BOOKMARK_EVERY
    for after in (second.id, third.id):
        replay = history.replay("ticks", after, None).result
        assert replay.missed is None
        assert [e.id for e in replay.events] == [
            e.id for e in (third, fourth) if id_key(e.id) > id_key(after)]

    # The retry window closed: the same event_id is new again.
    again = history.append(_tick("MSFT", clock.seconds(), event_id="x")).result
    assert again is not None and id_key(again) > id_key(fourth.id)


def test_occurrences_remember_a_flood_for_the_window_only():
    """
    A flood of distinct messages is remembered for the window (to within
    one time mark), no longer: what it holds stays bounded by the rate
    times the window, and old names restart while recent ones count on.
    """
    clock = Clock()
    occurrences = Occurrences(clock, 1.0)
    for i in range(3000):  # 3 s at 1,000 messages/s, every 10th sent twice
        clock.advance(0.001)
        occurrences.key(b"ch", b"%d" % i)
        if i % 10 == 0:
            assert occurrences.key(b"ch", b"%d" % i).endswith(":2")
    # The last second, and at most one 10 ms mark more: messages, sightings.
    assert 1000 <= len(occurrences._last) <= 1010, len(occurrences._last)
    assert 1100 <= len(occurrences._digests) <= 1111, len(occurrences._digests)
    assert 100 <= len(occurrences._counts) <= 101
    assert occurrences.key(b"ch", b"2990").endswith(":3")
    assert occurrences.key(b"ch", b"1500").endswith(":1")
    assert occurrences.key(b"ch", b"0").endswith(":1")


def test_occurrences_name_repeated_bytes_and_forget_after_window():
    """
    Occurrences names a pub/sub message by its channel and bytes and how
    often they were seen: the same bytes twice get :1 then :2 (two events,
    as every daemon counts them alike); the count goes on while the bytes
    keep coming within the window and restarts at :1 only after the bytes
    went unseen for longer than the window.
    """
    clock = Clock()
    occurrences = Occurrences(clock, 30)
    one = occurrences.key(b"ch", b"same bytes")
    two = occurrences.key(b"ch", b"same bytes")
    digest = one.rsplit(":", 1)[0]
    assert (one, two) == (f"{digest}:1", f"{digest}:2")
    other = occurrences.key(b"other", b"same bytes")
    assert other.endswith(":1") and not other.startswith(digest)
    assert occurrences.key(b"ch", b"different").endswith(":1")

    clock.advance(29)
    assert occurrences.key(b"ch", b"same bytes") == f"{digest}:3"
    clock.advance(30)  # 30 s since last seen: not longer than the window
    assert occurrences.key(b"ch", b"same bytes") == f"{digest}:4"
    clock.advance(31)
    assert occurrences.key(b"ch", b"same bytes") == f"{digest}:1"
    assert occurrences.key(b"ch", b"same bytes") == f"{digest}:2"
