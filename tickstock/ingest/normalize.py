"""
Producer message -> canonical event. Liberal in what it accepts: the payload
may be flat or wrapped (see L{tickstock.domain.topics.Channel.unwrap}), fields may
have other names, timestamps come in several forms, event types are open.
Strict in what it makes: one L{Event} whose C{data} has the canonical fields
(symbol upper-cased, C{timestamp} in epoch seconds, numbers finite, the
channel's required fields present) and everything else the producer sent.

Only what cannot be understood is refused, with a reason that says exactly
what was wrong (C{no symbol after unwrapping data.data}). Runs once per
message, before fan-out: its cost is paid once, not per client.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson

from tickstock.domain.events import (
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    MAX_EVENT_ID,
    MAX_STRING,
    SYMBOL,
    Event,
    MalformedEvent,
    depth,
    shown,
)
from tickstock.domain.topics import (
    BACKTESTS,
    DEFAULT_REGISTRY,
    TOPICS,
    Channel,
    Registry,
)

EPOCH_MS_ABOVE = 100_000_000_000
"""An epoch number above this is milliseconds: as seconds it would be after
the year 5000, as milliseconds it is after 1973."""

HEALTH_STATES = ("healthy", "degraded", "down")
_HEALTH_WORDS = {
    **dict.fromkeys(("ok", "up", "running", "online", "active", "started", "ready", "green",
                     "healthy", "alive", "pass", "passing"), "healthy"),
    **dict.fromkeys(("warning", "warn", "degraded", "slow", "partial", "yellow", "lagging",
                     "starting", "stopping", "recovering", "unknown"), "degraded"),
    **dict.fromkeys(("error", "critical", "failed", "failure", "down", "unhealthy", "stopped",
                     "offline", "dead", "red", "fail", "fatal"), "down"),
}
RESULT_FIELDS = ("win_rate", "roi", "sharpe_ratio", "max_drawdown")
_TYPE_FIELDS = ("event_type", "type", "event")
PROBE_FIELDS = frozenset({"test", "timestamp", "source", "type", "event_type"})
"""A message with a C{test} word and nothing but these is the producer's probe."""


class Probe(Exception):
    """The producer's liveness check: counted, neither delivered nor dead-lettered."""


def normalize(channel: Channel, raw: bytes, event_id: str, now: float) -> Event:
    """
    Make the canonical event of one message on C{channel}.

    @param event_id: the id to give it (the history gives the real one).
    @param now: arrival time, epoch seconds: the timestamp of a message
        that has none.
    @raise Probe: for a liveness probe.
    @raise MalformedEvent: when it cannot be understood (C{kind} names the
        problem for counting, the message says exactly what).
    """
    if len(raw) > MAX_EVENT_BYTES:
        raise MalformedEvent("oversized", f"{len(raw)} bytes, limit {MAX_EVENT_BYTES}")
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise MalformedEvent("not_json", f"not JSON: {error}") from None
    if not isinstance(message, dict):
        raise MalformedEvent("not_object",
                             f"expected a JSON object, got {type(message).__name__}")
    # Cheap first: fewer brackets than the limit cannot nest deeper than it.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and depth(message) > MAX_DEPTH:
        raise MalformedEvent("too_deep", f"nested deeper than {MAX_DEPTH} levels")
    if message.get("event_type") == "health_check" or (
            isinstance(message.get("test"), str) and message.keys() <= PROBE_FIELDS):
        raise Probe()

    data, where = _unwrap(channel, message) if channel.unwrap else (message, "")
    event_type = _event_type(channel, message, data) if channel.open_type \
        else channel.event_type
    worked_out = channel.derived.get("plan")
    if worked_out is None:
        worked_out = channel.derived["plan"] = plan(channel)
    aliases, defaults, required, checks, symbol_too, topic_rule = worked_out
    for canonical, names in aliases:
        if canonical not in data:
            for name in names:
                if name in data:
                    data[canonical] = data[name]
                    break
    for name, value in defaults:
        data.setdefault(name, value)
    for name in required:
        if data.get(name) is None:
            raise MalformedEvent("missing_field", f"no {name}{_after(where)} on {channel.name}")

    # Only the fields the topic is about: another topic's field names in
    # the extras (a tick's "confidence") are the producer's business.
    for name, fix in checks:
        fix(data, name)
    if symbol_too and data.get("symbol") is not None:
        _symbol(data, "symbol")
    producer_id = data.get("event_id")
    if producer_id is not None and not (
            isinstance(producer_id, str) and 0 < len(producer_id) <= MAX_EVENT_ID):
        raise MalformedEvent("bad_field", f"event_id must be a string of 1-{MAX_EVENT_ID} chars")
    _timestamp(data, now)
    if topic_rule is not None:
        topic_rule(data, channel, where)

    latest_by = channel.latest_by
    latest: tuple[Any, ...] | None
    if not latest_by:
        latest = None
    elif len(latest_by) == 1:
        latest = (channel.topic, data.get(latest_by[0]))
    else:
        latest = (channel.topic, *[data.get(f) for f in latest_by])
    topic = TOPICS[channel.topic]
    return Event(
        id=event_id, channel=channel.name, topic=channel.topic, type=event_type, data=data,
        symbol=data.get("symbol") if topic.by_symbol else None,
        job_id=data.get("job_id") if topic.targeted else None,
        received_at=now, size=len(raw), latest=latest,
    )


