"""
Unit tests of single parts behind their interfaces, with Clock for time.
Fakes here are recording stand-ins for the transport side only (said per
test); every path they cover also runs against real sockets and a real
Redis in test_end_to_end.py and test_protocol.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tickstock.config import parse_redis_url
from tickstock.connections.redis import RedisLink
from tickstock.deliver.auth import anonymous
from tickstock.deliver.broadcast import Broadcaster, Filter, parse_filter
from tickstock.deliver.gateway import Gateway
from tickstock.domain.events import ID_STRIDE, EventIds, TickIds, id_key
from tickstock.domain.interfaces import (
    IClient,
    IEventSink,
    IEventSource,
    IHistory,
    IProducerLink,
)
from tickstock.domain.topics import DEFAULT_CHANNELS
from tickstock.history.memory import MemoryHistory
from tickstock.history.redis import RedisHistory
from tickstock.ingest.memory import MemoryBus
from tickstock.ingest.normalize import parse_event
from tickstock.ingest.pubsub import RedisPubSubSource
from tickstock.ingest.router import Router
from tickstock.web.websocket import ClientProtocol

ADDRESS = parse_redis_url("redis://127.0.0.1:1/0")


@implementer(IClient)
class RecordingClient:
    """A fake connection that records what it is sent (no socket)."""

    def __init__(self, user: str | None = None) -> None:
        self.user = user
        self.sent: list[Any] = []
        self.replies: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    dialect = None

    def frame(self, event: Any, sub_id: str) -> bytes:
        return bytes(event.frame(sub_id))

    def send(self, prepared: Any, key: Any = None) -> None:
        self.sent.append(prepared)

    def reply(self, message: dict[str, Any]) -> None:
        self.replies.append(message)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def test_every_implementation_provides_its_interface():
    """verifyObject on each implementation and on the test fake."""
    bus = MemoryBus()
    verifyObject(IEventSource, bus)
    verifyObject(IProducerLink, bus)
    clock = Clock()
    verifyObject(IEventSource, RedisPubSubSource(clock, ADDRESS))
    verifyObject(IProducerLink, RedisLink(clock, ADDRESS, 10))
    verifyObject(IHistory, MemoryHistory(clock, 10, 60, 10))
    verifyObject(IHistory, RedisHistory(clock, ADDRESS, RedisLink(clock, ADDRESS, 1),
                                        10, 60, 10))
    verifyObject(IEventSink, Broadcaster(lambda b: b))
    verifyObject(IClient, ClientProtocol())
    verifyObject(IClient, RecordingClient())


def event(channel: str = "tickstock.events.patterns", clock: float = 1.0, **data: Any):
    body = {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.9, "timestamp": 1.0,
            "event_type": "pattern_detected"} if channel.endswith("patterns") else {}
    body.update(data)
    return parse_event(channel, orjson.dumps(body), EventIds().next(clock), clock)


def test_event_ids_order_and_never_go_back():
    """Ids increase even when the clock stands still or steps back."""
    ids = EventIds()
    seen = [ids.next(t) for t in (1.0, 1.0, 0.5, 2.0, 2.0)]
    s = ID_STRIDE
    assert seen == ["1000-0", f"1000-{s}", f"1000-{2 * s}", "2000-0", f"2000-{s}"]
    assert sorted(seen, key=id_key) == seen
    for bad in ("abc", "1-", "-1", "\u0661-2", "\u00b2-1", "1-\uff11"):
        with pytest.raises(ValueError):
            id_key(bad)


def test_tick_ids_fall_between_the_stored_ids_around_them():
    """
    A live tick's id sorts after the stored event delivered before it and
    before the next one stored, grows with time (so another daemon, or this
    one restarted, goes on from about where it was), and never repeats.
    """
    stored = EventIds()
    first = stored.next(1.0)
    ticks = TickIds()
    a, b = ticks.next(first, 1.25), ticks.next(first, 1.25)
    c = TickIds().next(first, 1.5)  # another daemon, a little later
    assert (a, b, c) == ("1000-250000", "1000-250001", "1000-500000")
    second = stored.next(1.0)
    assert id_key(first) < id_key(a) < id_key(b) < id_key(c) < id_key(second)
    assert id_key(ticks.next(second, 0.5)) > id_key(second)  # the clock stepped back
    last = ticks.next(second, 2e6)  # weeks with no stored event: the ids stop growing
    assert id_key(last) == (1000, 2 * ID_STRIDE - 1)
    assert id_key(last) < id_key(stored.next(1.0))
    fresh = TickIds()  # nothing stored yet: the steps count from the first tick
    assert [fresh.next("0-0", t) for t in (5.0, 5.0, 6.0)] == ["0-1", "0-2", "0-1000001"]


class _RecordingLink:
    """A fake command link (the transport side): records script calls and answers them when told."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], Deferred[Any]]] = []

    def preload(self, source: str) -> None:
        pass

    def execute(self, *command: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((command, d))
        return d

    def stored(self, call: int) -> int:
        """How many events the script call C{call} carried (3 keys each after 2)."""
        command = self.calls[call][0]
        return (command[2] - 2) // 3


def test_stores_go_out_at_once_after_a_quiet_spell_and_once_per_window_under_load():
    """
    The first event after a quiet window is stored in the same turn; those
    arriving within the window after a call share the next one, sent when
    the window ends and the call before it has answered (one call in flight,
    so stores land in the order they were appended); the tail's read follows
    the stores, so delivery waits at most the window. With no window every
    turn has its own call. The link is a recording fake (L{_RecordingLink}).
    """
    clock, link = Clock(), _RecordingLink()
    history = RedisHistory(clock, ADDRESS, link, 10, 60, 10, store_window=0.002)  # type: ignore[arg-type]
    first = history.append(event())
    clock.advance(0)
    assert [link.stored(i) for i in range(len(link.calls))] == [1]
    link.calls[0][1].callback([1, "5-0"])
    assert first.result == "5-0"
    clock.advance(0.0005)
    history.append(event())
    clock.advance(0)
    history.append(event())
    clock.advance(0.001)
    assert len(link.calls) == 1, "within the window the events wait"
    clock.advance(0.0005)
    assert [link.stored(i) for i in range(len(link.calls))] == [1, 2]
    link.calls[1][1].callback([1, "5-1", 1, "5-2"])
    clock.advance(0.05)
    history.append(event())
    clock.advance(0)
    assert [link.stored(i) for i in range(len(link.calls))] == [1, 2, 1], "quiet again: at once"

    clock, link = Clock(), _RecordingLink()
    history = RedisHistory(clock, ADDRESS, link, 10, 60, 10)  # type: ignore[arg-type]
    for n in range(3):
        history.append(event())
        clock.advance(0)
        link.calls[n][1].callback([1, f"5-{n}"])
    assert [link.stored(i) for i in range(len(link.calls))] == [1, 1, 1]


def test_fan_out_frames_once_per_subscription_id():
    """
    Twenty clients with sub id "s1" and five with "x" cost two framings,
    not twenty-five; clients of other symbols are not even visited.
    """
    prepared: list[bytes] = []

    def prepare(payload: bytes) -> bytes:
        prepared.append(payload)
        return payload

    broadcaster = Broadcaster(prepare)
    aapl = [RecordingClient("u") for _ in range(25)]
    for n, client in enumerate(aapl):
        broadcaster.subscribe(client, "s1" if n < 20 else "x", "patterns",
                              parse_filter("patterns", {"symbols": ["AAPL"]}))
    msft = RecordingClient("m")
    broadcaster.subscribe(msft, "s1", "patterns", Filter(symbols=frozenset({"MSFT"})))
    broadcaster.deliver(event())
    assert len(prepared) == 2 and all(len(c.sent) == 1 for c in aapl) and msft.sent == []
    frame = orjson.loads(aapl[0].sent[0])
    assert frame["op"] == "event" and frame["sub"] == "s1" and frame["data"]["symbol"] == "AAPL"
    assert broadcaster.delivered == 25


def test_unsubscribe_removes_from_the_index():
    """After unsubscribe a client gets nothing and the index holds no empty buckets."""
    broadcaster = Broadcaster(lambda b: b)
    client = RecordingClient("u")
    sub = broadcaster.subscribe(client, "s", "patterns", Filter(symbols=frozenset({"AAPL"})))
    broadcaster.unsubscribe(sub)
    broadcaster.deliver(event())
    assert client.sent == [] and broadcaster.subscriptions == 0
    assert broadcaster._by_symbol["patterns"] == {}


def test_targeted_events_reach_only_the_owner():
    """A job's progress goes to its owner's connections only; unknown jobs to nobody."""
    broadcaster = Broadcaster(lambda b: b)
    tabs = [RecordingClient("alice"), RecordingClient("alice")]
    other = RecordingClient("bob")
    for client in (*tabs, other):
        broadcaster.subscribe(client, "b", "backtests", Filter())
    progress = "tickstock.events.backtesting.progress"
    owned = event(progress, job_id="j1", progress=0.5, status="running", timestamp=1.0)
    owned.user = "alice"
    broadcaster.deliver(owned)
    broadcaster.deliver(event(progress, job_id="j2", progress=0.5, status="running", timestamp=1.0))
    assert [len(t.sent) for t in tabs] == [1, 1] and other.sent == []
    assert broadcaster.unrouted == 1


def test_router_dead_letters_and_logs_each_kind_once():
    """Malformed messages go to the dead-letter list; history sees only valid events."""
    bus = MemoryBus(deadletter_max=2)
    store = MemoryHistory(Clock(), 10, 60, 10)
    router = Router(Clock(), store, bus)
    for raw in (b"x", b"y", b"[]", orjson.dumps({"symbol": "AAPL"})):
        router.receive("tickstock.events.patterns", raw)
    router.receive("tickstock.events.patterns", orjson.dumps(
        {"symbol": "AAPL", "pattern": "Doji", "confidence": 1, "timestamp": 5}))
    assert router.malformed_by_kind() == {"not_json": 2, "not_object": 1, "missing_field": 1}
    assert len(bus.dead_letters) == 2 and bus.dead_letters[0][2].startswith("missing_field")
    assert [e.symbol for e in store.recent("patterns", 10).result] == ["AAPL"]


def test_every_channel_has_a_topic_and_parses_a_minimal_message():
    """Each docs/contract.md §1 channel accepts a message with just its required fields."""
    samples = {
        "patterns": {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.5, "timestamp": 1},
        "market_state": {"event_type": "ranking_change", "symbol": "AAPL", "timestamp": 1},
        "health": {"service": "pl", "status": "down", "timestamp": 1},
        "ticks": {"symbol": "AAPL", "price": 1.5, "volume": 0, "timestamp": 1},
        "universe": {"timestamp": 1},
        "indicators": {"symbol": "AAPL", "indicator": "RSI", "value": 50},
        "alerts": {"symbol": "AAPL", "alert_type": "rsi_overbought"},
    }
    for channel in DEFAULT_CHANNELS:
        if channel.topic == "backtests":
            continue
        for name in channel.redis:
            name = name.replace("*", "AAPL")
            parsed = parse_event(name, orjson.dumps(samples[channel.topic]), "1-0", 1.0)
            assert parsed.topic == channel.topic and parsed.channel == channel.name


def make_gateway(clock: Clock, link: Any = None) -> Gateway:
    """A gateway over memory parts; C{link} is where its jobs are published."""
    from tickstock.ingest.router import Router
    from tickstock.jobs.backtests import Jobs
    from tickstock.store.memory import MemoryStore

    history, link = MemoryHistory(clock, 10, 60, 10), link or MemoryBus()
    jobs = Jobs(clock, MemoryStore(clock), history, link,
                Router(clock, history, link).receive, per_user=3, timeout=300)
    return Gateway(clock, Broadcaster(lambda b: b), history, anonymous,
                   max_subscriptions=2, hello_timeout=5, jobs=jobs)


def test_hello_timer_closes_silent_clients():
    """Without hello within the timeout the gateway closes with 1008; with it, never."""
    clock = Clock()
    gateway = make_gateway(clock)
    silent, polite = RecordingClient(), RecordingClient()
    gateway.opened(silent)
    gateway.opened(polite)
    gateway.receive(polite, b'{"op":"hello","user":"p"}')
    clock.advance(5.1)
    assert silent.closed == (1008, "no hello in time") and polite.closed is None
    gateway.closed(silent)
    gateway.closed(polite)
    assert clock.getDelayedCalls() == []


def test_a_resume_the_history_cannot_replay_now_is_closed_to_resume_again():
    """
    The history cannot be read (Redis restarting): a resuming subscription
    is closed with 4001, so the client resumes from the same point later,
    rather than told that events were missed; a new one (no resume) goes on.
    """
    from twisted.internet.defer import fail

    clock = Clock()
    gateway = make_gateway(clock)
    gateway._history.replay = lambda *_: fail(ConnectionError("redis down"))
    resuming, fresh = RecordingClient(), RecordingClient()
    for client, hello in ((resuming, b'{"op":"hello","user":"a","resume":{"last_id":"5-0"}}'),
                          (fresh, b'{"op":"hello","user":"b"}')):
        gateway.opened(client)
        gateway.receive(client, hello)
        gateway.receive(client, b'{"op":"subscribe","id":"s","topic":"patterns"}')
    assert resuming.closed == (4001, "the history cannot be read now; resume")
    assert fresh.closed is None
    assert [m["op"] for m in fresh.replies if m.get("id") == "s"] == ["subscribed"]
    assert gateway.errors["history_unavailable"] == 1
    gateway.closed(resuming)
    gateway.closed(fresh)


def test_job_submission_fails_clearly_when_the_producer_is_unreachable():
    """A publish failure is answered with 'unavailable', not silence."""

    class DownLink(MemoryBus):
        def publish(self, channel: str, payload: bytes) -> Deferred[int]:
            from twisted.internet.defer import fail
            return fail(ConnectionError("down"))

    clock = Clock()
    gateway = make_gateway(clock, DownLink())
    client = RecordingClient()
    gateway.opened(client)
    gateway.receive(client, b'{"op":"hello","user":"u"}')
    gateway.receive(client, orjson.dumps({"op": "submit_backtest", "id": "r", "params": {
        "symbols": ["AAPL"], "start_date": "2024-01-01", "end_date": "2024-02-01"}}))
    assert client.replies[-1]["code"] == "unavailable" and client.replies[-1]["id"] == "r"
    gateway.closed(client)


class FakeSubscriber:
    """A stand-in for the txredisapi protocol (no socket): records PINGs and aborts."""

    def __init__(self) -> None:
        self.pings: list[Deferred[Any]] = []
        self.aborted = False
        self.transport = self

    def subscribe(self, channel: str) -> Deferred[Any]:
        return succeed(["subscribe", channel, 1])

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if args == ("CLIENT", "ID"):
            return succeed(5)
        assert args == ("PING",)
        d: Deferred[Any] = Deferred()
        self.pings.append(d)
        return d

    def abortConnection(self) -> None:
        self.aborted = True


def test_heartbeat_drops_a_connection_that_stops_answering():
    """
    PINGs answered in time keep the connection; one unanswered for longer
    than the timeout aborts it (a SIGSTOPped Redis), counted; but not while
    messages still arrive (the PONG is queued behind a backlog).
    """
    clock = Clock()
    source = RedisPubSubSource(clock, ADDRESS, ping_interval=1.0, ping_timeout=3.0)
    source.running = True
    protocol = FakeSubscriber()
    source._connected(protocol)
    assert source.ready
    source._heartbeat.start(1.0, now=False)
    clock.advance(1.0)
    assert len(protocol.pings) == 1
    protocol.pings[0].callback(["pong", ""])
    clock.advance(1.0)
    assert len(protocol.pings) == 2 and not protocol.aborted
    for _ in range(6):
        source._read(100, None)
        clock.advance(1.0)
    assert not protocol.aborted and len(protocol.pings) == 2 and source._client_id == 5
    for _ in range(4):
        clock.advance(1.0)
    assert protocol.aborted and source.heartbeat_timeouts == 1
    source._heartbeat.stop()
    assert clock.getDelayedCalls() == []


def test_a_re_sent_event_id_is_delivered_once():
    """
    A producer retry (same event_id on the same channel) is routed once
    within the dedupe window, also after the first copy has left the
    history (2 events here); once the window has passed, the id is new
    again; events without event_id always pass.
    """
    clock = Clock()
    store = MemoryHistory(clock, 2, 60, 10, dedupe_window=30)
    router = Router(clock, store, MemoryBus())

    def send(event_id: str | None, n: int) -> None:
        body = {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.5, "timestamp": 1, "n": n}
        if event_id is not None:
            body["event_id"] = event_id
        router.receive("tickstock.events.patterns", orjson.dumps(body))

    send("a", 1)
    send("a", 2)
    send("b", 3)
    send(None, 4)
    send(None, 5)
    send("c", 6)
    send("a", 7)
    clock.advance(29.9)
    send("a", 8)
    assert [e.data["n"] for e in store.recent("patterns", 10).result] == [5, 6]
    clock.advance(0.1)
    send("a", 9)
    assert [e.data["n"] for e in store.recent("patterns", 10).result] == [6, 9]
    assert router.duplicates == 3 and router.routed == 6
