"""The producer simulator's core: a stand-in for the analytics engine (TickStockPL).

Nothing here does I/O or knows about Redis: events come out as C{(channel, dict)}
pairs (or, in the real producer's dialect, L{UpstreamSimulator}, as encoded
messages for one or two channels) and go in through a C{publish(channel,
payload_bytes)} callable, so the same code feeds the daemon's embedded demo,
C{tickstock-sim}, the tests and the benchmarks.  Everything is deterministic
given a seeded L{random.Random} and an injected L{IReactorTime}, so a test can
replay exactly what a run produced.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import orjson
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tickstock.domain.events import SYMBOL
from tickstock.domain.jobs import JOB_PATTERNS

Event = dict[str, Any]
Message = tuple[tuple[str, ...], bytes]  # the channels one message goes to, and its bytes
Bar = tuple[date, float, float, float, float, int]  # date, open, high, low, close, volume
Publish = Callable[[str, bytes], object]
_Day = tuple[int, float, float, float, float]  # ordinal, close, gap, wick, volume draw

SYMBOL_RE = SYMBOL
TICKS = "tickstock.data.ticks"
PATTERNS_CHANNEL = "tickstock.events.patterns"
MARKET_STATE = "tickstock.events.market_state"
HEALTH = "tickstock.health.status"
PROGRESS = "tickstock.events.backtesting.progress"
RESULTS = "tickstock.events.backtesting.results"
UNIVERSE_CHANNELS: Mapping[str, str] = {
    "universe_updated": "tickstock.universe.updated",
    "cache_sync_complete": "tickstock.cache.sync_complete",
    "etf_correlation_update": "tickstock.etf.correlation_update",
    "ipo_assignment": "tickstock.cache.ipo_assignment",
    "delisting_cleanup": "tickstock.cache.delisting_cleanup",
}
PATTERNS = JOB_PATTERNS
TIMEFRAMES = ("1min", "5min", "daily")
UNIVERSES = ("etf_growth", "etf_value", "sp500_top", "nasdaq100", "dow30", "sector_leaders")
SECTORS = ("Technology", "Financials", "Energy", "Health Care", "Industrials", "Utilities")
ETFS = ("SPY", "QQQ", "IWM", "DIA", "XLK", "XLF", "XLE", "XLV")

_TICKERS = (
    "AAPL MSFT NVDA AMZN GOOGL GOOG META BRK.B TSLA AVGO JPM LLY V UNH XOM MA JNJ PG HD "
    "COST ABBV MRK ORCL CVX WMT BAC KO PEP NFLX CRM AMD ADBE TMO LIN ACN MCD CSCO ABT WFC "
    "DHR INTU DIS TXN QCOM VZ CMCSA PFE AMGN NKE PM IBM CAT UNP NEE GE SPGI LOW HON RTX "
    "INTC AMAT BA GS UPS ISRG T BKNG MS ELV SBUX PLD BLK MDT DE GILD LMT ADP MDLZ SYK TJX "
    "CVS MMC ADI VRTX C REGN CB SCHW MO ZTS PYPL SO LRCX BMY DUK CI BSX MU ETN"
).split()
# Kinds drawn by next_event(), with cumulative weights (ticks 70%, patterns 15%, ...).
_KINDS = ("tick", "pattern", "market_state", "health", "universe")
_CUM_WEIGHTS = (70, 85, 93, 97, 100)


def default_symbols(n: int) -> list[str]:
    """
    The first C{n} symbols of a fixed list of liquid US tickers, then synthetic
    C{SYM0101}, C{SYM0102}, ... so that demos look real yet can scale to load tests.

    @param n: how many, 1 to 10000.
    @raise ValueError: if C{n} is out of range.
    """
    if not 1 <= n <= 10000:
        raise ValueError(f"symbol count must be 1..10000, not {n}")
    extra = [f"SYM{i:04d}" for i in range(len(_TICKERS) + 1, n + 1)]
    return (_TICKERS + extra)[:n]


def _fin(x: float) -> float:
    """Round to 4 dp, mapping NaN/Infinity to 0.0: the contract allows finite numbers only."""
    return round(x, 4) if math.isfinite(x) else 0.0


def _send(log: Logger, publish: Publish, channel: str, data: bytes) -> bool:
    """
    Call C{publish} so that neither a raised exception nor a failed Deferred can
    escape: a broken connection must not stop a LoopingCall or a job's timers.

    @return: whether C{publish} accepted the call synchronously.
    """
    try:
        result = publish(channel, data)
    except Exception:
        log.failure("publish to {channel} failed", channel=channel)
        return False
    if isinstance(result, Deferred):
        result.addErrback(lambda f: log.failure("publish to {channel} failed", f, channel=channel))
    return True


class MarketSimulator:
    """
    Random-walk prices and plausible producer events for a set of symbols.

    Event ids are C{sim-<8 hex drawn from rng>-<counter>}: the same seed gives
    the same ids, so a restarted simulator should get a fresh seed or its
    events will look like retries to TickStock's de-duplication.
    """

    VOLATILITY = 0.001  # per-step standard deviation of the log price

    def __init__(self, symbols: Sequence[str], rng: random.Random) -> None:
        """
        @param symbols: the tickers to simulate; each must match L{SYMBOL_RE}.
        @param rng: the only source of randomness, for reproducible runs.
        """
        if not symbols or not all(SYMBOL_RE.match(s) for s in symbols):
            raise ValueError("need at least one symbol, each matching [A-Z0-9.-]{1,10}")
        self.symbols = list(symbols)
        self._rng = rng
        self.prices = {s: rng.uniform(20.0, 500.0) for s in self.symbols}
        self._prefix = f"sim-{rng.getrandbits(32):08x}-"
        self._counter = 0
        self._started: float | None = None
        self._makers: dict[str, Callable[[float], tuple[str, Event]]] = {
            "tick": self.tick, "pattern": self.pattern, "market_state": self.market_state,
            "health": self.health, "universe": self.universe,
        }

    def _event(self, now: float, event_type: str, **fields: Any) -> Event:
        """Stamp the fields every message carries: type, time and a unique id."""
        if self._started is None:
            self._started = now
        self._counter += 1
        fields["event_type"] = event_type
        fields["timestamp"] = float(now)
        fields["event_id"] = f"{self._prefix}{self._counter}"
        return fields

    def _pick(self, symbol: str | None) -> str:
        return symbol if symbol is not None else self._rng.choice(self.symbols)

    def _walk(self, symbol: str) -> tuple[float, int]:
        """Advance C{symbol}'s geometric walk one step: its new price and a volume."""
        price = self.prices[symbol] * math.exp(self._rng.gauss(0.0, self.VOLATILITY))
        self.prices[symbol] = price
        return round(price, 4), 100 * (1 + int(self._rng.random() * 50))

    def tick(self, now: float, symbol: str | None = None) -> tuple[str, Event]:
        """Advance one symbol's geometric walk one step and report its price."""
        s = self._pick(symbol)
        price, volume = self._walk(s)
        return TICKS, self._event(now, "tick", symbol=s, price=price, volume=volume)

    def pattern(self, now: float, symbol: str | None = None) -> tuple[str, Event]:
        """A detected candlestick/chart pattern at the symbol's current price."""
        s, rng = self._pick(symbol), self._rng
        return PATTERNS_CHANNEL, self._event(
            now, "pattern_detected", symbol=s, pattern=rng.choice(PATTERNS),
            confidence=round(rng.uniform(0.5, 1.0), 3), price=round(self.prices[s], 4),
            timeframe=rng.choice(TIMEFRAMES))

    def market_state(self, now: float, symbol: str | None = None) -> tuple[str, Event]:
        """A ranking, sector or (Weinstein) stage change for one symbol."""
        s, rng = self._pick(symbol), self._rng
        kind = rng.choice(("ranking_change", "sector_rotation", "stage_change"))
        if kind == "ranking_change":
            extra: Event = {"rank_change": rng.choice((-1, 1)) * rng.randint(1, 15),
                            "rank": rng.randint(1, 500),
                            "metric": rng.choice(("relative_strength", "momentum", "volume_surge"))}
        elif kind == "sector_rotation":
            extra = {"metric": "sector_strength", "sector": rng.choice(SECTORS),
                     "direction": rng.choice(("inflow", "outflow"))}
        else:
            stage = rng.randint(1, 4)
            extra = {"metric": "stage", "from_stage": stage, "to_stage": stage % 4 + 1}
        return MARKET_STATE, self._event(now, kind, symbol=s, **extra)

    def health(self, now: float) -> tuple[str, Event]:
        """The producer's heartbeat: mostly healthy, now and then degraded."""
        status = "degraded" if self._rng.random() < 0.05 else "healthy"
        uptime = 0.0 if self._started is None else now - self._started
        return HEALTH, self._event(now, "health", service="tickstockpl", status=status,
                                   uptime_s=round(uptime, 3))

    def universe(self, now: float) -> tuple[str, Event]:
        """A universe or cache maintenance notice, mostly C{universe_updated}."""
        rng, syms = self._rng, self.symbols
        kind = rng.choices(tuple(UNIVERSE_CHANNELS), weights=(60, 10, 10, 10, 10))[0]
        sample = sorted(rng.sample(syms, min(len(syms), rng.randint(3, 20))))
        if kind == "universe_updated":
            extra: Event = {"universe": rng.choice(UNIVERSES), "symbols": sample}
        elif kind == "cache_sync_complete":
            extra = {"entries_updated": rng.randint(1, 5000),
                     "duration_ms": round(rng.uniform(50.0, 2000.0), 1),
                     "universes": sorted(rng.sample(UNIVERSES, 3))}
        elif kind == "etf_correlation_update":
            extra = {"etf": rng.choice(ETFS),
                     "correlations": {s: round(rng.uniform(-1.0, 1.0), 3) for s in sample[:5]}}
        elif kind == "ipo_assignment":
            extra = {"symbol": rng.choice(syms), "universe": rng.choice(UNIVERSES)}
        else:
            extra = {"symbols": sample[:3], "universes_affected": rng.randint(1, len(UNIVERSES))}
        return UNIVERSE_CHANNELS[kind], self._event(now, kind, **extra)

    def next_event(self, now: float) -> tuple[str, Event]:
        """One event of a kind drawn by weight: ticks 70%, patterns 15%, market state 8%, ..."""
        kind = _KINDS[bisect.bisect(_CUM_WEIGHTS, self._rng.random() * _CUM_WEIGHTS[-1])]
        return self._makers[kind](now)

    def next_message(self, now: float) -> Message:
        """L{next_event}, encoded: what L{Producer} publishes."""
        channel, event = self.next_event(now)
        return (channel,), orjson.dumps(event)


