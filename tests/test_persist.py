"""
Unit tests of L{tickstock.store.persist.Persister} behind L{ITickMarks} (the store
interface with tick marks), with Clock for time and a real spool folder
(pytest's tmp_path).

The store is a fake: L{RecordingStore} keeps bar parts, events and tick
marks as the real stores do (a part replaces an earlier version with no more
ticks, an event id is stored once, a mark only rises) and can be told to
fail or hang. The PostgreSQL store's own semantics are tested against a real
server elsewhere; L{combine} here mirrors its rule for turning parts into a
bar. L{Stream} is a fake too: it stands in for the stream source.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tickstock.domain.events import Event
from tickstock.domain.interfaces import ITickMarks
from tickstock.domain.records import Bar
from tickstock.ingest.normalize import parse_event
from tickstock.store import StoreUnavailable, persist
from tickstock.store.bars import BarAggregator
from tickstock.store.memory import MemoryStore
from tickstock.store.persist import STOP_TIMEOUT, Persister

M = 1_700_000_040
Key = tuple[str, int]
Ohlcv = tuple[float, float, float, float, float, int]
Marks = tuple[str, dict[str, tuple[int, int]]]


@implementer(ITickMarks)
class RecordingStore:
    """
    A fake store: records each write (and its marks, in C{marked}), keeps
    the latest version of each part, each event id once and each node's
    marks, raised only. C{mode} is C{"ok"}, C{"fail"} (fails at once with
    L{StoreUnavailable}) or C{"hang"} (never answers unless the test fires
    the Deferred kept in C{hanging}; C{commits} apply such a write without
    answering, as a server does for a client that died meanwhile).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.ready = True
        self.calls: list[tuple[list[Bar], list[Event]]] = []
        self.marked: list[Marks | None] = []
        self.parts: dict[str, Bar] = {}
        self.events: dict[str, Event] = {}
        self.marks: dict[str, dict[str, tuple[int, int]]] = {}
        self.hanging: list[Deferred[None]] = []
        self.commits: list[Callable[[], None]] = []

    def write(self, bars: Iterable[Bar], events: Iterable[Event],
              marks: Marks | None = None) -> Deferred[None]:
        bars, events = list(bars), list(events)
        self.calls.append((bars, events))
        self.marked.append(marks)
        if self.mode == "fail":
            return fail(StoreUnavailable("down"))
        if self.mode == "hang":
            d: Deferred[None] = Deferred()
            self.hanging.append(d)
            self.commits.append(lambda: self._keep(bars, events, marks))
            d.addCallback(lambda _: self._keep(bars, events, marks))
            return d
        self._keep(bars, events, marks)
        return succeed(None)

    def tick_marks(self, node: str) -> Deferred[dict[str, tuple[int, int]]]:
        if self.mode == "fail":
            return fail(StoreUnavailable("down"))
        return succeed(dict(self.marks.get(node, {})))

    def _keep(self, bars: list[Bar], events: list[Event], marks: Marks | None) -> None:
        for bar in bars:
            known = self.parts.get(bar.part)
            if known is None or known.ticks <= bar.ticks:
                self.parts[bar.part] = bar
        for event in events:
            self.events.setdefault(event.id, event)
        if marks is not None:
            kept = self.marks.setdefault(marks[0], {})
            for symbol, key in marks[1].items():
                kept[symbol] = max(key, kept.get(symbol, (0, 0)))

    def status(self) -> dict[str, Any]:
        return {"state": self.mode}

    def events_after(self, topic: Any, after: Any, until: Any, symbols: Any,
                     limit: Any) -> Deferred[Any]:
        return succeed([])

    def patterns(self, query: Any) -> Deferred[Any]:
        return succeed([])

    def symbols(self) -> Deferred[Any]:
        return succeed([])

    def ohlcv(self, symbol: Any, since: Any, until: Any, limit: Any) -> Deferred[Any]:
        return succeed([])

    def universes(self) -> Deferred[Any]:
        return succeed([])

    def universe(self, key: Any) -> Deferred[Any]:
        return succeed(None)


def tick(symbol: str, price: float, volume: float, timestamp: float,
         event_id: str = "") -> Event:
    """A tick event, parsed as the router parses one."""
    raw = orjson.dumps({"symbol": symbol, "price": price, "volume": volume,
                        "timestamp": timestamp})
    return parse_event("tickstock.data.ticks", raw, event_id, 0.0)


