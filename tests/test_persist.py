"""
Unit tests of L{tickstock.persist.Persister} behind L{IStore}, with Clock for
time and a real spool folder (pytest's tmp_path).

The store is a fake: L{RecordingStore} keeps bar parts and events as the
real stores do (a part replaces its earlier version, an event id is stored
once) and can be told to fail or hang. The PostgreSQL store's own semantics
are tested against a real server elsewhere; L{combine} here mirrors its rule
for turning parts into a bar.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tickstock.bars import BarAggregator
from tickstock.events import Event
from tickstock.normalize import parse_event
from tickstock.interfaces import IStore
from tickstock.persist import STOP_TIMEOUT, Persister
from tickstock.store import Bar, StoreUnavailable

M = 1_700_000_040
Key = tuple[str, int]
Ohlcv = tuple[float, float, float, float, float, int]


@implementer(IStore)
class RecordingStore:
    """
    A fake store: records each write, keeps the latest version of each part
    and each event id once. C{mode} is C{"ok"}, C{"fail"} (fails at once with
    L{StoreUnavailable}) or C{"hang"} (never answers unless the test fires
    the Deferred kept in C{hanging}).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.ready = True
        self.calls: list[tuple[list[Bar], list[Event]]] = []
        self.parts: dict[str, Bar] = {}
        self.events: dict[str, Event] = {}
        self.hanging: list[Deferred[None]] = []

    def write(self, bars: Iterable[Bar], events: Iterable[Event]) -> Deferred[None]:
        bars, events = list(bars), list(events)
        self.calls.append((bars, events))
        if self.mode == "fail":
            return fail(StoreUnavailable("down"))
        if self.mode == "hang":
            d: Deferred[None] = Deferred()
            self.hanging.append(d)
            d.addCallback(lambda _: self._keep(bars, events))
            return d
        self._keep(bars, events)
        return succeed(None)

    def _keep(self, bars: list[Bar], events: list[Event]) -> None:
        for bar in bars:
            self.parts[bar.part] = bar
        for event in events:
            self.events.setdefault(event.id, event)

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


def tick(symbol: str, price: float, volume: float, timestamp: float) -> Event:
    """A tick event, parsed as the router parses one."""
    raw = orjson.dumps({"symbol": symbol, "price": price, "volume": volume,
                        "timestamp": timestamp})
    return parse_event("tickstock.data.ticks", raw, "", 0.0)


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
    verifyObject(IStore, RecordingStore())


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
        else:
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
