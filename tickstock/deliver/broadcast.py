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

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from zope.interface import implementer

from tickstock.domain.errors import BadRequest
from tickstock.domain.events import SYMBOL, Event, id_key, shown
from tickstock.domain.interfaces import REPLAYED, IClient, IEventSink, IMetered
from tickstock.domain.topics import TOPIC_NAMES, TOPICS

MAX_FILTER_SYMBOLS = 1000
MAX_FILTER_PATTERNS = 100
MAX_ID_LENGTH = 64
UNIVERSE_KEY = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}\Z")



@dataclass(frozen=True, slots=True)
class Filter:
    """
    What a subscription wants. Every field is optional; L{None} matches all.

    @ivar universe: a universe key whose symbols are added to C{symbols}
        once resolved, and again whenever the universe changes.
    """

    symbols: frozenset[str] | None = None
    patterns: frozenset[str] | None = None
    min_confidence: float | None = None
    universe: str | None = None

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
    unknown = sorted(set(raw) - TOPICS[topic].filters)
    if unknown:
        raise BadRequest("bad_filter",
                         f"filter field {shown(unknown[0])} does not apply to {topic}")

    symbols = raw.get("symbols")
    if symbols is not None:
        if not isinstance(symbols, list) or not 0 < len(symbols) <= MAX_FILTER_SYMBOLS:
            raise BadRequest("bad_filter", f"symbols must be a list of 1-{MAX_FILTER_SYMBOLS}")
        for symbol in symbols:
            if not isinstance(symbol, str) or not SYMBOL.match(symbol):
                raise BadRequest("bad_filter", f"not a symbol: {shown(symbol)}")
        symbols = frozenset(symbols)
    patterns = raw.get("patterns")
    if patterns is not None:
        if not isinstance(patterns, list) or not 0 < len(patterns) <= MAX_FILTER_PATTERNS:
            raise BadRequest("bad_filter", f"patterns must be a list of 1-{MAX_FILTER_PATTERNS}")
        for pattern in patterns:
            if not isinstance(pattern, str) or not 0 < len(pattern) <= 64:
                raise BadRequest("bad_filter", f"not a pattern name: {shown(pattern)}")
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
    universe = raw.get("universe")
    if universe is not None and not (
        isinstance(universe, str) and UNIVERSE_KEY.match(universe)
    ):
        raise BadRequest("bad_filter", "universe must be a universe key (1-64 of A-Za-z0-9_.:-)")
    return Filter(symbols, patterns, confidence, universe)


@dataclass(eq=False, slots=True)
class Subscription:
    """
    One client's interest in one topic.

    @ivar held: while the subscription's history is being replayed, the live
        events that match it, held back so that none is sent before the
        replay or twice; L{None} once it is live.
    @ivar floor: after a replay, the id key of the newest event it sent:
        live delivery may still be catching up to it, and what is not newer
        was sent already. L{None} once a newer live event has passed.
    @ivar frame_key: what an event's frame for it is shared by: its id, and
        its client's dialect unless that is the C{/ws} one.
    """

    client: IClient
    id: str
    topic: str
    filter: Filter
    held: list[Event] | None = None
    floor: tuple[int, int] | None = None
    frame_key: Any = None

    def wants(self, event: Event) -> bool:
        """Whether C{event} matches, checked in full (not via the index)."""
        if event.topic != self.topic:
            return False
        if self.topic == "backtests":
            return event.user is not None and event.user == self.client.user
        symbols = self.filter.symbols
        if symbols is not None and event.symbol not in symbols:
            return False
        return self.filter.matches(event)


