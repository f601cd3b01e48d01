"""
Delivery classes for clients that read slower than events arrive: latest-only
frames (ticks, backtest progress, health) are conflated per key while a
client is paused, must-deliver frames are all kept and, past the queue bound,
a client that stopped reading (or reads slower than its events come, for
long) is closed with 4001 ("reconnect and resume"), never skipped.

The unit tests drive L{ClientProtocol}'s queue with a faked socket: no
Autobahn framing, the socket write (C{_write}) and C{sendCloseFrame} are
replaced by recorders, the socket's buffer is a frame count that pauses the
protocol when full, as Twisted's transport does past its buffer size, and
time is a L{Clock}. The end-to-end test uses a real daemon and a real
WebSocket whose client stops reading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from tests.wsclient import connect, eventually
from tickstock.deliver.gateway import CLOSE_SLOW_CONSUMER
from tickstock.domain.events import id_key
from tickstock.domain.topics import DEFAULT_CHANNELS
from tickstock.web.websocket import SWEEP, ClientProtocol, StreamFactory

TICKS = "tickstock.data.ticks"
STALL = 5.0
SLOW = 30.0


class RecordingGateway:
    """The gateway calls a protocol makes, closing slow consumers like the real one."""

    def __init__(self) -> None:
        self.slow: list[tuple[Any, int]] = []
        self.why: list[str] = []
        self.gone: list[Any] = []
        self.connections: dict[Any, None] = {}

    def slow_consumer(self, conn: Any, queued: int, why: str) -> None:
        self.slow.append((conn, queued))
        self.why.append(why)
        conn.close(CLOSE_SLOW_CONSUMER, f"too slow: {queued} messages queued; reconnect")

    def closed(self, conn: Any) -> None:
        self.gone.append(conn)


def make_factory(queue_limit: int, clock: Clock) -> StreamFactory:
    factory = StreamFactory(
        allowed_origins=(), max_message_size=65536, queue_limit=queue_limit,
        ping_interval=0, ping_timeout=1, handshake_timeout=1,
        stall_timeout=STALL, slow_for=SLOW, clock=clock,
    )
    factory.gateway = RecordingGateway()  # type: ignore[assignment]
    return factory


class FakeSocketProtocol(ClientProtocol):
    """
    L{ClientProtocol} over a faked socket that holds C{room} unread frames
    (L{None}: unlimited) and pauses the protocol when it is full.
    """

    def __init__(self, queue_limit: int, room: int | None = None,
                 factory: StreamFactory | None = None) -> None:
        super().__init__()
        self.clock = Clock() if factory is None else factory.reactor
        self.factory = factory or make_factory(queue_limit, self.clock)
        self.gateway = self.factory.gateway
        self.gateway.connections[self] = None
        self.room = room
        self.sent: list[str] = []
        self.unread = 0
        self.close_frames: list[tuple[int | None, bytes | None]] = []
        self.state = self.STATE_OPEN

    def _write(self, data: Any) -> None:
        self.sent.append(data)
        self.unread += 1
        if self.room is not None and self.unread >= self.room:
            self.pauseProducing()

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None,
                       isReply: bool = False) -> None:
        self.close_frames.append((code, reasonUtf8))

    def read(self) -> None:
        """The client reads everything in the socket; the transport resumes us."""
        self.unread = 0
        self.resumeProducing()


class Frame(str):
    """A stand-in prepared frame: its wire bytes are its text."""

    @property
    def payloadHybi(self) -> str:
        return self


def tick(symbol: str, n: int) -> tuple[str, tuple[str, str]]:
    """A stand-in prepared tick frame and its conflation key."""
    return Frame(f"tick {symbol} {n}"), (TICKS, symbol)


def must(n: int) -> tuple[str, None]:
    """A stand-in prepared must-deliver frame (a pattern) and its key, None."""
    return Frame(f"pattern {n}"), None


def send_all(proto: ClientProtocol, frames: list[tuple[str, Any]]) -> None:
    for prepared, key in frames:
        proto.send(prepared, key)


def test_a_reading_client_gets_each_frame_at_once() -> None:
    """Not paused and nothing queued: every frame, of either class, goes out at once."""
    proto = FakeSocketProtocol(queue_limit=2)
    frames = [tick("AAPL", 1), must(1), tick("AAPL", 2), must(2), must(3)]
    for prepared, key in frames:
        proto.send(prepared, key)
        assert proto.sent[-1] == prepared
    assert proto.sent == [prepared for prepared, _ in frames]
    assert proto.factory.conflated == 0
    assert proto.gateway.slow == []


def test_conflation_keeps_the_newest_per_key_in_event_order() -> None:
    """
    While paused, a newer tick for a symbol replaces the queued one and goes
    to the end of the queue, so what is flushed is the newest per symbol in
    the order those newest ticks arrived (event-id order); each replaced
    frame is counted on the factory.
    """
    proto = FakeSocketProtocol(queue_limit=10)
    proto.pauseProducing()
    send_all(proto, [tick("AAPL", 1), tick("MSFT", 1), tick("AAPL", 2), tick("GOOG", 1),
                     tick("MSFT", 2), tick("AAPL", 3)])
    assert proto.sent == []
    proto.read()
    assert proto.sent == ["tick GOOG 1", "tick MSFT 2", "tick AAPL 3"]
    assert proto.factory.conflated == 3
    assert proto.gateway.slow == []


def test_must_deliver_frames_are_never_dropped_and_keep_their_place() -> None:
    """
    Must-deliver frames up to the bound are all kept, interleaved with
    conflated ticks in arrival order, however many ticks arrive: the ticks
    do not count against the must-deliver bound.
    """
    proto = FakeSocketProtocol(queue_limit=3)
    proto.pauseProducing()
    frames = [must(1), tick("AAPL", 1), tick("MSFT", 1), must(2)]
    frames += [tick("AAPL", n) for n in range(2, 500)]
    frames += [must(3), tick("MSFT", 2)]
    send_all(proto, frames)
    proto.read()
    assert proto.sent == ["pattern 1", "pattern 2", "tick AAPL 499", "pattern 3", "tick MSFT 2"]
    assert proto.gateway.slow == []
    assert proto.close_frames == []


def test_past_the_must_deliver_bound_a_client_that_stopped_reading_is_closed() -> None:
    """
    Past C{queue_limit} must-deliver frames queued, a client whose socket
    has taken nothing for the stall timeout is closed: the gateway is told
    (and closes with 4001), the queue is dropped, and nothing more is sent
    or queued, even once the socket drains. Before the timeout, every frame
    is kept.
    """
    proto = FakeSocketProtocol(queue_limit=3)
    proto.pauseProducing()
    send_all(proto, [must(1), tick("AAPL", 1), must(2), must(3), must(4)])
    proto.clock.advance(STALL - 0.1)
    proto.send(*must(5))
    assert proto.gateway.slow == []
    proto.clock.advance(0.1)
    proto.send(*must(6))
    assert proto.gateway.slow == [(proto, 7)]
    assert proto.gateway.why == ["stopped reading"]
    assert [code for code, _ in proto.close_frames] == [CLOSE_SLOW_CONSUMER]
    proto.send(*must(7))
    proto.send(*tick("AAPL", 2))
    proto.read()
    assert proto.sent == []
    assert len(proto.gateway.slow) == 1


def test_a_stalled_client_past_the_bound_is_closed_without_another_frame() -> None:
    """
    No frame needs to arrive after the timeout: the factory checks its
    paused clients every L{SWEEP} seconds, and stops checking once none is.
    """
    proto = FakeSocketProtocol(queue_limit=2)
    proto.pauseProducing()
    send_all(proto, [must(n) for n in range(3)])
    assert proto.gateway.slow == []
    proto.clock.advance(STALL + SWEEP)
    assert proto.gateway.slow == [(proto, 3)]
    proto.onClose(False, 4001, None)
    assert proto.clock.getDelayedCalls() == []


def test_too_many_latest_only_keys_close_a_stalled_client_too() -> None:
    """
    Latest-only frames are bounded by their distinct keys: more than
    C{queue_limit} symbols waiting closes a stalled client with 4001 as well.
    """
    proto = FakeSocketProtocol(queue_limit=3)
    proto.pauseProducing()
    send_all(proto, [tick(symbol, 1) for symbol in ("A", "B", "C")])
    send_all(proto, [tick(symbol, 2) for symbol in ("A", "B", "C")])
    proto.send(*tick("D", 1))
    proto.clock.advance(STALL - SWEEP)
    assert proto.gateway.slow == []
    proto.clock.advance(SWEEP)
    assert proto.gateway.slow == [(proto, 4)]
    assert [code for code, _ in proto.close_frames] == [CLOSE_SLOW_CONSUMER]


def test_a_client_that_reads_is_kept_past_the_bound() -> None:
    """
    A burst comes faster than the client reads (the daemon wrote late, or
    all at once): over twice C{queue_limit} frames wait, but each time it
    reads (the transport resumes us) it progresses, within the stall
    timeout. It is not closed, and gets every frame in order as it catches
    up.
    """
    proto = FakeSocketProtocol(queue_limit=10, room=5)
    sent = 0
    for _ in range(6):
        send_all(proto, [must(sent + n) for n in range(10)])
        sent += 10
        proto.clock.advance(STALL - 1)
        proto.read()  # reads 5 frames: the queue grows by 5
    assert len(proto._queue) > 2 * 10
    while proto._queue:
        proto.clock.advance(STALL - 1)
        proto.read()
    proto.read()
    assert proto.sent == [f"pattern {n}" for n in range(sent)]
    assert proto.gateway.slow == []


def test_partial_progress_counts_as_reading() -> None:
    """
    A slow reader drains Twisted's buffer a little at a time and is not
    resumed until it is empty: bytes leaving the buffer are progress. Once
    they stop leaving it for the stall timeout, it has stopped reading.
    """
    proto = FakeSocketProtocol(queue_limit=2)
    proto.transport = transport = FakeTransport(unsent=100_000)
    proto.pauseProducing()
    send_all(proto, [must(n) for n in range(5)])
    for _ in range(4):
        proto.clock.advance(STALL - 1)
        transport.dataBuffer = transport.dataBuffer[10_000:]  # the client read 10 kB
        proto.clock.advance(SWEEP)
    assert proto.gateway.slow == []
    proto.clock.advance(STALL)
    assert proto.gateway.why == ["stopped reading"]


def test_a_client_past_the_bound_for_too_long_is_closed_though_it_reads() -> None:
    """
    Reading, but never getting back under the bound for C{slow_for} seconds:
    it reads slower than its events come, and is closed so that its queue
    does not grow without end.
    """
    proto = FakeSocketProtocol(queue_limit=2, room=1)
    proto.send(*must(0))  # fills the socket
    n = 1
    while not proto.gateway.slow:
        send_all(proto, [must(n), must(n + 1)])  # two come, one is read
        n += 2
        proto.read()
        proto.clock.advance(1)
    past_bound_at = 2  # 3 frames waiting after the 2nd read
    assert past_bound_at + SLOW <= proto.clock.seconds() <= past_bound_at + SLOW + 1
    assert proto.gateway.why == ["reads slower than its events come"]


def test_clients_behind_counts_backlogged_readers_not_stalled_ones() -> None:
    """
    The daemon is behind for its clients when most of the connected ones
    have had frames waiting for a second though they read; a client that
    stopped reading does not count.
    """
    clock = Clock()
    factory = make_factory(100, clock)
    clients = [FakeSocketProtocol(100, room=1, factory=factory) for _ in range(5)]
    for proto in clients[:3]:
        send_all(proto, [must(1), must(2)])
    clock.advance(SWEEP)
    assert factory.backlogged == 0  # waiting for less than a second
    clock.advance(SWEEP * 2)
    assert factory.backlogged == 3 and factory.clients_behind()
    for _ in range(int(STALL / SWEEP) + 1):
        clients[0].read()  # reads on
        clients[0].send(*must(3))
        clients[0].send(*must(4))
        clock.advance(SWEEP)
    assert factory.backlogged == 1 and not factory.clients_behind()  # two stalled
    while clients[0]._queue:
        clients[0].read()
    clients[0].read()
    clock.advance(SWEEP)
    assert factory.backlogged == 0


class FakeTransport:
    """What L{ClientProtocol} reads of Twisted's transport: the bytes it still holds."""

    def __init__(self, unsent: int) -> None:
        self.dataBuffer = b"x" * unsent
        self.offset = 0
        self._tempDataLen = 0


