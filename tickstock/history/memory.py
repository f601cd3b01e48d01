"""The embedded history: one process, no Redis; lost on restart, by design."""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from tickstock.domain.events import Event, EventIds, id_key
from tickstock.domain.interfaces import IHistory
from tickstock.domain.jobs import outcome
from tickstock.domain.stored import Refused, Replay
from tickstock.domain.topics import TOPIC_NAMES
from tickstock.history import BOOKMARK_EVERY, DEDUPE_MAX, DEDUPE_WINDOW, Appended, missed

JOBS_KEPT = 100_000


@dataclass
class _Job:
    owner: str
    final: str | None = None


class _Log:
    """One bounded, ordered log of events (a topic's, or a user's)."""

    def __init__(self, limit: int, max_age: float) -> None:
        self.events: deque[Event] = deque()
        self._limit = limit
        self._max_age = max_age
        self.last_dropped: str | None = None
        self.dropped = 0
        self._marks: list[tuple[tuple[int, int], int]] = []

    def add(self, event: Event, now: float) -> None:
        self.events.append(event)
        events = self.events
        while events and (
            len(events) > self._limit or events[0].received_at < now - self._max_age
        ):
            self._drop(events.popleft())

    def _drop(self, event: Event) -> None:
        self.last_dropped = event.id
        self.dropped += 1
        if self.dropped % BOOKMARK_EVERY == 0:
            self._marks.append((id_key(event.id), self.dropped))
            if len(self._marks) > 2000:
                del self._marks[:1000]

    def replay(self, after: str) -> Replay:
        key = id_key(after)
        events = [e for e in self.events if id_key(e.id) > key]
        at = bisect_right(self._marks, (key, float("inf")))
        through = self._marks[at - 1][1] if at else 0
        return Replay(events, missed(after, self.last_dropped, self.dropped, through))


@implementer(IHistory)
class MemoryHistory:
    """
    Per-topic and per-user logs in memory, bounded by count and age, with
    ids from one process-wide L{EventIds}. A producer C{event_id} is a
    duplicate for C{dedupe_window} seconds on its channel, while fewer than
    L{DEDUPE_MAX} others came after it there: exactly the window the Redis
    history guarantees (which may remember one up to twice as long).
    """

    def __init__(self, clock: IReactorTime, max_events: int, max_age: float,
                 user_max: int, dedupe_window: float = DEDUPE_WINDOW) -> None:
        self._clock = clock
        self._ids = EventIds()
        self._max_age = max_age
        self._user_max = user_max
        self._dedupe_window = dedupe_window
        self._topics = {t: _Log(max_events, max_age) for t in TOPIC_NAMES}
        self._users: dict[str, _Log] = {}
        self._jobs: dict[str, _Job] = {}
        self._delivered: dict[str, str] = {}
        # Per channel, each event_id remembered to when it was stored, oldest first.
        self._event_ids: dict[str, OrderedDict[str, float]] = {}
        self._receivers: list[Callable[[Event], object]] = []
        self.position = "0-0"

    def append(self, event: Event, key: object = None) -> Deferred[Appended]:
        now = self._clock.seconds()
        producer_id = event.data.get("event_id")
        seen = None if producer_id is None else self._remembered(event.channel, now)
        if seen is not None and producer_id in seen:
            return succeed(None)
        job = None
        if event.topic == "backtests":
            job = None if event.job_id is None else self._jobs.get(event.job_id)
            if job is None:
                return succeed(Refused("unknown_job"))
            if job.final is not None:
                return succeed(Refused("finished_job"))
            job.final = outcome(event)
        if seen is not None and producer_id is not None:
            if len(seen) >= DEDUPE_MAX:
                seen.popitem(last=False)
            seen[producer_id] = now
        event.id = self.position = self._ids.next(now)
        self._topics[event.topic].add(event, now)
        if job is not None:
            event.user = job.owner
            self._user_log(job.owner).add(event, now)
        for receiver in self._receivers:
            receiver(event)
        return succeed(event.id)

    def _remembered(self, channel: str, now: float) -> OrderedDict[str, float]:
        """The event_ids of C{channel} stored within the window."""
        seen = self._event_ids.get(channel)
        if seen is None:
            seen = self._event_ids[channel] = OrderedDict()
        since = now - self._dedupe_window
        while seen and next(iter(seen.values())) <= since:
            seen.popitem(last=False)
        return seen

    def _user_log(self, user: str) -> _Log:
        log = self._users.get(user)
        if log is None:
            log = self._users[user] = _Log(self._user_max, self._max_age)
        return log

    def listen(self, receiver: Callable[[Event], object]) -> None:
        self._receivers.append(receiver)

    def replay(self, topic: str, after: str | None, user: str | None) -> Deferred[Replay]:
        if topic == "backtests":
            assert user is not None
            log = self._users.get(user)
            if log is None:
                return succeed(Replay())
            return succeed(log.replay(after or self._delivered.get(user, "0-0")))
        assert after is not None
        return succeed(self._topics[topic].replay(after))

    def own(self, job_id: str, user: str) -> Deferred[None]:
        if len(self._jobs) >= JOBS_KEPT:
            del self._jobs[next(iter(self._jobs))]
        self._jobs[job_id] = _Job(user)
        return succeed(None)

    def delivered(self, user: str, event_id: str) -> None:
        self._delivered[user] = event_id

    def recent(self, topic: str, limit: int) -> Deferred[list[Event]]:
        """Up to C{limit} of the newest events of C{topic}, oldest first."""
        events = self._topics[topic].events
        return succeed(list(events)[-limit:] if limit > 0 else [])
