"""
The embedded store: L{IStore} in memory, for the demo and as the reference
for what the PostgreSQL store answers. Bounded (the newest events, the
recent bars) and lost on restart, by design.

Times it reports (C{first_seen}, C{last_seen}, C{updated}) are epoch
seconds; the REST API formats them.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from tickstock.domain.events import SYMBOL, Event, id_key
from tickstock.domain.interfaces import IJobStore, ITickMarks
from tickstock.domain.jobs import ACTIVE, update_of
from tickstock.domain.records import Bar, PatternQuery
from tickstock.domain.topics import STORED_TOPICS
from tickstock.store import UNIVERSE_TYPES, pattern_row

Key = tuple[int, int]


class _Topic:
    """One topic's events, by id, with their ids kept sorted."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.events: dict[Key, Event] = {}

    def add(self, key: Key, event: Event) -> bool:
        if key in self.events:
            return False
        self.events[key] = event
        if not self.keys or key > self.keys[-1]:
            self.keys.append(key)
        else:
            insort(self.keys, key)
        return True

    def drop_oldest(self, n: int) -> None:
        for key in self.keys[:n]:
            del self.events[key]
        del self.keys[:n]


@dataclass
class _Universe:
    key: str
    type: str
    symbols: list[str]
    category: str | None
    metadata: dict[str, Any] | None
    updated: float | None

    def summary(self) -> dict[str, Any]:
        return {"key": self.key, "type": self.type, "category": self.category,
                "symbol_count": len(self.symbols), "updated": self.updated}

    def full(self) -> dict[str, Any]:
        return {"key": self.key, "type": self.type, "category": self.category,
                "symbols": list(self.symbols), "metadata": self.metadata or {},
                "updated": self.updated}


@dataclass
class _Minute:
    """One symbol-minute: its parts, and the bar they combine into."""

    parts: dict[str, Bar] = field(default_factory=dict)
    bar: dict[str, Any] = field(default_factory=dict)

    def put(self, part: Bar) -> None:
        known = self.parts.get(part.part)
        if known is not None and known.ticks > part.ticks:
            return
        self.parts[part.part] = part
        parts = self.parts.values()
        first = min(parts, key=lambda p: (p.open_ts, p.part))
        last = max(parts, key=lambda p: (p.close_ts, p.part))
        self.bar = {
            "minute": part.minute,
            "open": first.open,
            "high": max(p.high for p in parts),
            "low": min(p.low for p in parts),
            "close": last.close,
            "volume": sum(p.volume for p in parts),
        }


JOBS_KEPT = 100_000