UPSTREAM_SOURCE = "tickstock_pl"
ALL_TICKS = "tickstock.all_ticks"
MARKET_TICKS = "tickstock:market:ticks"
TIME_FORMS = ("epoch_s", "epoch_s_int", "epoch_ms", "iso_z", "iso_offset", "iso_naive", "none")
"""How the upstream dialect writes a timestamp: epoch seconds (float, int) or
milliseconds, ISO 8601 with C{Z}, with an offset or naive (UTC), or not at all."""
PROBE_CHANNELS = (PATTERNS_CHANNEL, MARKET_STATE, HEALTH, TICKS, ALL_TICKS,
                  "tickstock:patterns:streaming", "tickstock:indicators:streaming")
INDICATORS = ("RSI", "SMA", "EMA", "VWAP")
MULTI_INDICATORS = ("MACD", "BollingerBands", "Stochastic")
ALERT_TYPES = ("rsi_overbought", "rsi_oversold", "macd_cross", "volume_spike", "price_breakout")
HEALTH_WORDS = ("healthy", "healthy", "healthy", "ok", "running", "warning", "degraded",
                "critical")
MARKET_WIDE = ("breadth_update", "volatility_regime", "market_regime")
# Kinds drawn by UpstreamSimulator.next_message(), with cumulative weights.
_UPSTREAM_KINDS = ("tick", "pattern", "market_state", "health", "indicator", "alert",
                   "universe", "session", "probe")
