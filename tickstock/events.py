"""
The producer's events: which channel feeds which topic, what a valid message
looks like, and the ordered ids TickStock gives each event on arrival.

Validation happens once, at the boundary, so everything past it (routing,
storage, the wire) can trust an L{Event}. Unknown extra fields are kept and
passed on, as the contract requires.
"""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

SYMBOL = re.compile(r"^[A-Z0-9.\-]{1,10}\Z")
MAX_EVENT_BYTES = 64 * 1024
MAX_EVENT_ID = 64
MAX_STRING = 256
MAX_DEPTH = 32
"""Nesting of JSON objects and arrays an event may have: orjson writes at most
about 254 levels, and a browser has no use for more than a few."""

_SHOWN = reprlib.Repr()  # Python 3.11's takes no arguments
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 64, 64


def shown(value: Any) -> str:
    """A short repr of a hostile value, for an error message: bounded in
    length and depth, so a deeply nested one cannot overflow the stack."""
    return _SHOWN.repr(value)

TOPICS = ("patterns", "market_state", "backtests", "health", "ticks", "universe")


class MalformedEvent(ValueError):
    """
    A producer message TickStock cannot accept.

    @ivar kind: a short, stable name for the problem (C{not_json},
        C{missing_field}, ...), used to count and to log once per kind.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


Check = Callable[[Any], bool]


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _unit(value: Any) -> bool:
    return _finite(value) and 0 <= value <= 1


def _positive(value: Any) -> bool:
    return _finite(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _finite(value) and value >= 0


def _text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_STRING


def _symbol(value: Any) -> bool:
    return isinstance(value, str) and SYMBOL.match(value) is not None


def _one_of(*choices: str) -> Check:
    return lambda value: value in choices


def _results(value: Any) -> bool:
    return isinstance(value, dict) and all(
        _finite(value.get(name))
        for name in ("win_rate", "roi", "sharpe_ratio", "max_drawdown")
    )


def _time(value: Any) -> bool:
    return _positive(value) or _text(value)


@dataclass(frozen=True)
class Channel:
    """
    A producer channel: the topic its events go to and the fields they need.

    @ivar event_types: the C{event_type} values allowed; the first is the
        default for a message without one. Empty: any short string.
    @ivar latest_only: the delivery class. Latest-only events (ticks, job
        progress, health) supersede older ones with the same value of
        C{conflate_by}, so a client that falls behind gets the newest per
        key; all others are must-deliver and are never skipped.
    """

    name: str
    topic: str
    event_types: tuple[str, ...]
    required: tuple[tuple[str, Check], ...]
    keyed_by_symbol: bool = False
    conflate_by: str | None = None

    @property
    def latest_only(self) -> bool:
        return self.conflate_by is not None


_TIMESTAMP = ("timestamp", _positive)

CHANNELS: dict[str, Channel] = {
    channel.name: channel
    for channel in (
        Channel(
            "tickstock.events.patterns", "patterns", ("pattern_detected",),
            (("symbol", _symbol), ("pattern", _text), ("confidence", _unit), _TIMESTAMP),
            keyed_by_symbol=True,
        ),
        Channel(
            "tickstock.events.market_state", "market_state",
            ("ranking_change", "sector_rotation", "stage_change"),
            (("symbol", _symbol), _TIMESTAMP),
            keyed_by_symbol=True,
        ),
        Channel(
            "tickstock.events.backtesting.progress", "backtests", ("backtest_progress",),
            (("job_id", _text), ("progress", _unit), ("status", _text), _TIMESTAMP),
            conflate_by="job_id",
        ),
        Channel(
            "tickstock.events.backtesting.results", "backtests", ("backtest_result",),
            (("job_id", _text), ("results", _results), ("completed_at", _time)),
        ),
        Channel(
            "tickstock.health.status", "health", ("health",),
            (("service", _text), ("status", _one_of("healthy", "degraded", "down")),
             _TIMESTAMP),
            conflate_by="service",
        ),
        Channel(
            "tickstock.data.ticks", "ticks", ("tick",),
            (("symbol", _symbol), ("price", _positive), ("volume", _non_negative),
             _TIMESTAMP),
            keyed_by_symbol=True,
            conflate_by="symbol",
        ),
        *(
            Channel(name, "universe", (default,), (_TIMESTAMP,))
            for name, default in (
                ("tickstock.universe.updated", "universe_updated"),
                ("tickstock.cache.sync_complete", "cache_sync_complete"),
                ("tickstock.etf.correlation_update", "etf_correlation_update"),
                ("tickstock.cache.ipo_assignment", "ipo_assignment"),
                ("tickstock.cache.delisting_cleanup", "delisting_cleanup"),
            )
        ),
    )
}

JOBS_CHANNEL = "tickstock.jobs.backtest"
CONTROL_CHANNEL = "tickstock.jobs.control"


@dataclass(slots=True, eq=False)
class Event:
    """
    One validated producer event.

    @ivar id: TickStock's id, assigned on arrival; ids order events.
    @ivar data: the producer's fields, unknown ones included.
    @ivar user: for a targeted event (a backtest's progress or result), the
        user who owns the job, once known.
    @ivar wire_tail: the end of the C{event} frame from C{"id"} on, encoded
        once so that fan-out only prepends each subscription's id.
    @ivar size: the length of the message it came from, in bytes (0 if not
        known): what delivery budgets count, without encoding events that
        may never be sent (most ticks are superseded first).
    """

    id: str
    channel: str
    topic: str
    type: str
    data: dict[str, Any]
    symbol: str | None = None
    job_id: str | None = None
    received_at: float = 0.0
    user: str | None = None
    size: int = 0
    _tail: bytes | None = field(default=None, repr=False)

    @property
    def conflate_key(self) -> tuple[str, Any] | None:
        """
        For a latest-only event, the key a newer event supersedes it by
        (channel and symbol, job or service); L{None} for must-deliver.
        """
        by = CHANNELS[self.channel].conflate_by
        return None if by is None else (self.channel, self.data.get(by))

    @property
    def wire_tail(self) -> bytes:
        if self._tail is None:
            self._tail = (
                b',"id":' + orjson.dumps(self.id)
                + b',"type":' + orjson.dumps(self.type)
                + b',"data":' + orjson.dumps(self.data) + b"}"
            )
        return self._tail

    def frame(self, sub_id: str) -> bytes:
        """The JSON text of the C{event} message for subscription C{sub_id}."""
        return b'{"op":"event","sub":' + orjson.dumps(sub_id) + self.wire_tail


def parse_event(channel_name: str, raw: bytes, event_id: str, now: float) -> Event:
    """
    Validate one producer message.

    @param raw: the message exactly as it came from Redis.
    @param event_id: the id to give the event (see L{EventIds}).
    @param now: arrival time, in seconds since the epoch.
    @raise MalformedEvent: when the message must not reach anyone.
    """
    channel = CHANNELS.get(channel_name)
    if channel is None:
        raise MalformedEvent("unknown_channel", f"no such channel {shown(channel_name)}")
    if len(raw) > MAX_EVENT_BYTES:
        raise MalformedEvent("oversized", f"{len(raw)} bytes, limit {MAX_EVENT_BYTES}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise MalformedEvent("not_json", f"not JSON: {error}") from None
    if not isinstance(data, dict):
        raise MalformedEvent("not_object", f"expected a JSON object, got {type(data).__name__}")
    # Cheap first: fewer brackets than the limit cannot nest deeper than it.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(data) > MAX_DEPTH:
        raise MalformedEvent("too_deep", f"nested deeper than {MAX_DEPTH} levels")

    event_type = data.get("event_type", channel.event_types[0])
    if not _text(event_type) or (
        channel.topic != "universe" and event_type not in channel.event_types
    ):
        raise MalformedEvent(
            "bad_event_type", f"event_type {shown(event_type)} not allowed on {channel.name}"
        )
    for name, check in channel.required:
        if name not in data:
            raise MalformedEvent("missing_field", f"{name} is required on {channel.name}")
        if not check(data[name]):
            raise MalformedEvent("bad_field", f"{name}={shown(data[name])} is not valid")
    producer_id = data.get("event_id")
    if producer_id is not None and not (
        isinstance(producer_id, str) and 0 < len(producer_id) <= MAX_EVENT_ID
    ):
        raise MalformedEvent("bad_field", f"event_id must be a string of 1-{MAX_EVENT_ID} chars")

    return Event(
        id=event_id,
        channel=channel.name,
        topic=channel.topic,
        type=event_type,
        data=data,
        symbol=data["symbol"] if channel.keyed_by_symbol else None,
        job_id=data.get("job_id") if channel.topic == "backtests" else None,
        received_at=now,
        size=len(raw),
    )


def _depth(value: Any) -> int:
    """How deeply C{value}'s objects and arrays nest (no recursion: it may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((child, level + 1)
                             for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def stored_event(event_id: str, channel_name: str, event_type: str, raw: bytes | str,
                 user: str | None) -> Event:
    """
    Rebuild an event kept by the history. It was validated when it was
    stored, so only its shape is restored here.
    """
    channel = CHANNELS[channel_name]
    data = orjson.loads(raw)
    return Event(
        id=event_id,
        channel=channel.name,
        topic=channel.topic,
        type=event_type,
        data=data,
        symbol=data["symbol"] if channel.keyed_by_symbol else None,
        job_id=data.get("job_id") if channel.topic == "backtests" else None,
        user=user,
        size=len(raw),
    )


ID_STRIDE = 2**40
"""Sequence numbers of stored events within one millisecond step by this
much: the ids in between are the live ticks' (L{TickIds}), which are not
stored but must still order with everything a client sees. Lua (the
history's scripts) counts exactly to 2**53: 8192 events per millisecond."""


class EventIds:
    """
    Ordered event ids of the form C{<milliseconds>-<sequence>}, the shape of
    Redis stream ids, so that ids given here and ids read from a stream
    compare the same way. Never goes backwards, even if the clock does.
    """

    def __init__(self) -> None:
        self._ms = 0
        self._seq = 0

    def next(self, now: float) -> str:
        ms = int(now * 1000)
        if ms > self._ms:
            self._ms, self._seq = ms, 0
        else:
            self._seq += ID_STRIDE
        return f"{self._ms}-{self._seq}"


class TickIds:
    """
    Ids for ticks delivered live without being stored: each sorts after the
    newest stored event delivered before it (C{position}) and before any
    stored later, so a client's last id stays a valid resume point.

    Within one position, ids grow with the microseconds since the
    position's own time (at least by one each), so a daemon restarted, or
    another daemon, gives later ticks larger ids too. They stop growing
    L{ID_STRIDE} microseconds (12 days) after the last stored event. Before
    any event is stored (position C{0-0}), they count from the first tick.
    """

    def __init__(self) -> None:
        self._position = ""
        self._ms = self._seq = self._step = 0
        self._origin = 0  # microseconds the steps count from

    def next(self, position: str, now: float) -> str:
        if position != self._position:
            self._position = position
            self._ms, self._seq = id_key(position)
            self._step = 0
            self._origin = self._ms * 1000 if self._ms else int(now * 1_000_000) - 1
        step = int(now * 1_000_000) - self._origin
        if step <= self._step:
            step = self._step + 1
        self._step = step = min(step, ID_STRIDE - 1)
        return f"{self._ms}-{self._seq + step}"


def id_key(event_id: str) -> tuple[int, int]:
    """
    The sort key of an event id.

    @raise ValueError: if C{event_id} is not of the form C{ms-seq}.
    """
    ms, _, seq = event_id.partition("-")
    # isdigit() alone admits other scripts' digits ("١٢"), which Redis refuses.
    if not (ms.isascii() and seq.isascii() and ms.isdigit() and seq.isdigit()):
        raise ValueError(f"not an event id: {event_id!r}")
    return int(ms), int(seq)


def id_before(event_id: str) -> str:
    """The greatest id that sorts before C{event_id} (for "after" bounds)."""
    ms, seq = id_key(event_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2**31 - 1}"