def test_resume_flushes_in_order_until_the_socket_is_full_again() -> None:
    """
    A socket with room for two frames: each time the client reads, the queue
    is flushed from the front until the socket is full again; frames sent
    meanwhile queue behind (never overtake) the waiting ones, and in the end
    every must-deliver frame and the newest tick per symbol arrive in order.
    """
    proto = FakeSocketProtocol(queue_limit=4, room=2)
    send_all(proto, [must(1), must(2)])  # fills the socket: paused
    assert proto.sent == ["pattern 1", "pattern 2"]
    send_all(proto, [must(3), tick("AAPL", 1), must(4), tick("AAPL", 2)])
    proto.read()
    assert proto.sent[2:] == ["pattern 3", "pattern 4"]
    send_all(proto, [tick("MSFT", 1), must(5)])
    proto.read()
    assert proto.sent[4:] == ["tick AAPL 2", "tick MSFT 1"]
    proto.read()
    proto.send(*must(6))
    assert proto.sent[6:] == ["pattern 5", "pattern 6"]
    assert proto.gateway.slow == []
    assert proto.factory.conflated == 1


def test_flushed_frames_no_longer_count_against_the_bound() -> None:
    """
    The bound is on frames waiting, not on frames ever queued: a client that
    catches up between bursts of must-deliver events is never closed.
    """
    proto = FakeSocketProtocol(queue_limit=2)
    for burst in range(5):
        proto.pauseProducing()
        send_all(proto, [must(2 * burst), must(2 * burst + 1), tick("AAPL", burst)])
        proto.read()
    assert proto.sent[-3:] == ["pattern 8", "pattern 9", "tick AAPL 4"]
    assert len(proto.sent) == 15
    assert proto.gateway.slow == []


