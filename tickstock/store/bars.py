"""
1-minute OHLCV bars built from ticks in memory, as parts (see
L{tickstock.store.Bar}): each aggregate is one part, written whole and
rewritten as it grows, so a retried write, a late tick or another node only
ever adds or replaces a part and the store's combination stays right.

L{BarAggregator.add} runs for every tick (50,000+ per second), so it works on
mutable slotted aggregates and a per-symbol shortcut to the current minute;
immutable L{Bar} snapshots are made only when bars are taken for a write.
"""

from __future__ import annotations

from tickstock.domain.records import Bar


class _Aggregate:
    """The mutable state of one part. C{ticks} doubles as its version."""

    __slots__ = (
        "symbol", "minute", "end", "open", "high", "low", "close", "volume",
        "open_ts", "close_ts", "ticks", "part", "dirty", "written", "gone",
    )

    def __init__(self, symbol: str, minute: int, part: str, price: float, volume: float,
                 timestamp: float) -> None:
        self.symbol = symbol
        self.minute = minute
        self.end = minute + 60
        self.open = self.high = self.low = self.close = price
        self.volume = volume
        self.open_ts = self.close_ts = timestamp
        self.ticks = 1
        self.part = part
        self.dirty = True
        self.written = 0
        self.gone = False

    def snapshot(self) -> Bar:
        return Bar(self.symbol, self.minute, self.open, self.high, self.low, self.close,
                   self.volume, self.open_ts, self.close_ts, self.ticks, self.part)


class Taken:
    """
    The versions of the aggregates in one batch of snapshots, opaque to
    callers: handed back to L{BarAggregator.written}, L{BarAggregator.failed}
    or L{BarAggregator.forget}.
    """

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[_Aggregate, int]]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)


