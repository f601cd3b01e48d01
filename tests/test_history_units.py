"""
Unit tests of the Redis history's live tail (tickstock.history.redis.tailer)
with a Clock for time and no Redis. The fakes stand in for the transport
side only, and are said so where they are: a command link that records
store calls and answers them when told, and a tail connection that records
XREAD / EVALSHA commands and answers them when told. The same paths run
against a real Redis in test_resume.py and test_end_to_end.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from tickstock.config import parse_redis_url
from tickstock.domain.events import Event, EventIds
from tickstock.domain.topics import TOPIC_NAMES
from tickstock.history.redis import RedisHistory, tailer
from tickstock.history.redis.layout import LAST_KEY, PREFIX
from tickstock.ingest.normalize import parse_event

ADDRESS = parse_redis_url("redis://127.0.0.1:1/0")
PATTERNS = "tickstock.events.patterns"
HEALTH = "tickstock.health.status"


class RecordingLink:
    """A fake command link (no Redis): records store calls, answered when told."""

    def __init__(self) -> None:
        self.calls: list[Deferred[Any]] = []

    def preload(self, source: str) -> None:
        pass

    def execute(self, *command: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(d)
        return d


class Transport:
    """A fake transport: records that the tail gave up on its connection."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class TailConnection:
    """
    A fake tail connection (no Redis): records each command and answers it
    when told, in the order the tail sent them.
    """

    def __init__(self) -> None:
        self.commands: list[tuple[tuple[Any, ...], Deferred[Any]]] = []
        self.transport = Transport()

    def execute_command(self, *command: Any, apply_timeout: bool = True) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.commands.append((command, d))
        return d

    def answer(self, name: str, reply: Any) -> tuple[Any, ...]:
        """Answer the oldest unanswered C{name} command; return it."""
        for command, d in self.commands:
            if command[0] == name and not d.called:
                d.callback(reply)
                return command
        raise AssertionError(f"no {name} waiting")


class Factory:
    """A fake connection factory holding one fake connection; never connects."""

    def __init__(self, conn: TailConnection) -> None:
        self.pool = [conn]
        self.stopped = False

    def startConnecting(self, endpoint: Any) -> None:
        pass

    def disconnect(self) -> Deferred[None]:
        return succeed(None)


def entry(event_id: str, channel: str = PATTERNS, **data: Any) -> list[Any]:
    body = {"symbol": "AAPL", "pattern": "Doji", "confidence": 0.9, **data}
    return [event_id.encode(), [b"c", channel.encode(), b"t", b"pattern_detected",
                                b"d", orjson.dumps(body)]]


def no_marks() -> list[bytes]:
    return [b""] * len(TOPIC_NAMES)


def started(clock: Clock, last: bytes | None = b"5-0") -> tuple[
        RedisHistory, RecordingLink, TailConnection, list[Event]]:
    """A history whose tail is positioned at C{last} and waits in its first XREAD."""
    link, conn = RecordingLink(), TailConnection()
    history = RedisHistory(clock, ADDRESS, link, 10, 60, 10)  # type: ignore[arg-type]
    history._redis._make_factory = lambda: Factory(conn)
    delivered: list[Event] = []
    history.listen(delivered.append)
    history.startService()
    clock.advance(0)
    assert conn.answer("GET", last) == ("GET", LAST_KEY)
    clock.advance(0)
    return history, link, conn, delivered


def xread(*streams: tuple[str, list[list[Any]]]) -> list[Any]:
    return [[(PREFIX + topic).encode(), entries] for topic, entries in streams]


def test_a_read_waits_for_the_store_calls_sent_before_it_and_hands_on_stored_events():
    """
    A tail read that returns while a store call is unanswered is taken once
    the call answers; the event this daemon stored is then handed on as the
    same object (not decoded again), and another daemon's event is decoded.
    """
    clock = Clock()
    history, link, conn, delivered = started(clock)
    mine = parse_event(PATTERNS, orjson.dumps({"symbol": "MSFT", "pattern": "Doji",
                                               "confidence": 0.5}), EventIds().next(1.0), 1.0)
    history.append(mine)
    clock.advance(0)
    assert len(link.calls) == 1
    conn.answer("XREAD", xread(("patterns", [entry("5-1"), entry("5-2", symbol="MSFT")])))
    conn.answer("EVALSHA", no_marks())
    clock.advance(1)
    assert delivered == [], "the read waits for the store call"
    link.calls[0].callback([1, b"5-2"])
    assert [e.id for e in delivered] == ["5-1", "5-2"]
    assert delivered[1] is mine and delivered[0].symbol == "AAPL"
    assert history.position == "5-2" and history._stored == {}
    history.stopService()


def test_events_are_delivered_in_id_order_across_topics_and_a_cut_stream_holds_later_ones(
        monkeypatch: pytest.MonkeyPatch):
    """
    One read's streams are merged in id order. A stream cut short by COUNT
    (here 2) may have older entries than another stream's newest, so events
    after its last one are held, and the next read does not block.
    """
    monkeypatch.setattr(tailer, "TAIL_COUNT", 2)
    clock = Clock()
    history, _, conn, delivered = started(clock)
    read = conn.answer("XREAD", xread(
        ("patterns", [entry("5-1"), entry("5-3")]),
        ("health", [entry("5-2", HEALTH, service="s", status="ok"),
                    entry("5-6", HEALTH, service="s", status="ok")]),
    ))
    assert "BLOCK" in read
    conn.answer("EVALSHA", no_marks())
    clock.advance(0)
    assert [e.id for e in delivered] == ["5-1", "5-2", "5-3"]
    assert history.status()["held"] == 1
    read = conn.answer("XREAD", xread(("patterns", [entry("5-4")])))
    assert "BLOCK" not in read, "held events: the next read returns at once"
    conn.answer("EVALSHA", no_marks())
    clock.advance(0)
    assert [e.id for e in delivered] == ["5-1", "5-2", "5-3", "5-4", "5-6"]
    assert [e.topic for e in delivered] == ["patterns", "health", "patterns", "patterns", "health"]
    history.stopService()


def test_a_drop_mark_before_the_first_entry_read_tells_the_topic_s_listeners():
    """
    A drop mark newer than where the read started but older than the first
    entry it returned: trimming passed the tail, so the gap listeners hear
    of that topic (and only it).
    """
    clock = Clock()
    history, _, conn, delivered = started(clock)
    gaps: list[str] = []
    history.on_gap(gaps.append)
    conn.answer("XREAD", xread(("patterns", [entry("5-9")]), ("health", [])))
    marks = no_marks()
    marks[TOPIC_NAMES.index("patterns")] = b"5-7"
    conn.answer("EVALSHA", marks)
    clock.advance(0)
    assert gaps == ["patterns"] and history.status()["gaps"] == 1
    assert [e.id for e in delivered] == ["5-9"], "what was read is still delivered"
    history.stopService()


def test_a_read_with_no_reply_in_time_aborts_its_connection():
    """The watchdog: no reply within the block time and the read timeout."""
    clock = Clock()
    history, _, conn, _ = started(clock)
    clock.advance(tailer.TAIL_BLOCK_MS / 1000 + 5.0 - 0.01)
    assert not conn.transport.aborted
    clock.advance(0.02)
    assert conn.transport.aborted
    history.stopService()