@pytest.mark.parametrize("stop", ["onClose", "stopProducing"])
def test_a_closed_connection_drops_its_queue(stop: str) -> None:
    """Once the connection is closing or lost, queued frames are dropped and nothing is sent."""
    proto = FakeSocketProtocol(queue_limit=5)
    proto.pauseProducing()
    send_all(proto, [must(1), tick("AAPL", 1)])
    if stop == "onClose":
        proto.onClose(False, 1006, None)
        assert proto.gateway.gone == [proto]
    else:
        proto.stopProducing()
    proto.send(*must(2))
    proto.read()
    assert proto.sent == []
    assert proto.gateway.slow == []


def test_documented_latest_only_channels_are_the_code() -> None:
    """
    The C{event} message in C{docs/asyncapi.yaml} lists exactly the
    latest-only channels and their keys of L{tickstock.domain.topics.DEFAULT_CHANNELS}, and
    its delivery-classes text names every topic and the 4001 close.
    """
    yaml = pytest.importorskip("yaml")
    path = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
    event = yaml.safe_load(path.read_text(encoding="utf-8"))["components"]["messages"]["Event"]
    assert event["x-latest-only"] == {
        channel.name: list(channel.latest_by) for channel in DEFAULT_CHANNELS
        if channel.latest_only
    }
    text = event["description"]
    for channel in DEFAULT_CHANNELS:
        assert f"**{channel.topic}**" in text
    assert "`4001`" in text and "resume" in text


