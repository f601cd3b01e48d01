"""
The seams between TickStock's parts. Each part is written and tested against
these, and L{tickstock.tap} is the only place that picks the concrete classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from tickstock.domain.events import Event
from tickstock.domain.records import Bar, PatternQuery
from tickstock.domain.stored import Replay


class IComponent(Interface):
    """
    A part C{/ready} reports on: the body lists each one's own status, and
    the daemon is ready while every one is (L{tickstock.ops.health}).
    """

    ready = Attribute("True while the part does not keep the daemon from serving.")

    def status() -> dict[str, Any]:
        """
        The part's state as a JSON-able dict with at least C{"state"};
        served from memory, never a live query.
        """


class IReporting(Interface):
    """
    A part C{/health} shows: it says what its counters are, and
    L{tickstock.ops.health} only places them, so a part's counters can
    change without the report reaching into it.
    """

    def status() -> dict[str, Any]:
        """
        The part's counters, JSON-able and named as C{/health} shows them;
        served from memory, never a live query.
        """


class IMetered(IReporting):
    """
    A part that C{/metrics} also shows by label (by channel, topic or
    reason), beyond its C{/health} counters.
    """

    def breakdown() -> dict[str, Any]:
        """
        The part's labelled counts, named as C{/metrics} reads them
        (L{tickstock.ops.metrics}); keys may be tuples, so not JSON-able.
        """


class IEventSource(IComponent):
    """
    Where the producer's messages come from: the embedded bus, or Redis.
    C{ready}: true while messages can arrive.
    """

    # Any: what the receiver returns matters to some sources only (below).
    def listen(receiver: Callable[..., Any]) -> None:
        """
        From now on, call C{receiver(channel: str, raw: bytes, key)} once for
        each producer message, in arrival order. The source does not parse.
        C{key} identifies this delivery of the message for L{IHistory.append}
        (L{None} on the embedded bus). The receiver returns a Deferred that
        fires once the message is handled (stored or set aside); a source
        that acknowledges (streams) acknowledges only then. For a live tick
        of a pub/sub source, which acknowledges nothing, it returns L{None}.
        """


class IProducerLink(Interface):
    """
    TickStock's way back to the producer (backtest jobs, dead letters).
    """

    def publish(channel: str, payload: bytes) -> Deferred[Any]:
        """
        Send C{payload} (bytes) on C{channel}. Returns a Deferred that fails
        at once, rather than waiting, when the link is down.
        """

    def dead_letter(channel: str, raw: bytes, reason: str) -> None:
        """
        Keep a malformed message (bounded, newest first) for an operator to
        inspect; never raises.
        """


class IHistory(Interface):
    """
    The ordered record of events: where each event gets its id, where
    duplicates stop, what live delivery follows, and what a client that
    reconnects with C{resume} is replayed from.
    """

    position = Attribute(
        "The id of the newest event handed to the receivers of L{listen} (or, "
        "before any, of the newest stored when live delivery began): a live "
        "tick delivered now orders after it.")

    def append(event: Event, key: object = None) -> Deferred[Any]:
        """
        Store a validated event. Gives it its id (ids order all events, of
        every topic) and, for a backtest event, the user who owns the job.
        C{key} is the source's delivery key (see L{IEventSource.listen}).

        A backtest event is stored only while its job is known (L{own}) and
        open; the first final one (a result, or progress with status
        C{failed} or C{cancelled}) closes the job, atomically with storing it.

        @return: a Deferred firing with the id, or with L{None} when the
            event duplicates one already stored (the same delivery handled
            twice, or a producer C{event_id} seen within the history window),
            or with a L{tickstock.history.Refused} for a backtest event of
            an unknown or closed job. Stored events reach the receivers of
            L{listen}, not the caller.
        """

    def listen(receiver: Callable[[Event], object]) -> None:
        """
        Call C{receiver(event)} for every stored event, in id order, once.
        """

    def replay(topic: str, after: str | None, user: str | None) -> Deferred[Replay]:
        """
        The events of C{topic} with ids after C{after}, oldest first; for
        C{backtests}, only those of C{user}'s jobs, and with C{after=None}
        those not yet delivered to C{user} (the offline queue).

        @return: a Deferred firing with a L{tickstock.history.Replay}.
        """

    def own(job_id: str, user: str) -> Deferred[Any]:
        """
        Open backtest C{job_id}, owned by C{user}: from now on its events
        are stored and reach that user on every node. A Deferred.
        """

    def delivered(user: str, event_id: str) -> None:
        """
        C{user}'s targeted event C{event_id} reached at least one of their
        connections: it leaves their offline queue. Never raises.
        """


class IKeySet(IComponent):
    """
    The public keys client tokens are signed with (an identity provider's
    JWKS), kept fresh by their holder; C{/ready} shows how fresh.
    """

    def key(kid: str | None) -> Any:
        """
        The key (a C{jwt.PyJWK}: its C{key} and C{algorithm_name}) named
        C{kid}; for L{None}, the only key if there is just one. L{None} if
        there is no such key.
        """

    def refetch() -> Deferred[None] | None:
        """
        Fetch the keys again now, since a token names one not known: a
        L{Deferred} that fires once the keys are fetched (or could not be),
        or L{None} if they were fetched too recently to ask again.
        """


class ISessionRecords(Interface):
    """
    What each Socket.IO session subscribed to, kept for a while after it
    ends, where any node finds it: a client that reconnects with the
    session's private id (C{pid}) gets its subscriptions back and resumes.
    """

    def keep(pid: str, record: bytes, ttl: float) -> None:
        """Keep C{record} under C{pid} for C{ttl} seconds. Never raises; a failure is counted."""

    def find(pid: str) -> Deferred[bytes | None]:
        """The record kept under C{pid}, or L{None} if none is (or it cannot be read now)."""


class IClaims(Interface):
    """
    Which of the daemons that all received a pub/sub message counts it:
    the first to claim it.
    """

    def claim(keys: list[object]) -> Deferred[list[Any]]:
        """
        Claim the messages named by C{keys} (the source's keys, see
        L{IEventSource.listen}).

        @return: a Deferred firing with one value per key, true where this
            call claimed it first.
        """


class ILatestValues(Interface):
    """The current value of each latest-only key, as one node keeps them."""

    def values() -> Iterable[Event]:
        """Every value kept (a job's progress too), least recently updated first."""

    def prime(events: list[Event]) -> None:
        """Keep C{events}, values from before this node started, where none is newer."""


class ICurrentValues(IComponent):
    """
    The current values shared by the nodes: each writes what changed in its
    own (C{latest}), and one that starts is primed with them all before it
    reports ready.
    """

    latest = Attribute("The L{ILatestValues} of this node, set before the service starts.")


class IEventSink(Interface):
    """
    Something validated events are routed to.
    """

    def deliver(event: Event) -> object:
        """
        Take one L{tickstock.domain.events.Event}. Must not raise and must not block:
        it is called on the reactor thread for every event.
        """


REPLAYED = ("replayed",)
"""The key L{IClient.send} is given for the frames of a replay."""


class IClient(Interface):
    """
    One WebSocket connection, as the broadcaster sees it.
    """

    user = Attribute("The user id once the client said hello, else None.")
    dialect = Attribute(
        "What L{frame} makes: None for the C{/ws} frame, else a hashable naming the "
        "protocol. Clients of one dialect share each event's frame per subscription id.")

    def frame(event: Event, sub_id: str) -> bytes:
        """The text of C{event}'s frame for subscription C{sub_id}, in this client's dialect."""

    def send(prepared: Any, key: object = None) -> None:
        """
        Send one prepared event frame, or queue it while the client is not
        reading. C{key} is L{None} for must-deliver events: queued, and a
        client past its queue bound is closed with a code that tells it to
        resume, never waited for and never silently skipped. A latest-only
        event has a key (L{tickstock.domain.events.Event.conflate_key}): a queued
        frame with the same key is replaced by the newer one. L{REPLAYED}:
        a must-deliver frame of a resumed subscription's replay, queued in
        order like the others but not counted against the queue bound (the
        history bounds a replay; the queue bound is for live events a client
        cannot keep up with).
        """

    def reply(message: dict[str, Any]) -> None:
        """Send one control message (a JSON-able dict) to this client."""

    def close(code: int, reason: str) -> None:
        """Close the connection with a WebSocket close code and reason."""


class IStore(IComponent):
    """
    The system of record (PostgreSQL, or the embedded memory store): tick
    bars, pattern and market-state event history, universes, and the reads
    the REST API and deep catch-up make. Every method returns a Deferred
    that fails fast with L{tickstock.store.StoreUnavailable} when the
    store cannot be reached or a statement exceeds its timeout; none waits
    for a dead server. C{ready}: true while reads and writes can be served.
    """

    def write(bars: Sequence[Bar], events: Sequence[Event]) -> Deferred[Any]:
        """
        Persist C{bars} (L{tickstock.store.Bar} parts) and C{events} (stored
        L{tickstock.domain.events.Event}s of the C{patterns} and C{market_state}
        topics, kept; of C{backtests}, applied in order to their job's
        record by L{tickstock.jobs.backtests.update_of} while it is not final) in one
        transaction. Idempotent: writing the same bar part or event again
        changes nothing, so a write that timed out but was applied may
        simply be retried. Also records every symbol seen.
        """

    def events_after(topic: str, after: str, until: str | None,
                     symbols: Iterable[str] | None, limit: int) -> Deferred[list[Event]]:
        """
        Stored events of C{topic} with C{after} < id <= C{until} (C{until}
        L{None}: no upper bound), of C{symbols} only unless L{None}, oldest
        first, at most C{limit}: one page of a deep catch-up.
        """

    def patterns(query: PatternQuery) -> Deferred[list[dict[str, Any]]]:
        """
        A page of pattern events for a L{tickstock.store.PatternQuery},
        newest first, as JSON-able dicts (see L{tickstock.store.pattern_row}).
        """

    def symbols() -> Deferred[list[dict[str, Any]]]:
        """Every known symbol, as dicts sorted by symbol."""

    def ohlcv(symbol: str, since: float | None, until: float | None,
              limit: int) -> Deferred[list[dict[str, Any]]]:
        """
        1-minute bars of C{symbol} with C{since} <= minute < C{until} (epoch
        seconds, either L{None}), oldest first, at most C{limit}.
        """

    def universes() -> Deferred[list[dict[str, Any]]]:
        """A summary of every universe (key, type, category, symbol count, updated)."""

    def universe(key: str) -> Deferred[dict[str, Any] | None]:
        """One universe with its symbols, or L{None} if there is no such key."""


class ITickMarks(IStore):
    """
    A store that also keeps I{tick marks}: per node and symbol, the newest
    tick id (an id key, C{(ms, seq)}) in the node's stored bar parts. In
    streams mode a restarted node reads its unacknowledged entries again,
    and its marks tell which of their ticks its parts already hold
    (L{tickstock.store.persist}).
    """

    def write(bars: Sequence[Bar], events: Sequence[Event],
              marks: tuple[str, Mapping[str, tuple[int, int]]] | None = None) -> Deferred[Any]:
        """
        L{IStore.write}; with C{marks}, C{(node, {symbol: id key})}, also
        raise C{node}'s marks to them in the same transaction (a mark is
        never lowered).
        """

    def tick_marks(node: str) -> Deferred[dict[str, tuple[int, int]]]:
        """
        C{node}'s marks, C{{symbol: id key}}, once any bar write already
        under way has finished (one from before a crash, say).
        """


class IJobStore(Interface):
    """
    Backtest job records (the C{jobs} table, or memory). Records are dicts:
    C{job_id}, C{user_id}, C{status} (C{queued}, C{running}, C{completed},
    C{failed}, C{cancelled}), C{params}, C{progress}, C{results}, C{error},
    C{created_at} and C{updated_at} (epoch seconds). Every method returns a
    Deferred that fails fast when the store is unavailable.
    """

    def create_job(record: dict[str, Any], max_active: int) -> Deferred[bool]:
        """
        Insert a new C{queued} record, unless its user already has
        C{max_active} jobs queued or running (checked atomically with the
        insert). Fires with whether it was inserted.
        """

    def job(job_id: str) -> Deferred[dict[str, Any] | None]:
        """The record of C{job_id}, or L{None}."""

    def jobs(user: str, before: str | None, limit: int) -> Deferred[list[dict[str, Any]]]:
        """
        C{user}'s records, newest first, at most C{limit}; with C{before}
        (a job id of theirs), only those older than it.
        """

    def stale_jobs(cutoff: float, limit: int) -> Deferred[list[dict[str, Any]]]:
        """Up to C{limit} queued or running records last updated before C{cutoff}."""

    def close_job(job_id: str, status: str, error: str | None, at: float) -> Deferred[Any]:
        """Give a queued or running record the final C{status} (and C{error})."""


class ICache(Interface):
    """
    A shared cache for REST answers (Redis, or memory when embedded). A
    cache never fails a request: an unreachable cache is a miss.
    """

    hits = Attribute("Lookups answered from the cache.")
    misses = Attribute("Lookups that were not.")

    def fetch(key: str, compute: Callable[[], Deferred[bytes]], ttl: float) -> Deferred[bytes]:
        """
        The bytes cached under C{key}; on a miss, C{compute()} (a Deferred
        of bytes) is called and its result cached for C{ttl} seconds,
        unless L{invalidate} was called meanwhile. Failures of C{compute}
        pass through, uncached.
        """

    def invalidate() -> object:
        """Forget every cached answer, on every node sharing the cache."""