@implementer(IEventSink, IMetered)
class Broadcaster:
    """
    Fans each event out to the matching subscriptions, framing it once per
    distinct subscription id (and client dialect) rather than once per client.

    @ivar delivered: frames handed to clients.
    @ivar unrouted: targeted events whose owner is unknown.
    """

    def __init__(self, prepare: Callable[[bytes], object]) -> None:
        self._prepare = prepare
        self._by_symbol: dict[str, dict[str, set[Subscription]]] = {t: {} for t in TOPIC_NAMES}
        self._any: dict[str, set[Subscription]] = {t: set() for t in TOPICS}
        self._by_user: dict[str, set[Subscription]] = {}
        self.delivered = 0
        self.unrouted = 0
        self.subscriptions = 0
        self.by_topic: Counter[str] = Counter()

    def subscribe(self, client: IClient, sub_id: str, topic: str, filter: Filter,
                  hold: bool = False) -> Subscription:
        """
        Index a new subscription; the caller keeps it to unsubscribe. With
        C{hold}, live events are held until L{release}.
        """
        dialect = client.dialect
        sub = Subscription(client, sub_id, topic, filter, [] if hold else None,
                           frame_key=sub_id if dialect is None else (dialect, sub_id))
        for bucket in self._buckets(sub, create=True):
            bucket.add(sub)
        self.subscriptions += 1
        self.by_topic[topic] += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove a subscription from the index."""
        for bucket in self._buckets(sub, create=False):
            bucket.discard(sub)
        self.subscriptions -= 1
        self.by_topic[sub.topic] -= 1
        self._prune(sub)

    def retarget(self, sub: Subscription, symbols: frozenset[str] | None) -> None:
        """Give a live subscription a new symbol set (its universe changed)."""
        if symbols == sub.filter.symbols:
            return
        for bucket in self._buckets(sub, create=False):
            bucket.discard(sub)
        self._prune(sub)
        sub.filter = replace(sub.filter, symbols=symbols)
        for bucket in self._buckets(sub, create=True):
            bucket.add(sub)

    def release(self, sub: Subscription, replayed: list[Event], after: str,
                announce: Callable[[int], None]) -> str | None:
        """
        End a subscription's replay: send C{replayed} (the history after
        C{after}, oldest first), then the live events held meanwhile that
        are newer than both, then go live. Latest-only topics send only the
        newest replayed event per key. C{announce} is told how many events
        the replay sends (history and held) before any is sent.
        """
        held, sub.held = sub.held or [], None
        last = id_key(after)
        seen: set[Any] = set()
        events = []
        for event in reversed(replayed):
            key = event.conflate_key
            if sub.wants(event) and (key is None or key not in seen):
                seen.add(key)
                events.append(event)
        events.reverse()
        if replayed:
            last = max(last, id_key(replayed[-1].id))
        events += [e for e in held if id_key(e.id) > last]
        announce(len(events))
        sub.floor = max(last, id_key(events[-1].id)) if events else last
        for event in events:
            sub.client.send(self._prepare(sub.client.frame(event, sub.id)), REPLAYED)
        self.delivered += len(events)
        return events[-1].id if events else None

    def snapshot(self, sub: Subscription, current: list[Event]) -> None:
        """
        Send a new subscription the current values it wants
        (L{Event.as_snapshot}), before any live event.
        """
        for event in current:
            frame = sub.client.frame(event.as_snapshot(), sub.id)
            sub.client.send(self._prepare(frame), REPLAYED)
        self.delivered += len(current)

    def deliver(self, event: Event) -> int:
        """Send C{event} to every subscription that matches it; how many."""
        if event.topic == "backtests":
            if event.user is None:
                self.unrouted += 1
                return 0
            candidates: Iterable[Subscription] = tuple(self._by_user.get(event.user, ()))
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
            if sub.held is not None:
                sub.held.append(event)
                continue
            if sub.floor is not None:
                if id_key(event.id) <= sub.floor:
                    continue
                sub.floor = None
            frame = frames.get(sub.frame_key)
            if frame is None:
                frame = frames[sub.frame_key] = self._prepare(sub.client.frame(event, sub.id))
            sub.client.send(frame, None if key is None else (sub.id, key))
            sent += 1
        self.delivered += sent
        return sent

    def status(self) -> dict[str, Any]:
        return {"subscriptions": self.subscriptions, "delivered": self.delivered,
                "unrouted_targeted": self.unrouted}

    def breakdown(self) -> dict[str, Any]:
        return {"subscriptions_by_topic": +self.by_topic}

    def watched(self, topic: str, symbol: str | None) -> bool:
        """Whether any subscription to C{topic} may want an event of C{symbol}."""
        return bool(self._any[topic]) or symbol in self._by_symbol[topic]

    def clients_of(self, topic: str) -> set[IClient]:
        """Every client with a subscription to C{topic}."""
        subs: set[Subscription] = set(self._any[topic])
        for bucket in self._by_symbol[topic].values():
            subs |= bucket
        if topic == "backtests":
            for bucket in self._by_user.values():
                subs |= bucket
        return {sub.client for sub in subs}

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
