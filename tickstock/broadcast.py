"""
Subscriptions, their filters, and fan-out of events to the clients whose
subscriptions match. No I/O here: clients are L{IClient}s and frames are made
by an injected C{prepare} function (Autobahn's C{prepareMessage} in the
daemon), so this module is tested without sockets.

Routing cost grows with the number of matching subscriptions, not with the
number of clients: subscriptions are indexed by topic and symbol, and
targeted topics (a user's own backtests) by user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from zope.interface import implementer

from tickstock.events import SYMBOL, TOPICS, Event
from tickstock.interfaces import IClient, IEventSink

MAX_FILTER_SYMBOLS = 1000
MAX_FILTER_PATTERNS = 100
MAX_ID_LENGTH = 64

_FILTER_FIELDS = {
    "patterns": {"symbols", "patterns", "min_confidence"},
    "market_state": {"symbols"},
    "ticks": {"symbols"},
    "backtests": set(),
    "health": set(),
    "universe": set(),
}


class BadRequest(ValueError):
    """A client request that is refused with C{{"op":"error","code":…}}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Filter:
    """
    What a subscription wants. Every field is optional; L{None} matches all.
    """

    symbols: frozenset[str] | None = None
    patterns: frozenset[str] | None = None
    min_confidence: float | None = None

    def matches(self, event: Event) -> bool:
        """Whether C{event} passes the fields the symbol index did not check."""
        if self.patterns is not None and event.data.get("pattern") not in self.patterns:
            return False
        if self.min_confidence is not None:
            confidence = event.data.get("confidence")
            if confidence is None or confidence < self.min_confidence:
                return False
        return True


def parse_filter(topic: str, raw: Any) -> Filter:
    """
    Check a client's filter for C{topic}.

    @raise BadRequest: naming the field that is wrong.
    """
    if raw is None:
        return Filter()
    if not isinstance(raw, dict):
        raise BadRequest("bad_filter", "filter must be an object")
    if "universe" in raw:
        raise BadRequest("bad_filter", "universe filters are not available in this version")
    unknown = sorted(set(raw) - _FILTER_FIELDS[topic])
    if unknown:
        raise BadRequest("bad_filter", f"filter field {unknown[0]!r} does not apply to {topic}")

    symbols = raw.get("symbols")
    if symbols is not None:
        if not isinstance(symbols, list) or not 0 < len(symbols) <= MAX_FILTER_SYMBOLS:
            raise BadRequest("bad_filter", f"symbols must be a list of 1-{MAX_FILTER_SYMBOLS}")
        for symbol in symbols:
            if not isinstance(symbol, str) or not SYMBOL.match(symbol):
                raise BadRequest("bad_filter", f"not a symbol: {symbol!r}")
        symbols = frozenset(symbols)
    patterns = raw.get("patterns")
    if patterns is not None:
        if not isinstance(patterns, list) or not 0 < len(patterns) <= MAX_FILTER_PATTERNS:
            raise BadRequest("bad_filter", f"patterns must be a list of 1-{MAX_FILTER_PATTERNS}")
        for pattern in patterns:
            if not isinstance(pattern, str) or not 0 < len(pattern) <= 64:
                raise BadRequest("bad_filter", f"not a pattern name: {pattern!r}")
        patterns = frozenset(patterns)
    confidence = raw.get("min_confidence")
    if confidence is not None:
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, (int, float))
            or not 0 <= confidence <= 1
        ):
            raise BadRequest("bad_filter", "min_confidence must be a number from 0 to 1")
        confidence = float(confidence)
    return Filter(symbols, patterns, confidence)


@dataclass(eq=False, slots=True)
class Subscription:
    """One client's interest in one topic."""

    client: IClient
    id: str
    topic: str
    filter: Filter


class JobOwners:
    """
    Which user each backtest job belongs to, so that its progress and
    results reach only that user. Bounded: the oldest jobs are forgotten.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._owners: dict[str, str] = {}
        self._limit = limit

    def add(self, job_id: str, user: str) -> None:
        if len(self._owners) >= self._limit:
            del self._owners[next(iter(self._owners))]
        self._owners[job_id] = user

    def owner(self, job_id: str | None) -> str | None:
        return self._owners.get(job_id) if job_id is not None else None


@implementer(IEventSink)
class Broadcaster:
    """
    Fans each event out to the matching subscriptions, framing it once per
    distinct subscription id rather than once per client.

    @ivar delivered: frames handed to clients.
    @ivar unrouted: targeted events whose owner is unknown.
    """

    def __init__(self, prepare: Callable[[bytes], object], jobs: JobOwners) -> None:
        self._prepare = prepare
        self._jobs = jobs
        self._by_symbol: dict[str, dict[str, set[Subscription]]] = {t: {} for t in TOPICS}
        self._any: dict[str, set[Subscription]] = {t: set() for t in TOPICS}
        self._by_user: dict[str, set[Subscription]] = {}
        self.delivered = 0
        self.unrouted = 0
        self.subscriptions = 0

    def subscribe(self, client: IClient, sub_id: str, topic: str, filter: Filter) -> Subscription:
        """Index a new subscription; the caller keeps it to unsubscribe."""
        sub = Subscription(client, sub_id, topic, filter)
        for bucket in self._buckets(sub, create=True):
            bucket.add(sub)
        self.subscriptions += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove a subscription from the index."""
        for bucket in self._buckets(sub, create=False):
            bucket.discard(sub)
        self.subscriptions -= 1
        self._prune(sub)

    def deliver(self, event: Event) -> None:
        """Send C{event} to every subscription that matches it."""
        if event.topic == "backtests":
            owner = self._jobs.owner(event.job_id)
            if owner is None:
                self.unrouted += 1
                return
            candidates: Iterable[Subscription] = tuple(self._by_user.get(owner, ()))
        elif event.symbol is not None:
            candidates = (
                *self._by_symbol[event.topic].get(event.symbol, ()),
                *self._any[event.topic],
            )
        else:
            candidates = tuple(self._any[event.topic])

        frames: dict[str, object] = {}
        key = event.conflate_key
        sent = 0
        for sub in candidates:
            if not sub.filter.matches(event):
                continue
            frame = frames.get(sub.id)
            if frame is None:
                frame = frames[sub.id] = self._prepare(event.frame(sub.id))
            sub.client.send(frame, key)
            sent += 1
        self.delivered += sent

    def _buckets(self, sub: Subscription, create: bool) -> list[set[Subscription]]:
        if sub.topic == "backtests":
            user = sub.client.user
            if create:
                return [self._by_user.setdefault(user, set())]
            return [self._by_user[user]] if user in self._by_user else []
        if sub.filter.symbols is None:
            return [self._any[sub.topic]]
        index = self._by_symbol[sub.topic]
        if create:
            return [index.setdefault(symbol, set()) for symbol in sub.filter.symbols]
        return [index[symbol] for symbol in sub.filter.symbols if symbol in index]

    def _prune(self, sub: Subscription) -> None:
        if sub.topic == "backtests":
            if not self._by_user.get(sub.client.user, True):
                del self._by_user[sub.client.user]
        elif sub.filter.symbols is not None:
            index = self._by_symbol[sub.topic]
            for symbol in sub.filter.symbols:
                if symbol in index and not index[symbol]:
                    del index[symbol]
