"""
Unit tests of L{tickstock.store.bars.BarAggregator} alone: no store, no clock, no
fakes; expected bars are computed by hand.
"""

from __future__ import annotations

from tickstock.domain.records import Bar
from tickstock.store.bars import BarAggregator

M = 1_700_000_040
"""A minute start (a multiple of 60)."""


def by_key(bars: list[Bar]) -> dict[tuple[str, int], Bar]:
    return {(bar.symbol, bar.minute): bar for bar in bars}


def ohlcv(bar: Bar) -> tuple[float, float, float, float, float, float, float, int]:
    return (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.open_ts, bar.close_ts,
            bar.ticks)


def test_exact_ohlcv_out_of_order_with_ties():
    """
    Two symbols over two minutes, ticks out of order: open is the price at the
    smallest timestamp (the first to arrive on a tie), close the price at the
    largest (the last to arrive on a tie), volume and ticks add up, and a
    late tick for an earlier minute goes to that minute.
    """
    bars = BarAggregator("n1:r1")
    ticks = [
        ("AAA", 10.0, 100, M + 5),
        ("BBB", 100.0, 1, M + 10),
        ("AAA", 11.0, 50, M + 2),     # earlier: the new open
        ("AAA", 9.5, 10, M + 2),      # same time as the open: arrived later, not the open
        ("BBB", 101.0, 2, M + 10),    # same time as the close: arrived later, the close
        ("AAA", 8.0, 7, M + 61),      # the next minute
        ("AAA", 10.5, 5, M + 30),     # late for minute M
        ("BBB", 99.0, 3, M + 70),
        ("AAA", 12.0, 1, M + 30),     # tie with the close: arrived later, the close
        ("BBB", 102.0, 4, M + 9),     # earlier: the new open and high
        ("AAA", 9.0, 3, M + 59.5),    # the latest in minute M: the close
    ]
    for tick in ticks:
        bars.add(*tick)
    taken, _ = bars.take_dirty()
    got = by_key(taken)
    assert set(got) == {("AAA", M), ("AAA", M + 60), ("BBB", M), ("BBB", M + 60)}
    assert ohlcv(got["AAA", M]) == (11.0, 12.0, 9.0, 9.0, 169, M + 2, M + 59.5, 6)
    assert ohlcv(got["AAA", M + 60]) == (8.0, 8.0, 8.0, 8.0, 7, M + 61, M + 61, 1)
    assert ohlcv(got["BBB", M]) == (102.0, 102.0, 100.0, 101.0, 7, M + 9, M + 10, 3)
    assert ohlcv(got["BBB", M + 60]) == (99.0, 99.0, 99.0, 99.0, 3, M + 70, M + 70, 1)
    parts = [bar.part for bar in taken]
    assert len(set(parts)) == 4
    assert all(part.startswith("n1:r1:") for part in parts)


def test_part_ids_sort_in_creation_order():
    """
    Part ids end in a zero-padded counter, so that the store's tie-break by
    part name follows arrival order within a run.
    """
    bars = BarAggregator("p")
    for i in range(12):
        bars.add("AAA", 1.0, 1, M + 60 * i)
    parts = [bar.part for bar in sorted(bars.take_dirty()[0], key=lambda b: b.minute)]
    assert parts == sorted(parts)
    assert parts[0] == "p:0000000001"


def test_add_reports_when_an_aggregate_becomes_dirty():
    """add() is true only for the tick that makes an aggregate dirty."""
    bars = BarAggregator("p")
    assert bars.add("AAA", 1.0, 1, M)
    assert not bars.add("AAA", 2.0, 1, M + 1)
    assert bars.add("BBB", 1.0, 1, M)
    assert bars.dirty_count == 2
    bars.take_dirty()
    assert bars.dirty_count == 0
    assert bars.add("AAA", 3.0, 1, M + 2)
    assert not bars.add("AAA", 3.0, 1, M + 3)


