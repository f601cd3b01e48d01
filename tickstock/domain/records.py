"""
What the store keeps and is asked for, as values every floor may name: a
bar part, and a query of stored pattern events.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Bar:
    """
    One part of a 1-minute OHLCV bar: the ticks of one symbol and minute
    that one in-memory aggregate saw. Parts are written whole and replace
    their earlier versions (keyed by C{part}), and the bar in C{ohlcv_1min}
    is recomputed from all its parts, so several nodes, late ticks and
    retried writes all add up to the right bar.

    @ivar minute: the bar's start, in epoch seconds (a multiple of 60).
    @ivar open_ts: producer timestamp of the tick that gave C{open}.
    @ivar close_ts: producer timestamp of the tick that gave C{close}.
    @ivar part: unique for each in-memory aggregate (node, run, counter).
    """

    symbol: str
    minute: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    open_ts: float
    close_ts: float
    ticks: int
    part: str


@dataclass(frozen=True, slots=True)
class PatternQuery:
    """
    A validated C{/api/patterns} query.

    @ivar since: only events whose producer timestamp is at or after this
        (epoch seconds).
    @ivar before: the cursor: only events with ids older than this one.
    """

    symbol: str | None = None
    pattern: str | None = None
    min_confidence: float | None = None
    since: float | None = None
    before: str | None = None
    limit: int = 100