_UPSTREAM_CUM_WEIGHTS = (60, 75, 82, 86, 92, 94, 97, 98, 100)


def upstream_time(now: float, form: str, hours: int = -4) -> float | int | str | None:
    """C{now} written in one of L{TIME_FORMS}; C{hours}: the offset of C{iso_offset}."""
    moment = datetime.fromtimestamp(now, UTC)
    if form == "epoch_s":
        return round(now, 6)
    if form == "epoch_s_int":
        return int(now)
    if form == "epoch_ms":
        return int(now * 1000)
    if form == "iso_z":
        return moment.isoformat().replace("+00:00", "Z")
    if form == "iso_offset":
        return moment.astimezone(timezone(timedelta(hours=hours))).isoformat()
    if form == "iso_naive":
        return moment.replace(tzinfo=None).isoformat(timespec="microseconds")
    return None


class UpstreamSimulator(MarketSimulator):
    """
    The same market in the shapes the real producer (TickStockPL) and its
    streaming service publish (docs/producers.md), so that the demo, the
    tests and the benchmarks run against what TickStock will really get:
    each kind in its several shapes drawn at random (flat, under C{data},
    under C{data.data}, under C{detection} / C{calculation} / C{alert} /
    C{payload}), timestamps in every form of L{TIME_FORMS}, and now and then
    the producer's liveness probes. Like upstream's, its messages carry no
    C{event_id}.

    One tick is one message: C{tick_data} published with the same bytes on
    C{tickstock.ticks.<SYMBOL>} and on C{tickstock.all_ticks} (TickStock
    counts the pair once; with C{per_symbol_ticks} off, as streams cannot be
    read by pattern, on C{tickstock.all_ticks} only), or C{market_tick} on
    C{tickstock:market:ticks}; so volumes add up exactly.
    """

    def __init__(self, symbols: Sequence[str], rng: random.Random,
                 per_symbol_ticks: bool = True) -> None:
        super().__init__(symbols, rng)
        self.per_symbol_ticks = per_symbol_ticks
        self._upstream: dict[str, Callable[[float], tuple[tuple[str, ...], Event]]] = {
            "tick": self.upstream_tick, "pattern": self.upstream_pattern,
            "market_state": self.upstream_market_state, "health": self.upstream_health,
            "indicator": self.upstream_indicator, "alert": self.upstream_alert,
            "universe": self.upstream_universe, "session": self.upstream_session,
            "probe": self.upstream_probe,
        }

    def next_message(self, now: float) -> Message:
        """One message of a kind drawn by weight: ticks 60%, patterns 15%, ..."""
        r = self._rng.random() * _UPSTREAM_CUM_WEIGHTS[-1]
        kind = _UPSTREAM_KINDS[bisect.bisect(_UPSTREAM_CUM_WEIGHTS, r)]
        channels, message = self._upstream[kind](now)
        return channels, orjson.dumps(message)

    def _stamp(self, fields: Event, now: float) -> Event:
        """Give C{fields} a C{timestamp} in a form drawn from L{TIME_FORMS} (or none)."""
        value = upstream_time(now, self._rng.choice(TIME_FORMS),
                              self._rng.choice((-5, -4, 1, 2, 9)))
        if value is not None:
            fields["timestamp"] = value
        return fields

    def upstream_tick(self, now: float) -> tuple[tuple[str, ...], Event]:
        """One step of a symbol's walk, as C{tick_data} (twice) or C{market_tick}."""
        s = self._rng.choice(self.symbols)
        price, volume = self._walk(s)
        if self._rng.random() < 0.5:
            channels = (f"tickstock.ticks.{s}", ALL_TICKS) if self.per_symbol_ticks \
                else (ALL_TICKS,)
            return channels, self._stamp({
                "event_type": "tick_data", "ticker": s, "price": price, "volume": volume,
                "source": "polygon", "market_status": "open"}, now)
        return (MARKET_TICKS,), self._stamp({
            "type": "market_tick", "symbol": s, "price": price, "volume": volume,
            "source": "polygon"}, now)

    def upstream_pattern(self, now: float) -> tuple[tuple[str, ...], Event]:
        """A pattern flat, under C{data}, under C{data.data} or under C{detection}."""
        rng, s = self._rng, self._rng.choice(self.symbols)
        name = rng.choice(("pattern", "pattern_name", "pattern_type"))
        pattern, price = rng.choice(PATTERNS), round(self.prices[s], 4)
        confidence, timeframe = round(rng.uniform(0.5, 1.0), 3), rng.choice(TIMEFRAMES)
        indicators = {"relative_strength": round(rng.uniform(0.5, 2.0), 3),
                      "relative_volume": round(rng.uniform(0.5, 3.0), 3)}
        shape = rng.choice(("flat", "data", "data.data", "detection"))
        if shape == "detection":
            channel = rng.choice(("tickstock:patterns:streaming", "tickstock:patterns:detected"))
            detection = self._stamp({
                "symbol": s, "pattern_type": pattern, "confidence": confidence,
                "timeframe": timeframe,
                "bar_data": {"open": price, "high": round(price * 1.004, 4),
                             "low": round(price * 0.996, 4), "close": price,
                             "volume": 100 * rng.randint(10, 500)}}, now)
            kind = "streaming_pattern" if channel.endswith("streaming") else "pattern_detected"
            return (channel,), {"type": kind, "detection": detection}
        outer: Event = {"event_type": "pattern_detected", "source": UPSTREAM_SOURCE}
        if shape == "flat":
            outer.update({name: pattern, "symbol": s, "confidence": confidence,
                          "details": {"price": price, "timeframe": timeframe}})
        elif shape == "data":
            outer["data"] = self._stamp({
                "symbol": s, name: pattern, "confidence": confidence, "current_price": price,
                "price_change": round(rng.gauss(0.0, 1.5), 2), "expires_at": round(now + 3600),
                "indicators": indicators, "source": "intraday",
                "description": f"{pattern} on {s}", "action": rng.choice(("buy", "sell", "watch")),
                "stop_loss": round(price * 0.97, 4), "target_price": round(price * 1.05, 4)}, now)
        else:
            flow = f"flow-{rng.getrandbits(32):08x}"
            outer["flow_id"] = flow
            outer["data"] = {"flow_id": flow, "tier": rng.choice(("intraday", "daily", "combo")),
                             "data": {name: pattern, "symbol": s, "confidence": confidence,
                                      "current_price": price, "indicators": indicators,
                                      "metadata": {"timeframe": timeframe,
                                                   "bars": rng.randint(20, 200)}}}
        return (PATTERNS_CHANNEL,), self._stamp(outer, now)

    def upstream_market_state(self, now: float) -> tuple[tuple[str, ...], Event]:
        """A change of one symbol, or of the whole market (no symbol), flat or under C{data}."""
        rng = self._rng
        kind = rng.choice(("ranking_change", "sector_rotation", "stage_change", *MARKET_WIDE))
        fields: Event
        if kind in MARKET_WIDE:
            fields = {"advancers": rng.randint(100, 400), "decliners": rng.randint(100, 400),
                      "vix": round(rng.uniform(10.0, 35.0), 2),
                      "regime": rng.choice(("risk_on", "risk_off", "neutral"))}
        else:
            fields = {"symbol": rng.choice(self.symbols),
                      "rank_change": rng.choice((-1, 1)) * rng.randint(1, 15),
                      "metric": rng.choice(("rs_rating", "momentum", "volume_surge"))}
        message: Event = {"event_type": kind, "source": UPSTREAM_SOURCE}
        if rng.random() < 0.5:
            message.update(fields)
        else:
            message["data"] = fields
        return (MARKET_STATE,), self._stamp(message, now)

    def upstream_health(self, now: float) -> tuple[tuple[str, ...], Event]:
        """A heartbeat: C{source} for the service, and upstream's own status words."""
        rng = self._rng
        shape = rng.choice(("system_health", "streaming_health", "processing_status"))
        if shape == "system_health":
            return (HEALTH,), self._stamp({
                "event_type": "system_health", "source": UPSTREAM_SOURCE,
                "status": rng.choice(HEALTH_WORDS),
                "metrics": {"cpu_usage": round(rng.uniform(5.0, 90.0), 1),
                            "memory_usage": round(rng.uniform(10.0, 80.0), 1),
                            "active_jobs": rng.randint(0, 5), "queue_depth": rng.randint(0, 50)}},
                now)
        if shape == "streaming_health":
            return ("tickstock:streaming:health",), self._stamp({
                "type": "streaming_health",
                "data": {"source": "streaming_service", "status": rng.choice(HEALTH_WORDS),
                         "active_symbols": len(self.symbols),
                         "ticks_per_second": round(rng.uniform(10.0, 500.0), 1)}}, now)
        return ("tickstock:processing:status",), self._stamp({
            "event": "processing_status", "source": "daily_processing", "version": "1.0",
            "payload": {"status": rng.choice(("running", "running", "ready", "stopped")),
                        "phase": rng.choice(("data_import", "indicators", "patterns")),
                        "symbols_processed": rng.randint(0, len(self.symbols)),
                        "symbols_total": len(self.symbols)}}, now)

    def upstream_session(self, now: float) -> tuple[tuple[str, ...], Event]:
        """The streaming service starting or stopping a session."""
        rng = self._rng
        data: Event = {"session_id": f"session-{rng.getrandbits(32):08x}"}
        if rng.random() < 0.5:
            data["source"] = "streaming_session"
        if rng.random() < 0.5:
            data["symbols"] = len(self.symbols)
            return ("tickstock:streaming:session_started",), self._stamp(
                {"type": "session_started", "data": data}, now)
        data["reason"] = rng.choice(("market_close", "shutdown"))
        return ("tickstock:streaming:session_stopped",), self._stamp(
            {"type": "session_stopped", "data": data}, now)

    def upstream_indicator(self, now: float) -> tuple[tuple[str, ...], Event]:
        """An indicator of one symbol under C{calculation}: one C{value}, or C{values}."""
        rng, s = self._rng, self._rng.choice(self.symbols)
        price = self.prices[s]
        if rng.random() < 0.5:
            indicator = rng.choice(INDICATORS)
            value = rng.uniform(10.0, 90.0) if indicator == "RSI" else \
                price * rng.uniform(0.97, 1.03)
            return ("tickstock:indicators:streaming",), {
                "type": "streaming_indicator", "calculation": self._stamp({
                    "symbol": s, "indicator": indicator, "value": round(value, 4),
                    "timeframe": rng.choice(TIMEFRAMES), "metadata": {"period": 14}}, now)}
        indicator = rng.choice(MULTI_INDICATORS)
        if indicator == "MACD":
            macd, signal = rng.gauss(0.0, 1.0), rng.gauss(0.0, 1.0)
            values = {"macd": macd, "signal": signal, "histogram": macd - signal}
        elif indicator == "BollingerBands":
            values = {"upper": price * 1.02, "middle": price, "lower": price * 0.98}
        else:
            values = {"k": rng.uniform(0.0, 100.0), "d": rng.uniform(0.0, 100.0)}
        return ("tickstock:indicators:streaming",), self._stamp({
            "event": "indicator_calculated",
            "calculation": {"indicator_type": indicator, "symbol": s,
                            "values": {k: round(v, 4) for k, v in values.items()}}}, now)

    def upstream_alert(self, now: float) -> tuple[tuple[str, ...], Event]:
        """An indicator alert under C{alert}, on the ordinary or the critical channel."""
        rng, s = self._rng, self._rng.choice(self.symbols)
        channel = rng.choice(("tickstock:alerts:indicators", "tickstock:alerts:critical"))
        return (channel,), {"type": "indicator_alert", "alert": self._stamp({
            "symbol": s, "alert_type": rng.choice(ALERT_TYPES),
            "data": {"value": round(rng.uniform(0.0, 100.0), 2),
                     "price": round(self.prices[s], 4)}}, now)}

    def upstream_universe(self, now: float) -> tuple[tuple[str, ...], Event]:
        """A universe or cache change, in the universe managers' shapes or an envelope."""
        rng, syms = self._rng, self.symbols
        universe = rng.choice(UNIVERSES)
        sample = sorted(rng.sample(syms, min(len(syms), rng.randint(1, 5))))
        shape = rng.choice(("theme_updated", "universe_synchronized", "cache_envelope",
                            "universe_envelope"))
        if shape == "theme_updated":
            return ("tickstock.universe.updated",), self._stamp({
                "service": "etf_universe_manager", "event_type": "theme_updated",
                "theme": universe, "symbol_count": rng.randint(5, 50),
                "action": rng.choice(("refresh", "add", "remove")), "cache_key": universe}, now)
        if shape == "universe_synchronized":
            return ("tickstock.cache.sync_complete",), {
                "service": "cache_entries_synchronizer", "event_type": "universe_synchronized",
                "universe": universe, "change_count": len(sample),
                "actions": [{"action": rng.choice(("add", "remove")), "symbol": s}
                            for s in sample]}
        if shape == "cache_envelope":
            return ("tickstock:cache:sync_complete",), self._stamp({
                "event": "cache_sync_complete", "source": "cache_entries_synchronizer",
                "version": "1.0", "payload": {"universes": sorted(rng.sample(UNIVERSES, 2)),
                                              "entries_updated": rng.randint(1, 5000)}}, now)
        return ("tickstock:universe:updated",), self._stamp({
            "event": "universe_updated", "source": UPSTREAM_SOURCE, "version": "1.0",
            "payload": {"universe": universe, "added": sample[:1], "removed": sample[1:2]}},
            now)

    def upstream_probe(self, now: float) -> tuple[tuple[str, ...], Event]:
        """A liveness probe: TickStock counts it and delivers nothing."""
        if self._rng.random() < 0.5:
            return (self._rng.choice(PROBE_CHANNELS),), self._stamp({"test": "health_check"}, now)
        return (MARKET_STATE,), self._stamp(
            {"event_type": "health_check", "source": UPSTREAM_SOURCE}, now)