class BarAggregator:
    """
    The in-memory aggregates of this run, and which of them changed since
    they were last taken for a write.

    An aggregate is I{dirty} when it has ticks no write has taken, I{in
    flight} when taken but not yet confirmed, and I{clean} once a write of
    its latest version succeeded; only clean ones may be forgotten by
    L{evict}, so nothing is dropped that the store does not have.

    @ivar part_prefix: the start of every part id made here; unique to this
        node and run, and best sorting after earlier runs' prefixes, since
        the store breaks C{open_ts}/C{close_ts} ties between parts by name.
    @ivar newest_minute: the latest minute any tick fell in (0 before any).
    @ivar sealing: each take seals what it took (L{seal}): a part then
        holds exactly the ticks of one write, and is named after the id of
        its first tick. Which ticks read again after a crash (stream entries
        not yet acknowledged) a part holds already, the persister's tick
        marks tell (L{tickstock.store.persist}): those are not added again.
    """

    def __init__(self, part_prefix: str, sealing: bool = False) -> None:
        self.part_prefix = part_prefix
        self.sealing = sealing
        self.newest_minute = 0
        self._count = 0
        self._minutes: dict[int, dict[str, _Aggregate]] = {}
        self._current: dict[str, _Aggregate] = {}
        self._dirty: list[_Aggregate] = []

    @property
    def dirty_count(self) -> int:
        """How many aggregates have ticks not yet taken for a write."""
        return len(self._dirty)

    def __len__(self) -> int:
        return sum(len(symbols) for symbols in self._minutes.values())

    def add(self, symbol: str, price: float, volume: float, timestamp: float,
            tick_id: str = "") -> bool:
        """
        Fold one tick into the aggregate of its symbol and minute.

        @param timestamp: the producer's, in epoch seconds; it picks the minute.
        @param tick_id: the tick's event id: with C{sealing}, a new part is
            named after it.
        @return: whether an aggregate became dirty (so the caller may check
            its memory bound only then).
        """
        agg = self._current.get(symbol)
        if agg is None or not agg.minute <= timestamp < agg.end:
            return self._add_slow(symbol, price, volume, timestamp, tick_id)
        _fold(agg, price, volume, timestamp)
        if agg.dirty:
            return False
        agg.dirty = True
        self._dirty.append(agg)
        return True

    def _add_slow(self, symbol: str, price: float, volume: float, timestamp: float,
                  tick_id: str) -> bool:
        minute = int(timestamp // 60) * 60
        symbols = self._minutes.get(minute)
        if symbols is None:
            symbols = self._minutes[minute] = {}
        agg = symbols.get(symbol)
        if agg is None:
            self._count += 1
            part = sealed_part(tick_id) if self.sealing \
                else f"{self.part_prefix}:{self._count:010d}"
            agg = _Aggregate(symbol, minute, part, price, volume, timestamp)
            symbols[symbol] = agg
            self._dirty.append(agg)
            if minute > self.newest_minute:
                self.newest_minute = minute
            changed = True
        else:
            _fold(agg, price, volume, timestamp)
            changed = not agg.dirty
            if changed:
                agg.dirty = True
                self._dirty.append(agg)
        current = self._current.get(symbol)
        if current is None or current.minute <= minute:
            self._current[symbol] = agg
        return changed

    def take_dirty(self) -> tuple[list[Bar], Taken]:
        """
        Snapshots of every dirty aggregate, for one write. They are in flight
        until that write's outcome is reported with L{written} or L{failed}.
        """
        dirty, self._dirty = self._dirty, []
        items = []
        for agg in dirty:
            agg.dirty = False
            items.append((agg, agg.ticks))
        return [agg.snapshot() for agg, _ in items], Taken(items)

    def seal(self, taken: Taken) -> None:
        """
        Forget the aggregates just taken: those versions are final, and a
        later tick of their minute starts a new part.
        """
        for agg, _ in taken._items:
            self._remove(agg)

    def written(self, taken: Taken) -> None:
        """The write of C{taken} succeeded: those versions are stored."""
        for agg, version in taken._items:
            if version > agg.written:
                agg.written = version

    def failed(self, taken: Taken) -> None:
        """The write of C{taken} failed: its aggregates are dirty again."""
        for agg, _ in taken._items:
            if not agg.dirty and not agg.gone and agg.written < agg.ticks:
                agg.dirty = True
                self._dirty.append(agg)

    def oldest(self, limit: int | None = None, before_minute: int | None = None,
               ) -> tuple[list[Bar], Taken]:
        """
        Snapshots of up to C{limit} dirty aggregates, oldest minute first,
        only of minutes before C{before_minute} if given. Nothing changes:
        this is how aggregates are chosen to be moved elsewhere (the spool),
        then L{forget}.
        """
        chosen = sorted(
            (agg for agg in self._dirty
             if before_minute is None or agg.minute < before_minute),
            key=lambda agg: agg.minute,
        )[:limit]
        return [agg.snapshot() for agg in chosen], Taken([(a, a.ticks) for a in chosen])

    def forget(self, taken: Taken) -> None:
        """
        Drop the aggregates of C{taken} (from L{oldest}, with no tick added
        since) from memory, whatever their state: their latest version is
        safe elsewhere. A later tick of their minute starts a new part.
        """
        for agg, version in taken._items:
            assert agg.ticks == version, "ticks were added after the snapshot"
            agg.dirty = False
            self._remove(agg)
        self._dirty = [agg for agg in self._dirty if agg.dirty]

    def evict(self, before_minute: int) -> int:
        """
        Forget the clean aggregates of minutes before C{before_minute}.

        @return: how many were forgotten.
        """
        evicted = 0
        for minute in [m for m in self._minutes if m < before_minute]:
            for agg in list(self._minutes[minute].values()):
                if not agg.dirty and agg.written == agg.ticks:
                    self._remove(agg)
                    evicted += 1
        return evicted

    def _remove(self, agg: _Aggregate) -> None:
        agg.gone = True
        symbols = self._minutes.get(agg.minute)
        if symbols is not None and symbols.get(agg.symbol) is agg:
            del symbols[agg.symbol]
            if not symbols:
                del self._minutes[agg.minute]
        if self._current.get(agg.symbol) is agg:
            del self._current[agg.symbol]


def sealed_part(tick_id: str) -> str:
    """A sealed part's name: its first tick's id, zero-padded so names sort as ids do."""
    ms, _, seq = tick_id.partition("-")
    return f"t:{int(ms or 0):013d}-{int(seq or 0):020d}"


def _fold(agg: _Aggregate, price: float, volume: float, timestamp: float) -> None:
    if timestamp < agg.open_ts:
        agg.open_ts = timestamp
        agg.open = price
    if timestamp >= agg.close_ts:
        agg.close_ts = timestamp
        agg.close = price
    if price > agg.high:
        agg.high = price
    elif price < agg.low:
        agg.low = price
    agg.volume += volume
    agg.ticks += 1
