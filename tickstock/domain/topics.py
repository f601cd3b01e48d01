"""
The one registry of what producer messages mean: the topics clients
subscribe to, and the channels that feed them.

A I{topic} is what a client subscribes to; its properties (which filter
fields apply, whether its events are kept in PostgreSQL, whether only the
owner of a job gets them) are code, because the rest of TickStock is
written against them. A I{channel} is configuration: which Redis names feed
a topic, where the payload sits in the producer's message, what its fields
may be called, what must be there after normalizing, and whether newer
events supersede older ones. The defaults below cover every shape the
producer is known to publish (docs/producers.md); C{[channels.NAME]} tables
in the TOML file add channels or override fields of these (L{configure}).

No Twisted and no I/O here: plain data, read by the normalizer, the
sources, the router, fan-out and the stores.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Topic:
    """
    What a client subscribes to.

    @ivar filters: the filter fields a subscription to it may use.
    @ivar by_symbol: events carry a symbol (optional for some), and fan-out
        indexes subscriptions by it.
    @ivar stored: events are kept in PostgreSQL (C{/api/patterns}, and the
        catch-up of a client whose gap is older than the Redis history).
    @ivar targeted: events go only to the user who owns their job.
    """

    name: str
    filters: frozenset[str] = frozenset()
    by_symbol: bool = False
    stored: bool = False
    targeted: bool = False


_SYMBOL_FILTERS = frozenset({"symbols", "universe"})

TOPICS: Mapping[str, Topic] = MappingProxyType({topic.name: topic for topic in (
    Topic("patterns", _SYMBOL_FILTERS | {"patterns", "min_confidence"}, by_symbol=True,
          stored=True),
    Topic("market_state", _SYMBOL_FILTERS, by_symbol=True, stored=True),
    Topic("backtests", targeted=True),
    Topic("health"),
    Topic("ticks", _SYMBOL_FILTERS, by_symbol=True),
    Topic("universe"),
    Topic("indicators", _SYMBOL_FILTERS, by_symbol=True),
    Topic("alerts", _SYMBOL_FILTERS, by_symbol=True, stored=True),
)})
TOPIC_NAMES = tuple(TOPICS)
STORED_TOPICS = tuple(name for name, topic in TOPICS.items() if topic.stored)
BACKTESTS = "backtests"
TICKS = "ticks"
UNIVERSE = "universe"

REDIS_NAME = re.compile(r"^[A-Za-z0-9_.:*\-]{1,128}\Z")


@dataclass(frozen=True)
class Channel:
    """
    One producer channel: how its messages become events of C{topic}.

    @ivar name: the channel's name in TickStock (kept with each event it
        produced); by default also its one Redis name.
    @ivar redis: the Redis names that feed it (default: its name; none for
        a channel fed from elsewhere); a name with C{*} is a pattern (pub/sub
        only: a stream must be named exactly).
    @ivar event_type: the type of its events; with C{open_type}, of a
        message that names none.
    @ivar open_type: the producer's own word for the type is the event's
        type (market state: C{ranking_change}, C{stage_change}, ...);
        otherwise every event of the channel has C{event_type}, and the
        producer's word stays in C{data}.
    @ivar event_types: with C{open_type}, the types allowed; empty: any.
    @ivar unwrap: where the payload may sit, tried in order (C{"data.data"},
        C{"data"}, C{"detection"}, ...); the first that is an object is
        merged over the message's outer fields.
    @ivar aliases: for a canonical field, the other names producers give it.
    @ivar required: the fields an event must have after normalizing.
    @ivar latest_by: for a latest-only channel, the fields whose values
        name what a newer event supersedes (ticks per symbol, progress per
        job); empty: must-deliver, never skipped.
    @ivar defaults: fields given to a message that has none of them.
    @ivar stored: off: its events are not written to PostgreSQL even if
        their topic is stored (they came from there).
    @ivar derived: what a part works out once from this channel and keeps
        with it (the normalizer's plan), so nothing is worked out per
        message and no part keeps a table of channels of its own.
    """

    name: str
    topic: str
    event_type: str
    redis: tuple[str, ...] | None = None
    open_type: bool = False
    event_types: tuple[str, ...] = ()
    unwrap: tuple[str, ...] = ()
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    latest_by: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    stored: bool = True
    derived: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.redis is None:
            object.__setattr__(self, "redis", (self.name,))

    @property
    def latest_only(self) -> bool:
        return bool(self.latest_by)

    @cached_property
    def unwrap_parts(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The C{unwrap} paths, each with its keys."""
        return tuple((path, tuple(path.split("."))) for path in self.unwrap)




_WRAPPED = ("data.data", "data")
_SYMBOL = {"symbol": ("ticker", "sym")}
_PATTERN = {**_SYMBOL, "pattern": ("pattern_name", "pattern_type", "name")}

DEFAULT_CHANNELS: tuple[Channel, ...] = (
    Channel("tickstock.events.patterns", "patterns", "pattern_detected",
            redis=("tickstock.events.patterns", "tickstock:patterns:streaming",
                   "tickstock:patterns:detected"),
            unwrap=(*_WRAPPED, "detection"), aliases=_PATTERN,
            required=("symbol", "pattern", "confidence")),
    Channel("tickstock.events.market_state", "market_state", "ranking_change",
            open_type=True, unwrap=_WRAPPED, aliases=_SYMBOL),
    Channel("tickstock.events.backtesting.progress", "backtests", "backtest_progress",
            unwrap=_WRAPPED, required=("job_id", "progress", "status"),
            latest_by=("job_id",), defaults={"status": "processing"}),
    Channel("tickstock.events.backtesting.results", "backtests", "backtest_result",
            unwrap=_WRAPPED, required=("job_id", "status"),
            defaults={"status": "completed"}),
    Channel("tickstock.health.status", "health", "health",
            redis=("tickstock.health.status", "tickstock:streaming:health",
                   "tickstock:processing:status"),
            unwrap=(*_WRAPPED, "payload"), aliases={"service": ("source", "component")},
            required=("service", "status"), latest_by=("service",)),
    Channel("tickstock:streaming:session_started", "health", "session_started",
            unwrap=(*_WRAPPED, "payload"), aliases={"service": ("source",)},
            required=("service", "status"), latest_by=("service",),
            defaults={"status": "healthy", "service": "streaming"}),
    Channel("tickstock:streaming:session_stopped", "health", "session_stopped",
            unwrap=(*_WRAPPED, "payload"), aliases={"service": ("source",)},
            required=("service", "status"), latest_by=("service",),
            defaults={"status": "down", "service": "streaming"}),
    Channel("tickstock.data.ticks", "ticks", "tick",
            redis=("tickstock.data.ticks", "tickstock.all_ticks", "tickstock.ticks.*",
                   "tickstock:market:ticks"),
            unwrap=_WRAPPED, aliases=_SYMBOL, required=("symbol", "price", "volume"),
            latest_by=("symbol",)),
    Channel("tickstock:indicators:streaming", "indicators", "indicator_calculated",
            unwrap=("calculation", *_WRAPPED),
            aliases={**_SYMBOL, "indicator": ("indicator_type", "name")},
            required=("symbol", "indicator"), latest_by=("symbol", "indicator")),
    Channel("tickstock:alerts:indicators", "alerts", "indicator_alert",
            redis=("tickstock:alerts:indicators", "tickstock:alerts:critical"),
            unwrap=("alert", *_WRAPPED), aliases={**_SYMBOL, "alert_type": ("type_of_alert",)},
            required=("symbol", "alert_type")),
    Channel("tickstock.universe.updated", "universe", "universe_updated", open_type=True,
            redis=("tickstock.universe.updated", "tickstock:universe:updated"),
            unwrap=("payload",)),
    Channel("tickstock.cache.sync_complete", "universe", "cache_sync_complete", open_type=True,
            redis=("tickstock.cache.sync_complete", "tickstock:cache:sync_complete"),
            unwrap=("payload",)),
    Channel("tickstock.etf.correlation_update", "universe", "etf_correlation_update",
            open_type=True, unwrap=("payload",)),
    Channel("tickstock.cache.ipo_assignment", "universe", "ipo_assignment", open_type=True,
            unwrap=("payload",)),
    Channel("tickstock.cache.delisting_cleanup", "universe", "delisting_cleanup", open_type=True,
            unwrap=("payload",)),
    Channel("tickstock.db.events", "patterns", "pattern_detected", redis=(), aliases=_PATTERN,
            required=("symbol", "pattern", "confidence"), stored=False),
)
"""The producer channels TickStock reads when the TOML file changes nothing.
C{tickstock.db.events} is fed by PostgreSQL (rows a producer inserted into
C{events}), not by Redis: it has no Redis name."""

JOBS_CHANNEL = "tickstock.jobs.backtest"
CANCEL_CHANNEL = "tickstock.jobs.cancel"
CONTROL_CHANNEL = "tickstock.jobs.control"


class Registry:
    """
    The channels of one daemon, looked up by Redis name. Exact names are a
    dict lookup; a name no exact one matches is tried against the patterns
    once and remembered (boundedly: a producer may use many names).
    """

    MAX_REMEMBERED = 100_000

    def __init__(self, channels: Iterable[Channel] = DEFAULT_CHANNELS) -> None:
        self.channels: dict[str, Channel] = {}
        self._exact: dict[str, Channel] = {}
        self._patterns: list[tuple[str, Channel]] = []
        for channel in channels:
            self.channels[channel.name] = channel
            for name in channel.redis or ():
                if "*" in name:
                    self._patterns.append((name, channel))
                else:
                    self._exact[name] = channel
        self._matched: dict[str, Channel | None] = {}

    def by_redis_name(self, name: str) -> Channel | None:
        """The channel a message on Redis name C{name} belongs to, if any."""
        channel = self._exact.get(name)
        if channel is not None or not self._patterns:
            return channel
        try:
            return self._matched[name]
        except KeyError:
            pass
        found = next((c for pattern, c in self._patterns
                      if fnmatch.fnmatchcase(name, pattern)), None)
        if len(self._matched) < self.MAX_REMEMBERED:
            self._matched[name] = found
        return found

    def get(self, name: str) -> Channel | None:
        """A channel by its own name (as kept with stored events)."""
        return self.channels.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        """The exact Redis names to subscribe to (or read as streams)."""
        return tuple(self._exact)

    @property
    def patterns(self) -> tuple[str, ...]:
        """The Redis name patterns to subscribe to (pub/sub only)."""
        return tuple(dict.fromkeys(pattern for pattern, _ in self._patterns))


DEFAULT_REGISTRY = Registry()

_LIST_FIELDS = ("redis", "event_types", "unwrap", "required", "latest_by")
_FIELD_NAMES = {f.name for f in fields(Channel)}


def configure(tables: Mapping[str, Any]) -> Registry:
    """
    The default channels with the TOML file's C{[channels.NAME]} tables
    applied: a table for a known channel overrides the fields it gives; one
    for a new name adds a channel (C{topic} required). Every table is
    checked.

    @raise ValueError: one line per problem, joined by newlines.
    """
    if not tables:
        return DEFAULT_REGISTRY
    channels = {channel.name: channel for channel in DEFAULT_CHANNELS}
    problems: list[str] = []
    for name, table in tables.items():
        where = f"[channels.{name!r}]" if not re.match(r"^[A-Za-z0-9_]+\Z", name) \
            else f"[channels.{name}]"
        if not isinstance(table, dict):
            problems.append(f"{where}: expected a table")
            continue
        try:
            changes = _channel_fields(table)
            base = channels.get(name)
            if base is None:
                if "topic" not in changes:
                    raise ValueError("a new channel needs a topic")
                changes.setdefault("event_type", name.replace(".", "_").replace(":", "_"))
                channels[name] = Channel(name=name, **changes)
            else:
                channels[name] = replace(base, **changes)
        except (TypeError, ValueError) as error:
            problems.append(f"{where}: {error}")
    seen: dict[str, str] = {}
    for channel in channels.values():
        for redis_name in channel.redis or ():
            if redis_name in seen and seen[redis_name] != channel.name:
                problems.append(f"[channels.{channel.name}]: Redis name {redis_name!r} "
                                f"already feeds {seen[redis_name]}")
            seen[redis_name] = channel.name
    if problems:
        raise ValueError("\n".join(problems))
    return Registry(channels.values())


def _channel_fields(table: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(key for key in table if key not in _FIELD_NAMES or key == "name")
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key in _LIST_FIELDS:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{key} must be a list of strings")
            if key == "redis" and not all(REDIS_NAME.match(v) for v in value):
                raise ValueError("redis names are 1-128 of A-Za-z0-9_.:-*")
            changes[key] = tuple(value)
        elif key in ("topic", "event_type"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty string")
            if key == "topic" and value not in TOPICS:
                raise ValueError(f"topic must be one of {', '.join(TOPICS)}; got {value!r}")
            changes[key] = value
        elif key == "aliases":
            if not isinstance(value, dict) or not all(
                    isinstance(v, list) and all(isinstance(a, str) for a in v)
                    for v in value.values()):
                raise ValueError("aliases must map a field to a list of names")
            changes[key] = {k: tuple(v) for k, v in value.items()}
        elif key == "defaults":
            if not isinstance(value, dict):
                raise ValueError("defaults must be a table")
            changes[key] = dict(value)
        elif key in ("stored", "open_type"):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false")
            changes[key] = value
    return changes