class Backtester:
    """
    A real (if simple) backtest over synthetic daily bars: long when the close
    crosses above its 10-day SMA, flat when it crosses below.

    A symbol's daily returns come from a C{random.Random} seeded by
    C{crc32(seed, symbol, year)}, so a given date has the same return whatever
    range is asked for (overlapping ranges agree, different ranges differ); prices
    start from the symbol's base price at the range's first day.  Work is capped
    at L{MAX_SYMBOLS} symbols and the last L{MAX_DAYS} days of the range.
    """

    SMA = 10
    MAX_SYMBOLS = 50
    MAX_DAYS = 3653

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _days(self, symbol: str, start: int, end: int) -> Iterator[_Day]:
        """
        (ordinal, close, gap, wick, volume draw) for each business day from
        ordinal C{start} to C{end}: one year's draws are made from its 1 January
        on, so that a day's draws do not depend on where the range starts.
        """
        params = random.Random(zlib.crc32(f"{self.seed}:{symbol}".encode()))
        base, vol = params.uniform(20.0, 500.0), params.uniform(0.008, 0.025)
        drift = params.gauss(0.0002, 0.0003)
        log_price = math.log(base)
        for year in range(date.fromordinal(start).year, date.fromordinal(end).year + 1):
            rng = random.Random(zlib.crc32(f"{self.seed}:{symbol}:{year}".encode()))
            gauss, uniform = rng.gauss, rng.random
            last = min(end, date(year, 12, 31).toordinal())
            for o in range(date(year, 1, 1).toordinal(), last + 1):
                if (o + 6) % 7 >= 5:  # date.fromordinal(1) is a Monday: skip Sat/Sun
                    continue
                step, gap, wick, volume = gauss(drift, vol), uniform(), uniform(), uniform()
                if o >= start:
                    log_price += step
                    yield o, math.exp(log_price), (gap - 0.5) * vol, wick * vol, volume

    def bars(self, symbol: str, start: date, end: date) -> list[Bar]:
        """Deterministic business-day OHLCV bars: (date, open, high, low, close, volume)."""
        out: list[Bar] = []
        prev = 0.0
        for o, close, gap, wick, volume in self._days(symbol, start.toordinal(), end.toordinal()):
            open_ = prev * (1.0 + gap) if prev else close
            high, low = max(open_, close) * (1.0 + wick), min(open_, close) / (1.0 + wick)
            out.append((date.fromordinal(o), open_, high, low, close, int(1e5 + 9e5 * volume)))
            prev = close
        return out

    def _equity(self, closes: list[float]) -> tuple[list[float], list[float]]:
        """The strategy's equity curve (from 1.0) and each closed trade's return."""
        n, equity, trades = self.SMA, [1.0], list[float]()
        window, above, entry = sum(closes[:n]), False, 0.0  # entry: 0.0 while flat
        for i in range(1, len(closes)):
            equity.append(equity[-1] * (closes[i] / closes[i - 1] if entry else 1.0))
            if i < n - 1:
                continue  # no SMA yet
            if i >= n:
                window += closes[i] - closes[i - n]
            now_above = closes[i] * n > window
            if i >= n and now_above and not above:
                entry = closes[i]
            elif i >= n and above and not now_above and entry:
                trades.append(closes[i] / entry - 1.0)
                entry = 0.0
            above = now_above
        if entry:
            trades.append(closes[-1] / entry - 1.0)
        return equity, trades

    def run(self, job: Mapping[str, Any]) -> dict[str, float | int]:
        """
        Backtest C{job["symbols"]} between C{job["start_date"]} and C{job["end_date"]}.

        Symbols are traded with equal capital; C{roi}, C{sharpe_ratio} (daily
        returns, annualised by sqrt(252)) and C{max_drawdown} (a fraction) are of
        that portfolio, C{win_rate} is over all closed trades.

        @raise ValueError: for unparseable dates or an end before the start.
        """
        start, end = date.fromisoformat(job["start_date"]), date.fromisoformat(job["end_date"])
        if end < start:
            raise ValueError("end_date is before start_date")
        start = max(start, date.fromordinal(end.toordinal() - self.MAX_DAYS))
        symbols = list(dict.fromkeys(job["symbols"]))[: self.MAX_SYMBOLS]
        portfolio: list[float] = []
        wins = trades = 0
        for symbol in symbols:
            closes = [d[1] for d in self._days(symbol, start.toordinal(), end.toordinal())]
            equity, returns = self._equity(closes) if closes else ([1.0], [])
            portfolio = [a + b for a, b in zip(portfolio, equity, strict=False)] \
                if portfolio else equity
            trades += len(returns)
            wins += sum(1 for r in returns if r > 0)
        curve = [e / len(symbols) for e in portfolio] if symbols else [1.0]
        daily = [b / a - 1.0 for a, b in zip(curve, curve[1:], strict=False)]
        sharpe = 0.0
        if len(daily) > 1:
            mean = sum(daily) / len(daily)
            sd = math.sqrt(sum((r - mean) ** 2 for r in daily) / (len(daily) - 1))
            sharpe = mean / sd * math.sqrt(252) if sd > 1e-12 else 0.0
        peak, drawdown = curve[0], 0.0
        for e in curve:
            peak = max(peak, e)
            drawdown = max(drawdown, 1.0 - e / peak)
        return {"win_rate": _fin(wins / trades if trades else 0.0), "roi": _fin(curve[-1] - 1.0),
                "sharpe_ratio": _fin(sharpe), "max_drawdown": _fin(drawdown),
                "trades": trades, "symbols": len(symbols)}