def _after(where: str) -> str:
    return f" after unwrapping {where}" if where else ""


def plan(channel: Channel) -> tuple[Any, ...]:
    """
    What L{normalize} does for C{channel}, worked out once: its aliases
    and defaults as pairs, the required fields, those of them with a rule
    (L{FIELD_RULES}), whether an optional symbol is checked too, and the
    rule of its topic.
    """
    topic = TOPICS[channel.topic]
    if channel.topic == "health":
        rule: Any = _health_status
    elif channel.topic == BACKTESTS and channel.event_type == "backtest_result":
        rule = _backtest_result
    elif channel.topic == "indicators":
        rule = _indicator_values
    else:
        rule = None
    return (tuple(channel.aliases.items()), tuple(channel.defaults.items()), channel.required,
            tuple((name, FIELD_RULES[name]) for name in channel.required if name in FIELD_RULES),
            topic.by_symbol and "symbol" not in channel.required, rule)


def _indicator_values(data: dict[str, Any], channel: Channel, where: str) -> None:
    if data.get("value") is None and not isinstance(data.get("values"), dict):
        raise MalformedEvent("missing_field",
                             f"no value or values{_after(where)} on {channel.name}")


def _unwrap(channel: Channel, message: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """
    The message's fields with the payload's merged over them: the first of
    the channel's C{unwrap} paths that leads to an object. Inner fields win
    (the inner C{timestamp} is the detection's, the outer one the send's);
    the wrappers themselves are dropped, their other fields kept.
    """
    for path, parts in channel.unwrap_parts:
        if type(message.get(parts[0])) is not dict:
            continue
        levels = [message]
        for part in parts:
            inner = levels[-1].get(part)
            if not isinstance(inner, dict):
                break
            levels.append(inner)
        else:
            data: dict[str, Any] = {}
            for level, part in zip(levels, parts, strict=False):
                data.update((k, v) for k, v in level.items() if k != part)
            data.update(levels[-1])
            return data, path
    return message, ""


def _event_type(channel: Channel, message: dict[str, Any], data: dict[str, Any]) -> str:
    """
    The event's type on a channel whose types mean something
    (C{open_type}): the producer's word (C{event_type}, C{type} or
    C{event}, outer first), else the channel's default.
    """
    for source in (message, data):
        for name in _TYPE_FIELDS:
            value = source.get(name)
            if isinstance(value, str) and value:
                if len(value) > MAX_STRING or not value.isprintable():
                    raise MalformedEvent("bad_event_type",
                                         f"event type {shown(value)} is not a name")
                if channel.event_types and value not in channel.event_types:
                    raise MalformedEvent("bad_event_type", f"event type {shown(value)} not "
                                         f"allowed on {channel.name}")
                return value
    return channel.event_type


def _number(value: Any) -> float | None:
    """A finite number, from a number or a numeric string; L{None} otherwise."""
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and 0 < len(value) <= 32:
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def _symbol(data: dict[str, Any], name: str) -> None:
    value = data[name]
    if type(value) is str and SYMBOL.match(value):
        return
    # ASCII only: str.upper() would make "ß" the valid symbol "SS".
    symbol = value.strip().upper() if isinstance(value, str) and value.strip().isascii() \
        else value
    if not isinstance(symbol, str) or not SYMBOL.match(symbol):
        raise MalformedEvent("bad_field",
                             f"symbol {shown(value)} is not 1-10 of A-Z 0-9 . -")
    data[name] = symbol


def _unit(data: dict[str, Any], name: str) -> None:
    value = _number(data[name])
    if value is not None and name == "progress" and 1 < value <= 100:
        value = value / 100  # a percentage
    if value is None or not 0 <= value <= 1:
        raise MalformedEvent("bad_field", f"{name} {shown(data[name])} is not a number 0..1")
    data[name] = value


def _positive(data: dict[str, Any], name: str) -> None:
    value = data[name]
    if type(value) is float and 0 < value < math.inf:
        return
    value = _number(value)
    if value is None or value <= 0:
        raise MalformedEvent("bad_field", f"{name} {shown(data[name])} is not a positive number")
    data[name] = value


def _non_negative(data: dict[str, Any], name: str) -> None:
    value = data[name]
    if type(value) is int and value >= 0:
        return
    value = _number(value)
    if value is None or value < 0:
        raise MalformedEvent("bad_field", f"{name} {shown(data[name])} is not a number >= 0")
    data[name] = value


def _text(data: dict[str, Any], name: str) -> None:
    value = data[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "job_id":
        value = data[name] = str(value)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_STRING:
        raise MalformedEvent("bad_field",
                             f"{name} {shown(value)} is not a string of 1-{MAX_STRING} chars")


FIELD_RULES = {
    "symbol": _symbol, "confidence": _unit, "progress": _unit, "price": _positive,
    "volume": _non_negative, "job_id": _text, "status": _text, "service": _text,
    "pattern": _text, "indicator": _text, "alert_type": _text,
}


def epoch_seconds(value: Any) -> float | None:
    """
    Epoch seconds from epoch seconds, epoch milliseconds or ISO 8601 (C{Z},
    an offset, or naive: UTC); L{None} if it is none of them.
    """
    number = _number(value)
    if number is not None:
        seconds = number / 1000 if number > EPOCH_MS_ABOVE else float(number)
        return seconds if seconds > 0 else None
    if isinstance(value, str) and 0 < len(value) <= 64:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    return None


def _timestamp(data: dict[str, Any], now: float) -> None:
    """C{timestamp} in epoch seconds; the producer's value kept if it differed."""
    value = data.get("timestamp")
    if value is None:
        data["timestamp"] = now
        return
    if type(value) is float and 0 < value <= EPOCH_MS_ABOVE:
        return
    seconds = epoch_seconds(value)
    if seconds is None:
        raise MalformedEvent("bad_timestamp", f"timestamp {shown(value)} not understood")
    if seconds != value:
        data["timestamp_original"] = value
    data["timestamp"] = seconds


def _health_status(data: dict[str, Any], channel: Channel, where: str) -> None:
    """A status word maps to one of L{HEALTH_STATES}; the producer's word is kept."""
    status = data["status"]
    if status in HEALTH_STATES:
        return
    data["status"] = _HEALTH_WORDS.get(status.strip().lower(), "degraded")
    data["status_original"] = status


def _backtest_result(data: dict[str, Any], channel: Channel, where: str) -> None:
    """A completed job's results have the four figures; the time is the message's."""
    data.setdefault("completed_at", data["timestamp"])
    results = data.get("results")
    if data["status"] != "completed":
        return
    if not isinstance(results, dict):
        raise MalformedEvent("missing_field", "no results on a completed backtest")
    for name in RESULT_FIELDS:
        if name not in results:
            raise MalformedEvent("missing_field", f"no results.{name} on a completed backtest")
        value = _number(results[name])
        if value is None:
            raise MalformedEvent("bad_field", f"results.{name} {shown(results[name])} "
                                 "is not a number")
        results[name] = value


def parse_event(channel_name: str, raw: bytes, event_id: str, now: float,
                registry: Registry = DEFAULT_REGISTRY) -> Event:
    """
    L{normalize} a message that came on Redis name C{channel_name}.

    @raise MalformedEvent: also for a name no channel of C{registry} has.
    @raise Probe: for a liveness probe.
    """
    channel = registry.by_redis_name(channel_name)
    if channel is None:
        raise MalformedEvent("unknown_channel",
                             f"no channel is configured for {shown(channel_name)}")
    return normalize(channel, raw, event_id, now)