# ---------------------------------------------------------------- end to end


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_ticks_gets_the_newest_per_symbol(daemons):
    """
    A real client subscribed to ticks (and to patterns) stops reading while
    far more ticks than C{--client-queue-limit} arrive, enough (about 25 MB)
    to fill loopback's socket buffers. It is not closed: its ticks are
    conflated. Once it reads again it gets every pattern, the last tick
    published for each symbol as the last it sees of that symbol, patterns
    in event-id order and each symbol's ticks in event-id order (ticks are
    paced per symbol, so not across symbols). (Frames written straight to the socket meet a full
    one here: what the kernel does not take must follow, whole and in order,
    through Twisted's buffer.)
    """
    daemon = daemons(sim_rate=0, client_queue_limit=20)
    client = await connect(daemon.port, hello=daemon.hello("slow"))
    for topic in ("ticks", "patterns"):
        reply = await client.request({"op": "subscribe", "id": topic, "topic": topic},
                                     "subscribed")
        assert reply["op"] == "subscribed", reply
    link = daemon.service.link
    gateway = daemon.service.gateway
    symbols = ("AAPL", "MSFT", "GOOG", "TSLA")
    pad = "x" * 16_000
    rounds, patterns = 400, 10

    client.transport.pauseProducing()  # stops reading from its socket
    published = 0
    for n in range(rounds):
        for symbol in symbols:
            link.publish(TICKS, orjson.dumps({
                "symbol": symbol, "price": 100.0 + n, "volume": n,
                "timestamp": 1_700_000_000 + n, "n": n, "pad": pad}))
            published += 1
        if n % (rounds // patterns) == 0:
            link.publish("tickstock.events.patterns", orjson.dumps({
                "symbol": "AAPL", "pattern": "Doji", "confidence": 0.9,
                "timestamp": 1_700_000_000 + n, "n": n}))
        # One reactor turn per round, so the daemon writes to the socket and
        # finds it full, as with a producer publishing over time.
        await deferLater(reactor, 0, lambda: None)
    assert gateway.slow_consumers_closed == 0
    client.transport.resumeProducing()

    def last_tick(symbol: str) -> int | None:
        seen = [e["data"]["n"] for e in client.events("ticks") if e["data"]["symbol"] == symbol]
        return seen[-1] if seen else None

    await eventually(lambda: all(last_tick(s) == rounds - 1 for s in symbols), 20,
                     "the newest tick of every symbol")
    await eventually(lambda: len(client.events("patterns")) == patterns, 5, "every pattern")
    pong = await client.request({"op": "ping", "id": "p"}, "pong")
    assert pong["op"] == "pong"

    assert client.close_code is None
    assert gateway.slow_consumers_closed == 0
    ticks = client.events("ticks")
    assert len(ticks) < published
    # Conflated on the way (--tick-rate) or in the paused client's queue.
    assert daemon.service.stream.conflated + daemon.service.ticks.conflated > 0
    assert [e["data"]["n"] for e in client.events("patterns")] == \
        list(range(0, rounds, rounds // patterns))
    ids = [id_key(e["id"]) for e in client.events()]
    assert len(set(ids)) == len(ids)
    ids = [id_key(e["id"]) for e in client.events("patterns")]
    assert ids == sorted(ids)
    # Ticks are paced per symbol (--tick-rate): in order per symbol, not across symbols.
    for symbol in symbols:
        per_symbol = [e for e in ticks if e["data"]["symbol"] == symbol]
        assert [id_key(e["id"]) for e in per_symbol] == sorted(id_key(e["id"]) for e in per_symbol)
        numbers = [e["data"]["n"] for e in per_symbol]
        assert numbers == sorted(numbers)