class JobRunner:
    """
    Answers backtest jobs the way the producer does: four progress steps, then
    the result.  Event ids derive from the job id, so a re-delivered job yields
    the same ids and TickStock's de-duplication keeps it to one delivery.

    With C{upstream}, in the real producer's shapes instead: progress as
    C{{job_id, progress, status: "processing", estimated_completion,
    current_symbol, processed_symbols}} with no timestamp, and the result with
    C{status}, upstream's figures and C{processing_time_seconds} but no
    C{completed_at}; neither carries an C{event_id} or the user.
    """

    log = Logger()
    STEPS = (0.25, 0.5, 0.75, 1.0)

    def __init__(self, clock: IReactorTime, publish: Publish, backtester: Backtester,
                 step_interval: float = 0.5, upstream: bool = False) -> None:
        self._clock, self._publish, self._backtester = clock, publish, backtester
        self.step_interval = step_interval
        self.upstream = upstream
        self.rejected = 0
        self._jobs: dict[str, tuple[Event, IDelayedCall, float]] = {}

    @staticmethod
    def _parse(payload: bytes) -> Event | None:
        """
        The job object if it has every docs/contract.md §2 field in a usable form, else
        None. It is a backtest by C{job_type} or by upstream's C{type}.
        """
        try:
            job = orjson.loads(payload)
            ok = (isinstance(job, dict)
                  and (job.get("job_type") == "backtest" or job.get("type") == "backtest_job")
                  and isinstance(job.get("job_id"), str) and 0 < len(job["job_id"]) <= 128
                  and isinstance(job.get("user_id"), (str, int))
                  and isinstance(job.get("symbols"), list) and job["symbols"]
                  and all(isinstance(s, str) and SYMBOL_RE.match(s) for s in job["symbols"])
                  and isinstance(job.get("patterns", []), list)
                  and date.fromisoformat(job["start_date"]) <= date.fromisoformat(job["end_date"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return job if ok else None

    def _event_id(self, job_id: str, suffix: str) -> str:
        """A stable id for one of a job's events, kept within the 64-character limit."""
        key = job_id if len(job_id) <= 48 \
            else hashlib.sha1(job_id.encode(), usedforsecurity=False).hexdigest()[:24]
        return f"bt-{key}-{suffix}"

    def _progress(self, job: Event, progress: float, status: str) -> None:
        """Publish one progress event (with C{user_id}, to help routing, unless upstream)."""
        if self.upstream:
            symbols, now = job["symbols"], self._clock.seconds()
            done = min(len(symbols), math.ceil(progress * len(symbols)))
            left = sum(1 for step in self.STEPS if step > progress) * self.step_interval
            _send(self.log, self._publish, PROGRESS, orjson.dumps({
                "job_id": job["job_id"], "progress": progress,
                "status": "processing" if status == "running" else status,
                "estimated_completion": upstream_time(now + left, "iso_naive"),
                "current_symbol": symbols[max(done - 1, 0)], "processed_symbols": done}))
            return
        suffix = f"p{int(progress * 100)}" if status == "running" else status
        _send(self.log, self._publish, PROGRESS, orjson.dumps({
            "event_type": "backtest_progress", "job_id": job["job_id"], "user_id": job["user_id"],
            "progress": progress, "status": status, "timestamp": self._clock.seconds(),
            "event_id": self._event_id(job["job_id"], suffix)}))

    def handle_job(self, payload: bytes) -> str | None:
        """
        Accept a job message and schedule its steps.

        @return: the job id, or C{None} if the message was malformed (counted in
            C{rejected}) or the job is already running (a re-delivery).
        """
        job = self._parse(payload)
        if job is None:
            self.rejected += 1
            self.log.warn("ignoring malformed backtest job {sample!r}", sample=payload[:200])
            return None
        if job["job_id"] in self._jobs:
            return None
        call = self._clock.callLater(self.step_interval, self._step, job, 0)
        self._jobs[job["job_id"]] = (job, call, 0.0)
        return str(job["job_id"])

    def _step(self, job: Event, i: int) -> None:
        """Publish step C{i}'s progress; the last step also runs the backtest."""
        progress = self.STEPS[i]
        if progress < 1.0:
            self._progress(job, progress, "running")
            call = self._clock.callLater(self.step_interval, self._step, job, i + 1)
            self._jobs[job["job_id"]] = (job, call, progress)
            return
        del self._jobs[job["job_id"]]
        try:
            results = self._backtester.run(job)
        except Exception as error:
            self.log.failure("backtest {job_id} failed", job_id=job["job_id"])
            if self.upstream:
                self._result(job, None, str(error))
            else:
                self._progress(job, progress, "failed")
            return
        self._progress(job, progress, "completed")
        self._result(job, results)

    def _result(self, job: Event, results: Mapping[str, Any] | None,
                error: str | None = None) -> None:
        """Publish the job's result: C{results}, or upstream's failure with C{error}."""
        now = self._clock.seconds()
        if not self.upstream:
            _send(self.log, self._publish, RESULTS, orjson.dumps({
                "event_type": "backtest_result", "job_id": job["job_id"],
                "user_id": job["user_id"], "results": results, "completed_at": now,
                "timestamp": now, "event_id": self._event_id(job["job_id"], "result")}))
            return
        message: Event = {
            "event_type": "backtest_result", "source": UPSTREAM_SOURCE, "timestamp": now,
            "job_id": job["job_id"], "status": "failed" if results is None else "completed",
            "processing_time_seconds": len(self.STEPS) * self.step_interval}
        if results is None:
            message["error"] = (error or "failed")[:200]
        else:
            trades = int(results["trades"])
            message["results"] = {
                "win_rate": results["win_rate"], "total_trades": trades,
                "winning_trades": round(float(results["win_rate"]) * trades),
                "roi": results["roi"], "sharpe_ratio": results["sharpe_ratio"],
                "max_drawdown": results["max_drawdown"],
                "duration_days": (date.fromisoformat(job["end_date"])
                                  - date.fromisoformat(job["start_date"])).days}
        _send(self.log, self._publish, RESULTS, orjson.dumps(message))

    def handle_control(self, payload: bytes) -> bool:
        """
        Obey C{{"action": "cancel", "job_id": ...}} (on C{tickstock.jobs.cancel}
        or C{tickstock.jobs.control}: TickStock sends each cancel on both): drop
        the job's remaining steps and say so with a final C{cancelled} progress
        event, once.

        @return: whether a running job was cancelled.  Malformed messages are
            counted in C{rejected}; a cancel for an unknown or finished job
            (such as the second copy of a cancel) is not.
        """
        try:
            msg = orjson.loads(payload)
            if msg["action"] != "cancel" or not isinstance(msg["job_id"], str):
                raise ValueError(msg["action"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.rejected += 1
            return False
        entry = self._jobs.pop(msg["job_id"], None)
        if entry is None:
            return False
        job, call, progress = entry
        call.cancel()
        self._progress(job, progress, "cancelled")
        return True

    def stop(self) -> None:
        """Forget every running job and cancel its timers (service shutdown)."""
        for _, call, _ in self._jobs.values():
            call.cancel()
        self._jobs.clear()


class Producer:
    """
    Publishes C{rate} simulated events per second in batches.

    Each batch sends what the elapsed time since C{start()} owes, so the
    average rate is exact whatever the batch interval; if publishing falls more
    than a second behind, the excess is dropped (counted in C{dropped}) rather
    than bursting and starving the reactor.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, publish: Publish, simulator: MarketSimulator,
                 rate: float, batch_interval: float = 0.01) -> None:
        if not 0 < rate <= 100_000 or batch_interval <= 0:
            raise ValueError("rate must be in (0, 100000] and batch_interval > 0")
        self._clock, self._publish, self._sim = clock, publish, simulator
        self.rate, self.batch_interval = rate, batch_interval
        self.published = self.dropped = 0
        self._due = 0  # event slots consumed since start (published or dropped)
        self._t0 = 0.0
        self._loop = LoopingCall(self._batch)
        self._loop.clock = clock

    def start(self) -> None:
        """Begin publishing; the first batch goes out one interval from now."""
        self._t0, self._due = self._clock.seconds(), 0
        self._loop.start(self.batch_interval, now=False)

    def stop(self) -> None:
        """Stop publishing, leaving no delayed call behind."""
        if self._loop.running:
            self._loop.stop()

    def publish_one(self, channel: str, event: Event) -> None:
        """Encode C{event} once and publish it, never raising."""
        self.publish_message(((channel,), orjson.dumps(event)))

    def publish_message(self, message: Message) -> None:
        """Publish one message, the same bytes on each of its channels; counted once."""
        channels, payload = message
        sent = [_send(self.log, self._publish, channel, payload) for channel in channels]
        if any(sent):
            self.published += 1

    def _batch(self) -> None:
        """Publish what the time since C{start()} owes, at most one second's worth."""
        now = self._clock.seconds()
        owed = math.floor((now - self._t0) * self.rate + 1e-6) - self._due
        cap = max(1, math.ceil(self.rate))
        if owed > cap:
            self.dropped += owed - cap
            self._due += owed - cap
            owed = cap
        self._due += max(owed, 0)
        for _ in range(owed):
            self.publish_message(self._sim.next_message(now))


class OutageQuietPublish:
    """
    A publish function whose failures are counted and logged once per outage
    (not once per message, which at 1000 events/s would drown the log).
    """

    _log = Logger()

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self.failed = 0
        self._down = False

    def __call__(self, channel: str, payload: bytes) -> Deferred[Any]:
        return maybeDeferred(self._publish, channel, payload).addCallbacks(self._ok, self._failed)

    def _ok(self, result: Any) -> Any:
        if self._down:
            self._down = False
            self._log.info("publishing again after {n} failed messages", n=self.failed)
        return result

    def _failed(self, failure: Any) -> None:
        self.failed += 1
        if not self._down:
            self._down = True
            self._log.warn("publish failed ({e}); dropping messages until Redis is back",
                      e=failure.getErrorMessage())


def simulated_producer(
    clock: IReactorTime, publish: Publish, *, rate: float, symbols: int, upstream: bool,
    per_symbol_ticks: bool, seed: int | None = None, step_interval: float = 0.5,
) -> tuple[JobRunner, Producer | None]:
    """
    The simulated producer as the embedded demo and C{tickstock-sim} run
    it: a job runner, and a publisher of C{rate} events a second over
    C{symbols} symbols (none at rate 0), in the original dialect or
    (C{upstream}) in the real producer's shapes.

    @param per_symbol_ticks: also publish each tick on its symbol's
        channel: one tick only where messages are named by their bytes
        (Redis pub/sub); a stream is read by its exact name.
    @param seed: the same seed makes the same market and results.
    """
    runner = JobRunner(clock, publish, Backtester(seed or 0), step_interval=step_interval,
                       upstream=upstream)
    if rate <= 0:
        return runner, None
    names, rng = default_symbols(symbols), random.Random(seed)
    simulator = UpstreamSimulator(names, rng, per_symbol_ticks=per_symbol_ticks) if upstream \
        else MarketSimulator(names, rng)
    return runner, Producer(clock, publish, simulator, rate)
