#!/usr/bin/env python3
"""
Tick ingestion in one process, no I/O: ticks per second through
L{BarAggregator.add} alone, and through L{Persister.add_tick} with a store
that answers every write at once (so flushes, takes and evictions are
counted, the database is not). Prints one JSON object.

    .venv/bin/python bench/bars.py --ticks 1000000 --symbols 5000 --rate 50000

Ticks arrive in time order at --rate ticks per simulated second, each for a
random symbol, with a little jitter so some are out of order; the Persister
flushes once per simulated second on a test clock.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.defer import Deferred, succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from zope.interface import implementer  # noqa: E402

from tickstock.domain.events import Event  # noqa: E402
from tickstock.domain.interfaces import IStore  # noqa: E402
from tickstock.store.bars import BarAggregator  # noqa: E402
from tickstock.store.persist import Persister  # noqa: E402

START = 1_700_000_040


@implementer(IStore)
class NullStore:
    """Accepts every write at once and keeps nothing."""

    ready = True

    def __init__(self) -> None:
        self.bars = 0

    def write(self, bars: Iterable[Any], events: Iterable[Any]) -> Deferred[None]:
        self.bars += len(list(bars))
        return succeed(None)


def make_ticks(count: int, symbols: int, rate: float, seed: int) -> list[Event]:
    rng = random.Random(seed)
    names = [f"S{i}" for i in range(symbols)]
    ticks = []
    for i in range(count):
        symbol = rng.choice(names)
        timestamp = START + i / rate - rng.random() * 0.5
        data = {"symbol": symbol, "price": round(100 + rng.gauss(0, 1), 2),
                "volume": rng.randint(1, 500), "timestamp": timestamp}
        ticks.append(Event("", "tickstock.data.ticks", "ticks", "tick", data, symbol=symbol))
    return ticks


def bench_aggregator(ticks: list[Event]) -> float:
    bars = BarAggregator("bench:1")
    add = bars.add
    rows = [(t.data["symbol"], t.data["price"], t.data["volume"], t.data["timestamp"])
            for t in ticks]
    began = time.perf_counter()
    for symbol, price, volume, timestamp in rows:
        add(symbol, price, volume, timestamp)
    return len(rows) / (time.perf_counter() - began)


def bench_persister(ticks: list[Event], rate: float) -> tuple[float, int]:
    clock, store = Clock(), NullStore()
    with tempfile.TemporaryDirectory() as spool:
        persister = Persister(clock, store, "bench:1", 1.0, 200_000, spool)
        persister.startService()
        add_tick = persister.add_tick
        per_second = int(rate)
        began = time.perf_counter()
        for start in range(0, len(ticks), per_second):
            for event in ticks[start:start + per_second]:
                add_tick(event)
            clock.advance(1.0)
        elapsed = time.perf_counter() - began
        persister.stopService()
    return len(ticks) / elapsed, store.bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=1_000_000)
    parser.add_argument("--symbols", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=50_000,
                        help="ticks per simulated second (sets minutes and flushes)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    ticks = make_ticks(args.ticks, args.symbols, args.rate, args.seed)
    aggregator = bench_aggregator(ticks)
    persister, bars = bench_persister(ticks, args.rate)
    print(json.dumps({
        "ticks": args.ticks,
        "symbols": args.symbols,
        "simulated_seconds": round(args.ticks / args.rate, 1),
        "aggregator_ticks_per_s": round(aggregator),
        "persister_ticks_per_s": round(persister),
        "bar_versions_written": bars,
        "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