@implementer(ITickMarks, IJobStore)
class MemoryStore:
    """
    Events of L{STORED_TOPICS} (at most C{max_events}, the oldest ids
    dropped first), 1-minute bars of the last C{bar_minutes} minutes by
    C{clock}, the symbols seen, and universes.

    Same semantics as the PostgreSQL store: a bar part replaces the earlier
    version of the same C{(symbol, minute, part)} unless it has fewer ticks
    (an aggregate only grows, so that is a stale retry arriving late), and
    the bar is the combination of all its parts (open of the earliest
    C{open_ts}, close of the latest C{close_ts}, ties broken by part name);
    an event id already stored is not stored again; tick marks only rise.
    """

    ready = True

    def __init__(
        self, clock: IReactorTime,
        universes: Mapping[str, Mapping[str, Any]] | None = None,
        max_events: int = 100_000, bar_minutes: int = 24 * 60,
    ) -> None:
        """
        @param universes: C{{key: {"type", "symbols", "category",
            "metadata", "updated"}}}; C{type} and C{symbols} are required.
        """
        self._clock = clock
        self._max_events = max_events
        self._bar_seconds = bar_minutes * 60
        self._topics = {topic: _Topic() for topic in STORED_TOPICS}
        self._event_count = 0
        self._bars: dict[str, dict[int, _Minute]] = {}
        self._bar_minutes: dict[str, list[int]] = {}
        self._oldest: list[tuple[int, str]] = []
        self._symbols: dict[str, list[float]] = {}
        self._universes: dict[str, _Universe] = {}
        self._jobs: dict[str, dict[str, Any]] = {}  # in creation order
        self._marks: dict[str, dict[str, Key]] = {}
        for key, spec in (universes or {}).items():
            self.set_universe(key, spec["type"], spec["symbols"], spec.get("category"),
                              spec.get("metadata"), spec.get("updated"))

    def status(self) -> dict[str, Any]:
        return {"state": "ready", "kind": "memory", "events": self._event_count,
                "bars": len(self._oldest), "symbols": len(self._symbols)}

    def write(self, bars: Iterable[Bar], events: Iterable[Event],
              marks: tuple[str, Mapping[str, Key]] | None = None) -> Deferred[None]:
        now = self._clock.seconds()
        if marks is not None:
            node, newest = marks
            kept = self._marks.setdefault(node, {})
            for symbol, key in newest.items():
                if key > kept.get(symbol, (0, 0)):
                    kept[symbol] = key
        cutoff = now - self._bar_seconds
        for part in bars:
            self._seen(part.symbol, now)
            if part.minute >= cutoff:
                self._put_bar(part)
        for event in events:
            if event.symbol is not None:
                self._seen(event.symbol, now)
            update = update_of(event)
            if update is not None:
                self._update_job(event.job_id, *update,  # type: ignore[arg-type]
                                 at=event.received_at or now)
                continue
            topic = self._topics.get(event.topic)
            if topic is not None and topic.add(id_key(event.id), event):
                self._event_count += 1
        self._trim(cutoff)
        return succeed(None)

    def tick_marks(self, node: str) -> Deferred[dict[str, Key]]:
        return succeed(dict(self._marks.get(node, {})))

    def _update_job(self, job_id: str, status: str, progress: float | None, results: Any,
                    error: str | None, at: float) -> None:
        job = self._jobs.get(job_id)
        if job is None or job["status"] not in ACTIVE:
            return
        job.update(status=status, updated_at=at)
        if progress is not None:
            job["progress"] = progress
        if results is not None:
            job["results"] = results
        if error is not None:
            job["error"] = error

    # IJobStore

    def create_job(self, record: Mapping[str, Any], max_active: int) -> Deferred[bool]:
        user = record["user_id"]
        active = sum(1 for j in self._jobs.values()
                     if j["user_id"] == user and j["status"] in ACTIVE)
        if active >= max_active:
            return succeed(False)
        if len(self._jobs) >= JOBS_KEPT:
            del self._jobs[next(iter(self._jobs))]
        self._jobs[record["job_id"]] = dict(record)
        return succeed(True)

    def job(self, job_id: str) -> Deferred[dict[str, Any] | None]:
        job = self._jobs.get(job_id)
        return succeed(None if job is None else dict(job))

    def jobs(self, user: str, before: str | None, limit: int) -> Deferred[list[dict[str, Any]]]:
        mine = [j for j in self._jobs.values() if j["user_id"] == user]
        if before is not None:
            cut = next((i for i, j in enumerate(mine) if j["job_id"] == before), None)
            mine = [] if cut is None else mine[:cut]
        return succeed([dict(j) for j in reversed(mine[-limit:])])

    def stale_jobs(self, cutoff: float, limit: int) -> Deferred[list[dict[str, Any]]]:
        stale = [dict(j) for j in self._jobs.values()
                 if j["status"] in ACTIVE and j["updated_at"] < cutoff]
        return succeed(stale[:limit])

    def close_job(self, job_id: str, status: str, error: str | None,
                  at: float) -> Deferred[None]:
        self._update_job(job_id, status, None, None, error, at)
        return succeed(None)

    def _seen(self, symbol: str, now: float) -> None:
        times = self._symbols.get(symbol)
        if times is None:
            self._symbols[symbol] = [now, now]
        else:
            times[1] = max(times[1], now)

    def _put_bar(self, part: Bar) -> None:
        minutes = self._bars.setdefault(part.symbol, {})
        slot = minutes.get(part.minute)
        if slot is None:
            slot = minutes[part.minute] = _Minute()
            insort(self._bar_minutes.setdefault(part.symbol, []), part.minute)
            insort(self._oldest, (part.minute, part.symbol))
        slot.put(part)

    def _trim(self, cutoff: float) -> None:
        # Oldest first across topics, a run at a time: one list cut per run,
        # not one per event (popping the front of a long list is O(n)).
        while self._event_count > self._max_events:
            logs = [t for t in self._topics.values() if t.keys]
            oldest = min(logs, key=lambda t: t.keys[0])
            nexts = [t.keys[0] for t in logs if t is not oldest]
            run = bisect_left(oldest.keys, min(nexts)) if nexts else len(oldest.keys)
            n = max(1, min(run, self._event_count - self._max_events))
            oldest.drop_oldest(n)
            self._event_count -= n
        drop = bisect_left(self._oldest, (cutoff, ""))
        for minute, symbol in self._oldest[:drop]:
            del self._bars[symbol][minute]
            self._bar_minutes[symbol].remove(minute)
        del self._oldest[:drop]

    def events_after(
        self, topic: str, after: str | None, until: str | None,
        symbols: Iterable[str] | None, limit: int,
    ) -> Deferred[list[Event]]:
        log = self._topics.get(topic)
        if log is None:
            return succeed([])
        start = 0 if after is None else bisect_right(log.keys, id_key(after))
        end = len(log.keys) if until is None else bisect_right(log.keys, id_key(until))
        wanted = None if symbols is None else set(symbols)
        found: list[Event] = []
        for key in log.keys[start:end]:
            if len(found) >= limit:
                break
            event = log.events[key]
            if wanted is None or event.symbol in wanted:
                found.append(event)
        return succeed(found)

    def patterns(self, query: PatternQuery) -> Deferred[list[dict[str, Any]]]:
        log = self._topics["patterns"]
        end = len(log.keys) if query.before is None else bisect_left(log.keys, id_key(query.before))
        rows: list[dict[str, Any]] = []
        for i in range(end - 1, -1, -1):
            if len(rows) >= query.limit:
                break
            event = log.events[log.keys[i]]
            data = event.data
            if query.symbol is not None and event.symbol != query.symbol:
                continue
            if query.pattern is not None and data.get("pattern") != query.pattern:
                continue
            if query.min_confidence is not None \
                    and not data.get("confidence", 0) >= query.min_confidence:
                continue
            if query.since is not None and not data.get("timestamp", 0) >= query.since:
                continue
            rows.append(pattern_row(event))
        return succeed(rows)

    def symbols(self) -> Deferred[list[dict[str, Any]]]:
        return succeed([
            {"symbol": symbol, "first_seen": first, "last_seen": last}
            for symbol, (first, last) in sorted(self._symbols.items())
        ])

    def ohlcv(self, symbol: str, since: float | None, until: float | None,
              limit: int) -> Deferred[list[dict[str, Any]]]:
        minutes = self._bar_minutes.get(symbol, [])
        start = 0 if since is None else bisect_left(minutes, since)
        end = len(minutes) if until is None else bisect_left(minutes, until)
        end = min(end, start + limit)
        bars = self._bars.get(symbol, {})
        return succeed([dict(bars[m].bar) for m in minutes[start:end]])

    def universes(self) -> Deferred[list[dict[str, Any]]]:
        return succeed([u.summary() for u in sorted(
            self._universes.values(), key=lambda u: (u.key, u.type))])

    def universe(self, key: str) -> Deferred[dict[str, Any] | None]:
        found = self._universes.get(key)
        return succeed(None if found is None else found.full())

    def set_universe(
        self, key: str, type: str, symbols: Iterable[str], category: str | None = None,
        metadata: dict[str, Any] | None = None, updated: float | None = None,
    ) -> None:
        """
        Create or replace the universe C{key} (as the producer's universe
        updates do in C{cache_entries}).

        @raise ValueError: for an unknown C{type} or a malformed symbol.
        """
        if type not in UNIVERSE_TYPES:
            raise ValueError(f"universe type must be one of {UNIVERSE_TYPES}, not {type!r}")
        members = list(symbols)
        bad = [s for s in members if not (isinstance(s, str) and SYMBOL.match(s))]
        if bad:
            raise ValueError(f"not symbols: {bad[:5]!r}")
        self._universes[key] = _Universe(
            key, type, members, category, metadata,
            self._clock.seconds() if updated is None else updated,
        )