def test_take_written_failed():
    """
    A bar is clean only once a write of its latest version succeeded: taken
    bars are in flight, a failed write makes them dirty again, and a success
    for an older version leaves newer ticks dirty.
    """
    bars = BarAggregator("p")
    bars.add("AAA", 1.0, 1, M)
    first, token = bars.take_dirty()
    assert [b.ticks for b in first] == [1]
    assert bars.take_dirty()[0] == []

    bars.failed(token)
    again, token = bars.take_dirty()
    assert again == first

    bars.add("AAA", 2.0, 1, M + 1)
    bars.written(token)
    newer, token2 = bars.take_dirty()
    assert [(b.ticks, b.part) for b in newer] == [(2, first[0].part)]
    bars.written(token2)
    assert bars.take_dirty()[0] == []

    bars.add("AAA", 3.0, 1, M + 2)
    _, token3 = bars.take_dirty()
    bars.add("AAA", 4.0, 1, M + 3)
    _, token4 = bars.take_dirty()
    bars.failed(token4)
    bars.written(token3)
    retried, _ = bars.take_dirty()
    assert [b.ticks for b in retried] == [4]


def test_evict_only_clean_and_old():
    """
    evict() forgets clean aggregates of earlier minutes only: dirty and
    in-flight ones, and those of later minutes, stay.
    """
    bars = BarAggregator("p")
    bars.add("CLEAN", 1.0, 1, M)
    bars.add("LATER", 1.0, 1, M + 60)
    _, token = bars.take_dirty()
    bars.written(token)
    bars.add("FLIGHT", 1.0, 1, M)
    _, in_flight = bars.take_dirty()
    bars.add("DIRTY", 1.0, 1, M)

    assert bars.evict(M + 60) == 1
    assert len(bars) == 3
    bars.failed(in_flight)
    assert bars.evict(M + 60) == 0
    assert {b.symbol for b in bars.take_dirty()[0]} == {"FLIGHT", "DIRTY"}


def test_late_tick_after_eviction_starts_a_new_part():
    """
    A tick for a minute whose aggregate was evicted starts a new part with
    only that tick; the old part is untouched.
    """
    bars = BarAggregator("p")
    bars.add("AAA", 10.0, 5, M + 1)
    bars.add("AAA", 11.0, 5, M + 2)
    old, token = bars.take_dirty()
    bars.written(token)
    assert bars.evict(M + 60) == 1
    assert len(bars) == 0

    bars.add("AAA", 9.0, 1, M + 50)
    new, _ = bars.take_dirty()
    assert len(new) == 1
    assert new[0].part != old[0].part
    assert ohlcv(new[0]) == (9.0, 9.0, 9.0, 9.0, 1, M + 50, M + 50, 1)


def test_oldest_and_forget():
    """
    oldest() picks dirty aggregates by minute without changing them; forget()
    drops them, even one in flight, whose failed write then does not bring
    it back; the next tick of its minute starts a new part.
    """
    bars = BarAggregator("p")
    bars.add("AAA", 1.0, 1, M + 120)
    bars.add("AAA", 1.0, 1, M)
    bars.add("BBB", 1.0, 1, M + 60)
    _, in_flight = bars.take_dirty()
    bars.add("AAA", 2.0, 1, M + 1)

    picked, taken = bars.oldest(1)
    assert [(b.symbol, b.minute, b.ticks) for b in picked] == [("AAA", M, 2)]
    assert bars.dirty_count == 1
    assert bars.oldest(5, before_minute=M)[0] == []
    bars.forget(taken)
    assert bars.dirty_count == 0
    bars.failed(in_flight)
    assert {(b.symbol, b.minute) for b in bars.take_dirty()[0]} == {
        ("AAA", M + 120), ("BBB", M + 60)}

    bars.add("AAA", 3.0, 1, M + 2)
    (late,), _ = bars.take_dirty()
    assert late.part != picked[0].part
    assert late.ticks == 1