def pattern(n: int) -> Event:
    """A stored-topic event with id C{n}-0."""
    raw = orjson.dumps({"symbol": "AAA", "pattern": "Doji", "confidence": 0.5,
                        "timestamp": M + n, "n": n})
    return parse_event("tickstock.events.patterns", raw, f"{n}-0", 0.0)


def combine(parts: Iterable[Bar]) -> dict[Key, Ohlcv]:
    """
    Bars from parts by the stores' rule: open of the part with the smallest
    (open_ts, part), close of the largest (close_ts, part), high/low of all,
    volume and ticks summed.
    """
    grouped: dict[Key, list[Bar]] = {}
    for part in parts:
        grouped.setdefault((part.symbol, part.minute), []).append(part)
    return {
        key: (
            min(ps, key=lambda p: (p.open_ts, p.part)).open,
            max(p.high for p in ps),
            min(p.low for p in ps),
            max(ps, key=lambda p: (p.close_ts, p.part)).close,
            sum(p.volume for p in ps),
            sum(p.ticks for p in ps),
        )
        for key, ps in grouped.items()
    }


def reference(ticks: Iterable[tuple[str, float, float, float]]) -> dict[Key, Ohlcv]:
    """Bars from all ticks at once, in arrival order, straight from the definition."""
    grouped: dict[Key, list[tuple[str, float, float, float]]] = {}
    for t in ticks:
        grouped.setdefault((t[0], int(t[3] // 60) * 60), []).append(t)
    result = {}
    for key, ts in grouped.items():
        first = min(ts, key=lambda t: t[3])            # min() keeps the first of ties
        last = max(reversed(ts), key=lambda t: t[3])   # so reversed: the last of ties
        result[key] = (first[1], max(t[1] for t in ts), min(t[1] for t in ts), last[1],
                       sum(t[2] for t in ts), len(ts))
    return result


def spool_names(path: Any) -> list[str]:
    return sorted(os.listdir(path))


def make(clock: Clock, store: RecordingStore, spool: Any, prefix: str = "n1:r1",
         pending_max: int = 1000) -> Persister:
    persister = Persister(clock, store, prefix, flush_interval=1.0, pending_max=pending_max,
                          spool_dir=str(spool))
    persister.startService()
    return persister


def stop(clock: Clock, persister: Persister) -> None:
    """Stop, letting the clock run out the stop timeout if need be."""
    d = persister.stopService()
    clock.advance(STOP_TIMEOUT)
    assert d.called
    assert clock.getDelayedCalls() == []


def test_fake_store_provides_istore():
    """The fake store provides every method of the interface it stands in for."""
    verifyObject(ITickMarks, RecordingStore())


def test_flush_writes_one_batch_per_interval(tmp_path):
    """
    Nothing is written before the first interval; then one write carries
    every changed bar and every waiting event, and a quiet interval writes
    nothing.
    """
    clock, store = Clock(), RecordingStore()
    persister = make(clock, store, tmp_path)
    persister.add_tick(tick("AAA", 10.0, 1, M + 1))
    persister.add_tick(tick("AAA", 11.0, 2, M + 2))
    persister.add_tick(tick("BBB", 5.0, 3, M + 3))
    persister.add_event(pattern(1))
    assert store.calls == []
    assert persister.pending == 3

    clock.advance(1.0)
    assert len(store.calls) == 1
    bars, events = store.calls[0]
    assert sorted(b.symbol for b in bars) == ["AAA", "BBB"]
    assert [e.id for e in events] == ["1-0"]
    assert persister.pending == 0

    clock.advance(1.0)
    assert len(store.calls) == 1
    status = persister.status()
    assert orjson.loads(orjson.dumps(status)) == status
    assert status == {"state": "ok", "ticks": 3, "bars_written": 2, "events_written": 1,
                      "write_failures": 0, "spilled": 0, "spool_files": 0, "pending": 0,
                      "in_flight": 0, "last_error": None}
    stop(clock, persister)


def test_failed_writes_are_spilled_and_logged_once(tmp_path):
    """
    A write that fails spills what it held to the spool at once (fsynced:
    durable, so what it came from may be acknowledged); failures are
    counted and logged once for the outage; when the store is back, the
    spool is written back and every tick and event arrives.
    """
    clock, store = Clock(), RecordingStore()
    persister = make(clock, store, tmp_path)
    ticks = [("AAA", 10.0, 1, M + 1), ("AAA", 12.0, 1, M + 5), ("BBB", 3.0, 2, M + 70)]
    store.mode = "fail"
    durable = []
    with capturedLogs() as logs:
        persister.add_tick(tick(*ticks[0]))
        persister.add_event(pattern(1))
        persister.when_durable(persister.generation).addCallback(durable.append)
        clock.advance(1.0)
        assert durable == [None] and persister.pending == 0 and persister.spilled == 2
        persister.add_tick(tick(*ticks[1]))
        clock.advance(1.0)
        persister.add_tick(tick(*ticks[2]))
        persister.add_event(pattern(2))
        clock.advance(1.0)
        assert persister.write_failures == 3
        assert persister.status()["state"] == "failing"
        assert "StoreUnavailable" in (persister.last_error or "")
        assert persister.pending == 0 and persister.spool_files == 5  # bars, events apart

        store.mode = "ok"
        for _ in range(6):  # one spool file per interval
            clock.advance(1.0)
    assert [log["log_format"].split(" (")[0] for log in logs] == [
        "store writes failing", "spilling unwritten bars and events to {dir}",
        "store writes work again after {n} failed", "spool written back; {dir} is empty"]
    assert combine(store.parts.values()) == reference(ticks)
    assert sorted(store.events) == ["1-0", "2-0"]
    assert persister.status()["state"] == "ok"
    assert persister.pending == 0
    stop(clock, persister)


def test_at_most_one_write_in_flight(tmp_path):
    """
    While a write hangs, later intervals start no other write; ticks that
    arrive meanwhile go in the next one, and a part's newer version replaces
    the older.
    """
    clock, store = Clock(), RecordingStore()
    persister = make(clock, store, tmp_path)
    store.mode = "hang"
    persister.add_tick(tick("AAA", 10.0, 1, M + 1))
    clock.advance(1.0)
    persister.add_tick(tick("AAA", 11.0, 1, M + 2))
    clock.advance(5.0)
    assert len(store.calls) == 1
    assert persister.status()["in_flight"] == 1
    assert persister.pending == 1

    store.mode = "ok"
    store.hanging[0].callback(None)
    clock.advance(1.0)
    assert len(store.calls) == 2
    assert [b.ticks for b in store.calls[1][0]] == [2]
    assert combine(store.parts.values()) == reference(
        [("AAA", 10.0, 1, M + 1), ("AAA", 11.0, 1, M + 2)])
    stop(clock, persister)


def test_eviction_and_late_tick(tmp_path):
    """
    Written aggregates more than two minutes older than the newest minute
    leave memory; a late tick for such a minute becomes a new part, and the
    bar combined from both parts is right.
    """
    clock, store = Clock(), RecordingStore()
    persister = make(clock, store, tmp_path)
    bars = persister._bars
    ticks = [("AAA", 10.0, 1, M + 1), ("AAA", 9.0, 1, M + 2), ("AAA", 20.0, 1, M + 185)]
    for t in ticks[:2]:
        persister.add_tick(tick(*t))
    clock.advance(1.0)
    persister.add_tick(tick(*ticks[2]))
    clock.advance(1.0)
    clock.advance(1.0)
    assert len(bars) == 1
    late = ("AAA", 8.0, 1, M + 0.5)
    persister.add_tick(tick(*late))
    clock.advance(1.0)
    assert len({p.part for p in store.parts.values() if p.minute == M}) == 2
    assert combine(store.parts.values()) == reference([*ticks, late])
    stop(clock, persister)


def read_spool(path: Any) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(part, minute, ticks) of the bars and the ids of the events in one spool file."""
    bars, events = [], []
    for line in path.read_bytes().splitlines():
        item = orjson.loads(line)
        if "bar" in item:
            bars.append((item["bar"]["part"], item["bar"]["minute"], item["bar"]["ticks"]))
        elif "event" in item:
            events.append(item["event"]["id"])
    return bars, events


def test_spill_then_write_back_in_order(tmp_path):
    """
    Past pending_max the oldest are spilled (closed minutes' bars, then
    events, then newer bars) to whole files, and memory stays bounded; a
    failed write spills the rest. Once the store is back, one file is
    written per interval, oldest first, each deleted after its write.
    Everything arrives as if nothing had been spilled.
    """
    clock, store = Clock(), RecordingStore()
    persister = make(clock, store, tmp_path, pending_max=6)
    store.mode = "fail"
    ticks = []
    for i in range(30):
        t = (f"S{i % 4}", 10.0 + i % 7, 1, M + 17 * i)
        ticks.append(t)
        persister.add_tick(tick(*t))
        if i % 3 == 0:
            persister.add_event(pattern(i))
        assert persister.pending <= 6
        if i % 10 == 9:
            clock.advance(1.0)
    names = spool_names(tmp_path)
    assert names and all(n.endswith("-n1_r1.jsonl") for n in names)
    assert persister.spool_files == len(names)
    assert persister.spilled == sum(
        len(b) + len(e) for b, e in (read_spool(tmp_path / n) for n in names))
    contents = [read_spool(tmp_path / n) for n in names]
    for bars, _ in contents:
        assert [minute for _, minute, _ in bars] == sorted(minute for _, minute, _ in bars)
    assert persister.status()["state"] == "failing"

    store.mode = "ok"
    calls = len(store.calls)
    clock.advance(1.0)
    for written in range(1, len(names) + 1):
        assert spool_names(tmp_path) == names[written:]
        spooled_bars, spooled_events = contents[written - 1]
        bars, events = store.calls[calls + written - 1]
        assert [(b.part, b.minute, b.ticks) for b in bars] == spooled_bars
        assert [e.id for e in events] == spooled_events
        if written < len(names):
            assert persister.status()["state"] == "backlog"
            clock.advance(1.0)
    assert persister.spool_files == 0
    assert persister.status()["state"] == "ok"
    assert combine(store.parts.values()) == reference(ticks)
    assert sorted(store.events) == sorted(f"{i}-0" for i in range(0, 30, 3))
    stop(clock, persister)


def test_restart_picks_up_spool_files(tmp_path):
    """
    A stop while the store is down spills everything; a new Persister on the
    same folder (a new run, a new part prefix) writes those files back, and
    its spool files sort after the old ones.
    """
    clock, store = Clock(), RecordingStore()
    first = make(clock, store, tmp_path, prefix="n1:r1", pending_max=4)
    store.mode = "fail"
    ticks = [(f"S{i % 3}", float(i % 5 + 1), 2, M + 11 * i) for i in range(20)]
    for t in ticks[:15]:
        first.add_tick(tick(*t))
    first.add_event(pattern(1))
    stop(clock, first)
    assert first.pending == 0
    left = spool_names(tmp_path)
    assert left

    second = make(clock, store, tmp_path, prefix="n1:r2", pending_max=4)
    assert second.spool_files == len(left)
    for t in ticks[15:]:
        second.add_tick(tick(*t))
    assert spool_names(tmp_path)[: len(left)] == left
    store.mode = "ok"
    for _ in range(20):
        clock.advance(1.0)
    assert spool_names(tmp_path) == []
    assert combine(store.parts.values()) == reference(ticks)
    assert list(store.events) == ["1-0"]
    stop(clock, second)


def test_stop_spills_what_a_hung_write_holds(tmp_path):
    """
    stopService waits for the last write at most the stop timeout (on the
    clock), cancels it, and spills all it holds, in flight or not.
    """
    clock, store = Clock(), RecordingStore()
    persister = make(clock, store, tmp_path)
    store.mode = "hang"
    ticks = [("AAA", 10.0, 1, M + 1), ("AAA", 11.0, 1, M + 2)]
    persister.add_tick(tick(*ticks[0]))
    persister.add_event(pattern(1))
    clock.advance(1.0)
    persister.add_tick(tick(*ticks[1]))
    d = persister.stopService()
    clock.advance(STOP_TIMEOUT - 0.1)
    assert not d.called
    clock.advance(0.1)
    assert d.called
    assert store.hanging[0].called
    assert store.parts == {}
    assert clock.getDelayedCalls() == []
    names = spool_names(tmp_path)
    assert len(names) >= 1
    spooled = [read_spool(tmp_path / n) for n in names]
    assert [b[2] for s in spooled for b in s[0]] == [2]
    assert [e for s in spooled for e in s[1]] == ["1-0"]


def test_stop_writes_last_batch(tmp_path):
    """A clean stop with a working store writes what is left and spills nothing."""
    clock, store = Clock(), RecordingStore()
    persister = make(clock, store, tmp_path)
    persister.add_tick(tick("AAA", 10.0, 1, M + 1))
    persister.add_event(pattern(1))
    d = persister.stopService()
    assert d.called
    assert len(store.calls) == 1
    assert spool_names(tmp_path) == []
    assert clock.getDelayedCalls() == []


def test_unreadable_spool_file_is_set_aside(tmp_path):
    """
    A spool file that does not parse is renamed to .bad and logged rather
    than retried forever; temp files (a spill cut short) are ignored.
    """
    (tmp_path / "000000000001-x.jsonl").write_bytes(b'{"bar": {"symbol": \n')
    (tmp_path / ".abc.tmp").write_bytes(b'{"bar"')
    clock, store = Clock(), RecordingStore()
    persister = make(clock, store, tmp_path)
    assert persister.spool_files == 1
    with capturedLogs() as logs:
        clock.advance(1.0)
    assert spool_names(tmp_path) == [".abc.tmp", "000000000001-x.jsonl.bad"]
    assert persister.spool_files == 0
    assert "unreadable spool file" in (persister.last_error or "")
    assert any(log["log_level"].name == "error" for log in logs)
    stop(clock, persister)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.sampled_from(["AAA", "BBB"]),
                  st.sampled_from([1.0, 2.0, 3.0, 4.0]), st.integers(0, 5),
                  st.integers(0, 32).map(lambda n: M + n * 7.5)),
        st.tuples(st.just("event")),
        st.tuples(st.just("flush"), st.sampled_from(["ok", "fail", "hang"])),
        st.tuples(st.just("restart")),
    ),
    max_size=80,
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations, st.integers(2, 8))
def test_property_parts_combine_to_the_bars_of_all_ticks(tmp_path_factory, ops, pending_max):
    """
    For any ticks (out of order, with ties, over several minutes) split by
    failing, hanging and working writes, spills and restarts, the parts the
    store ends up with combine to exactly the bars of all ticks at once, and
    every event arrives.
    """
    spool = tmp_path_factory.mktemp("spool")
    clock, store = Clock(), RecordingStore()
    run = 0
    persister = make(clock, store, spool, prefix=f"r{run:03d}", pending_max=pending_max)
    ticks, events = [], []
    for op in ops:
        if op[0] == "tick":
            ticks.append(op[1:])
            persister.add_tick(tick(*op[1:]))
        elif op[0] == "event":
            events.append(pattern(len(events) + 1))
            persister.add_event(events[-1])
        elif op[0] == "flush":
            for hung in store.hanging:
                if not hung.called:
                    hung.callback(None)
            store.mode = op[1]
            clock.advance(1.0)
        else:
            store.mode = "fail"
            stop(clock, persister)
            run += 1
            persister = make(clock, store, spool, prefix=f"r{run:03d}", pending_max=pending_max)
    for hung in store.hanging:
        if not hung.called:
            hung.callback(None)
    store.mode = "ok"
    for _ in range(len(ops) + 5):
        clock.advance(1.0)
    stop(clock, persister)
    assert os.listdir(spool) == []
    assert combine(store.parts.values()) == reference(ticks)
    assert sorted(store.events) == sorted(e.id for e in events)


def test_given_aggregator_is_used(tmp_path):
    """A Persister can be given its aggregator rather than a part prefix."""
    clock, store = Clock(), RecordingStore()
    bars = BarAggregator("mine")
    persister = Persister(clock, store, bars, 1.0, 100, str(tmp_path))
    persister.startService()
    persister.add_tick(tick("AAA", 1.0, 1, M))
    clock.advance(1.0)
    assert [b.part for b in store.calls[0][0]] == ["mine:0000000001"]
    stop(clock, persister)


# ---------------------------------------------------------------- sealing (streams)


def sealed(clock: Clock, store: RecordingStore, spool: Any, run: int = 1,
           pending_max: int = 1000) -> Persister:
    """A started persister of node n1 as a stream source uses it (run: its part prefix's)."""
    persister = Persister(clock, store, f"n1:{run}", 1.0, pending_max, str(spool), sealing=True)
    persister.startService()
    return persister


def kill(persister: Persister) -> None:
    """As kill -9: from now on it does nothing (what it awaits never resumes it)."""
    assert persister._loop is not None
    persister._loop.stop()


def aaa(n: int) -> Event:
    """AAA's tick number C{n}: id C{1000+n}-0, timestamps in one minute."""
    return tick("AAA", 10.0 + n % 7, n, M + n * 0.5, f"{1000 + n}-0")


def ohlcv(ns: Iterable[int]) -> dict[Key, Ohlcv]:
    return reference(("AAA", 10.0 + n % 7, n, M + n * 0.5) for n in ns)


def test_sealed_writes_carry_the_marks_of_their_ticks(tmp_path):
    """
    Each write carries, per symbol, the newest tick its parts hold; the
    store keeps the greatest; a write of events alone carries none.
    """
    clock, store = Clock(), RecordingStore()
    persister = sealed(clock, store, tmp_path)
    for n in (1, 2, 3):
        persister.add_tick(aaa(n))
    persister.add_tick(tick("BBB", 5.0, 1, M, "1002-5"))
    clock.advance(1.0)
    persister.add_event(pattern(1))
    clock.advance(1.0)
    assert store.marked == [("n1", {"AAA": (1003, 0), "BBB": (1002, 5)}), None]
    assert store.marks == {"n1": {"AAA": (1003, 0), "BBB": (1002, 5)}}
    stop(clock, persister)


def test_ticks_read_again_after_a_kill_are_counted_once(tmp_path):
    """
    The issue's failure: two writes made parts of ticks 1-10 and 11-20,
    durable but not acknowledged (Redis was down), then the daemon was
    killed. The next run reads them again from tick 6 (1-5 were
    acknowledged), with 21-25 after them, in one batch: it reads its marks
    first and folds only 21-25, so every bar is exact; before, 6-25 made a
    part t:6 beside t:1 and t:11.
    """
    clock, store = Clock(), RecordingStore()
    first = sealed(clock, store, tmp_path)
    for batch in (range(1, 11), range(11, 21)):
        for n in batch:
            first.add_tick(aaa(n))
        clock.advance(1.0)
    kill(first)

    second = sealed(clock, store, tmp_path, run=2)
    for n in range(6, 26):
        second.add_tick(aaa(n))
    clock.advance(1.0)
    assert second.ticks == 5
    assert sorted(store.parts) == [f"t:{1000 + n:013d}-{0:020d}" for n in (1, 11, 21)]
    assert combine(store.parts.values()) == ohlcv(range(1, 26))
    stop(clock, second)


def test_ticks_wait_for_the_marks(tmp_path):
    """
    Until the store answers with the marks, ticks are held: none is folded
    or written, and none is durable (so none acknowledged), events neither.
    Then those at or below the mark are dropped and the rest written.
    """
    clock, store = Clock(), RecordingStore()
    store.marks = {"n1": {"AAA": (1005, 0)}, "n2": {"AAA": (1009, 0)}}
    store.mode = "fail"
    persister = sealed(clock, store, tmp_path)
    durable: list[None] = []
    for n in range(3, 9):
        persister.add_tick(aaa(n))
    persister.add_event(pattern(1))
    persister.when_durable(persister.generation).addCallback(durable.append)
    clock.advance(1.0)
    assert (durable, store.calls, persister.ticks) == ([], [], 0)
    assert persister.status()["state"] == "backlog"
    assert "tick marks" in (persister.last_error or "")

    store.mode = "ok"
    clock.advance(1.0)
    assert durable == [None] and persister.ticks == 3
    assert combine(store.parts.values()) == ohlcv(range(6, 9))
    assert list(store.events) == ["1-0"]
    assert persister.status()["state"] == "ok"
    stop(clock, persister)


def test_a_stop_before_the_marks_came_makes_nothing_durable(tmp_path):
    """
    Stopped while the store never answered: the held ticks are dropped,
    not spilled (nothing acknowledged them: they are read again), events
    are spilled, and nothing is durable.
    """
    clock, store = Clock(), RecordingStore()
    store.mode = "fail"
    persister = sealed(clock, store, tmp_path)
    durable: list[None] = []
    persister.add_tick(aaa(1))
    persister.add_event(pattern(1))
    persister.when_durable(persister.generation).addCallback(durable.append)
    stop(clock, persister)
    assert durable == []
    spooled = [read_spool(tmp_path / n) for n in spool_names(tmp_path)]
    assert spooled == [([], ["1-0"])]


def test_spilled_ticks_count_as_marked(tmp_path):
    """
    The store down: a failed write spills all it had to one file headed by
    its marks (durable then). Killed, the next run reads the marks of the
    spool with the store's: ticks read again from 3 are folded from 11
    only, and the spool written back brings the store's marks up too.
    """
    clock, store = Clock(), RecordingStore()
    first = sealed(clock, store, tmp_path)
    store.mode = "fail"
    durable: list[None] = []
    for n in range(1, 11):
        first.add_tick(aaa(n))
    first.add_event(pattern(1))
    first.when_durable(first.generation).addCallback(durable.append)
    clock.advance(1.0)
    assert durable == [None]
    [name] = spool_names(tmp_path)
    lines = [orjson.loads(line) for line in (tmp_path / name).read_bytes().splitlines()]
    assert lines[0] == {"marks": {"node": "n1", "ticks": {"AAA": [1010, 0]}}}
    assert [next(iter(line)) for line in lines[1:]] == ["bar", "event"]
    kill(first)

    store.mode = "ok"
    second = sealed(clock, store, tmp_path, run=2)
    for n in range(3, 16):
        second.add_tick(aaa(n))
    clock.advance(1.0)
    clock.advance(1.0)
    assert spool_names(tmp_path) == [] and second.ticks == 5
    assert combine(store.parts.values()) == ohlcv(range(1, 16))
    assert store.marks == {"n1": {"AAA": (1015, 0)}}
    stop(clock, second)


def test_a_big_spool_file_is_written_back_in_chunks_marks_last(tmp_path, monkeypatch):
    """
    A spool file of more than SPOOL_FILE_ITEMS is written back that many at
    a time, its marks with the last chunk, and deleted after it; killed
    midway, the next run writes it back from its start: the same parts.
    """
    monkeypatch.setattr(persist, "SPOOL_FILE_ITEMS", 2)
    clock, store = Clock(), RecordingStore()
    first = sealed(clock, store, tmp_path)
    store.mode = "fail"
    symbols = ["A", "B", "C", "D", "E"]
    for n, symbol in enumerate(symbols):
        first.add_tick(tick(symbol, 1.0 + n, 1, M + n, f"2000-{n}"))
    clock.advance(1.0)
    assert len(spool_names(tmp_path)) == 1
    store.mode = "ok"
    store.calls.clear()
    store.marked.clear()
    clock.advance(1.0)
    assert [len(bars) for bars, _ in store.calls] == [2] and store.marked == [None]
    kill(first)

    second = sealed(clock, store, tmp_path, run=2)
    for _ in range(3):
        clock.advance(1.0)
    assert [len(bars) for bars, _ in store.calls] == [2, 2, 2, 1]
    assert store.marked[-1] == ("n1", {s: (2000, n) for n, s in enumerate(symbols)})
    assert store.marked[:-1] == [None] * 3
    assert spool_names(tmp_path) == [] and len(store.parts) == 5
    stop(clock, second)


def test_sealed_relief_spills_everything_at_once(tmp_path):
    """
    Past pending_max with sealing, everything unwritten is spilled in one
    file with its marks (partial spills would put parts on disk without
    marks that hold for all a symbol's ticks below them), except while a
    write is in flight.
    """
    clock, store = Clock(), RecordingStore()
    persister = sealed(clock, store, tmp_path, pending_max=3)
    store.mode = "hang"
    persister.add_tick(tick("A", 1.0, 1, M, "3000-0"))
    clock.advance(1.0)
    for n, symbol in enumerate("BCDE"):
        persister.add_tick(tick(symbol, 1.0, 1, M, f"3001-{n}"))
    assert spool_names(tmp_path) == [] and persister.pending == 4
    store.mode = "ok"
    store.hanging[0].callback(None)
    persister.add_tick(tick("F", 1.0, 1, M, "3002-0"))
    [name] = spool_names(tmp_path)
    assert persister.pending == 0
    bars, _ = read_spool(tmp_path / name)
    assert len(bars) == 5
    first = orjson.loads((tmp_path / name).read_bytes().splitlines()[0])
    assert sorted(first["marks"]["ticks"]) == list("BCDEF")
    stop(clock, persister)


class Stream:
    """
    A fake stream source: it acknowledges each tick once the persister's
    generation it went in is durable (at once if it added nothing), unless
    Redis is C{down}: then the acknowledgement fails, and the tick is read
    again once Redis is back. After a kill it hands the unacknowledged ticks
    to the next persister again, in order, with the ids they had.
    """

    def __init__(self) -> None:
        self.unacked: dict[str, Event] = {}
        self.run = 0
        self.down = False
        self.failed: list[Event] = []

    def deliver(self, persister: Persister, event: Event) -> None:
        added = persister.added
        persister.add_tick(event)
        if persister.added == added:
            self.unacked.pop(event.id, None)
            return
        self.unacked[event.id] = event
        run = self.run

        def ack(_: Any) -> None:
            if run != self.run:
                return
            if self.down:
                self.failed.append(event)
            else:
                self.unacked.pop(event.id, None)

        persister.when_durable(persister.generation).addCallback(ack)

    def redis(self, persister: Persister, up: bool) -> None:
        self.down = not up
        if up:
            failed, self.failed = self.failed, []
            for event in failed:
                self.deliver(persister, event)

    def restarted(self, persister: Persister) -> None:
        self.run += 1
        self.failed = []
        for event in list(self.unacked.values()):
            self.deliver(persister, event)


sealed_operations = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.sampled_from(["AAA", "BBB"]),
                  st.sampled_from([1.0, 2.0, 3.0]), st.integers(1, 5),
                  st.integers(0, 40).map(lambda n: M + n * 7.5)),
        st.tuples(st.just("flush"), st.sampled_from(["ok", "fail", "hang"])),
        st.tuples(st.just("redis"), st.booleans()),
        st.tuples(st.just("kill"), st.booleans()),
        st.tuples(st.just("restart")),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sealed_operations, st.integers(2, 8))
# Before the marks were kept: two parts, neither acknowledged, read again as one.
@example([("redis", False), ("tick", "AAA", 1.0, 1, M), ("flush", "ok"),
          ("tick", "AAA", 1.0, 1, M), ("flush", "ok"), ("kill", False)], 8)
def test_property_sealed_bars_are_exact_across_kills(tmp_path_factory, ops, pending_max):
    """
    For any ticks split by working, failing and hanging writes, spills,
    Redis down (acknowledgements fail: ticks durable but not acknowledged,
    read again), stops and kills (a hung write then committed or not, as a
    server may finish the statement of a client that died), each kill
    followed by a new run that gets every unacknowledged tick again: the
    parts combine to exactly the bars of all ticks, each counted once.
    """
    spool = tmp_path_factory.mktemp("spool")
    clock, store, stream = Clock(), RecordingStore(), Stream()
    run = 1
    persister = sealed(clock, store, spool, run, pending_max)
    ticks = []
    for op in ops:
        if op[0] == "tick":
            ticks.append(op[1:])
            stream.deliver(persister, tick(*op[1:], f"{5000 + len(ticks)}-0"))
        elif op[0] == "flush":
            store.mode = op[1]
            clock.advance(1.0)
        elif op[0] == "redis":
            stream.redis(persister, op[1])
        else:
            if op[0] == "kill":
                kill(persister)
                if op[1]:
                    for commit in store.commits:
                        commit()
            else:
                store.mode = "fail"
                stop(clock, persister)
            store.commits.clear()
            store.hanging.clear()
            run += 1
            persister = sealed(clock, store, spool, run, pending_max)
            stream.restarted(persister)
    for hung in store.hanging:
        if not hung.called:
            hung.callback(None)
    store.mode = "ok"
    stream.redis(persister, True)
    for _ in range(len(ops) + 5):
        clock.advance(1.0)
    stop(clock, persister)
    assert os.listdir(spool) == [] and stream.unacked == {}
    assert combine(store.parts.values()) == reference(ticks)


def test_the_memory_store_keeps_marks_like_postgresql():
    """The embedded store keeps each node's marks, and only raises them."""
    store = MemoryStore(Clock())
    verifyObject(ITickMarks, store)
    store.write([], [], ("n1", {"AAA": (5, 0), "BBB": (7, 1)}))
    store.write([], [], ("n1", {"AAA": (4, 9), "BBB": (7, 2)}))
    store.write([], [], ("n2", {"AAA": (1, 0)}))
    assert store.tick_marks("n1").result == {"AAA": (5, 0), "BBB": (7, 2)}
    assert store.tick_marks("n2").result == {"AAA": (1, 0)}
    assert store.tick_marks("n3").result == {}
