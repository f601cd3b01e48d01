"""
The router: the one place producer messages become events. It finds each
message's channel in the registry, normalizes it (L{tickstock.ingest.normalize}),
counts probes, sets aside what cannot be understood, and appends the rest
to the history, which gives them their ids and feeds live delivery.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.domain.events import Event, MalformedEvent, shown
from tickstock.domain.interfaces import IHistory, IMetered, IProducerLink
from tickstock.domain.stored import Redelivered, Refused
from tickstock.domain.topics import DEFAULT_REGISTRY, TICKS, Registry
from tickstock.ingest.normalize import Probe, normalize

SAMPLE_BYTES = 200
MAX_IN_FLIGHT = 20_000

LiveTicks = Callable[[Event, object, Callable[[Event, "bool | Failure"], object]], None]
"""Where a live tick goes instead of the history (L{tickstock.deliver.ticks.LiveTicks}):
called with the tick, its key and what to call once it is known whether
this process counts it."""


class Overloaded(Exception):
    """An event shed because too many are already on their way to the history."""


@implementer(IMetered)
class Router:
    """
    Receives C{(channel, raw, key)} from an L{IEventSource} and appends
    events to the L{IHistory}.

    A malformed message is never fatal: it is counted by kind, logged the
    first time its kind is seen (with a sample, so a flood of the same fault
    does not flood the log), and kept in the bounded dead-letter list.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, history: IHistory, link: IProducerLink,
                 stored: Callable[[Event], object] | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT,
                 behind: Callable[[], bool] = lambda: False,
                 ticks: LiveTicks | None = None,
                 registry: Registry = DEFAULT_REGISTRY) -> None:
        """
        @param stored: called with each event this process stored (not a
            duplicate), once, with its id: on every node together, each
            event is passed on exactly once (to be persisted).
        @param max_in_flight: events handed to the history and not yet
            stored, past which new ones are shed (latest-only ones from half
            of it): a producer flood costs counted events, never unbounded
            memory. A stream source's entries are never shed: it reads in
            bounded batches, and a shed entry would be read again after
            later ones.
        @param behind: whether the source is behind its input (pub/sub: Redis
            holds half its output limit for it): latest-only events are shed
            before they are parsed, which makes room for the must-deliver
            ones before Redis drops the subscriber and all it held.
        @param ticks: where ticks go instead of the history (a pub/sub
            source: see L{tickstock.deliver.ticks}); each is in flight until it is
            known whether this process counts it.
        @param registry: the channels, by the Redis names they come on.
        """
        self._registry = registry
        self._clock = clock
        self._max_in_flight = max_in_flight
        self._behind = behind
        self.in_flight = 0
        self.shed: Counter[str] = Counter()
        self._on_stored = stored
        self._ticks = ticks
        self._history = IHistory(history)
        self._link = IProducerLink(link)
        self.received = 0
        self.received_by_channel: Counter[str] = Counter()
        self.routed = 0
        self.duplicates = 0
        self.redelivered = 0
        """Stream entries read again that the history had stored already."""
        self.refused: Counter[str] = Counter()
        self.failed = 0
        self.malformed: Counter[tuple[str, str]] = Counter()
        """Refused messages by channel (its Redis name) and kind."""
        self.probes: Counter[str] = Counter()

    def receive(self, channel: str, raw: bytes, key: object = None,
                sheddable: bool = True) -> Deferred[Any] | None:
        """
        Route one producer message. The Deferred fires once it is stored or
        set aside (with what L{IHistory.append} gave, or L{None} for a
        malformed message), and fails only if the history could not be
        written (a source that acknowledges must then not acknowledge it).
        A live tick (see C{ticks}) returns L{None}: it is delivered already.
        A key that must not be shed (C{key.sheddable} false: a stream entry)
        never is.
        """
        sheddable = sheddable and getattr(key, "sheddable", True)
        self.received += 1
        self.received_by_channel[channel] += 1
        # A channel fed from elsewhere (PostgreSQL) comes under its own name.
        known = self._registry.by_redis_name(channel) or self._registry.get(channel)
        if known is None:
            self._reject(channel, raw, MalformedEvent(
                "unknown_channel", f"no channel is configured for {shown(channel)}"))
            return succeed(None)
        if sheddable and known.latest_only and self._behind():
            return self._shed(channel, "the source is behind its input")
        now = self._clock.seconds()
        try:
            event = normalize(known, raw, "", now)
        except Probe:
            self.probes[channel] += 1
            return succeed(None)
        except MalformedEvent as error:
            self._reject(channel, raw, error)
            return succeed(None)
        if sheddable and self.in_flight >= self._max_in_flight // 2 and (
                self.in_flight >= self._max_in_flight or known.latest_only):
            return self._shed(channel, f"{self.in_flight} events in flight to the history")
        self.in_flight += 1
        if self._ticks is not None and event.topic == TICKS:
            self._ticks(event, key, self._tick_claimed)
            return None
        return self._history.append(event, key).addCallbacks(
            self._stored, self._not_stored, callbackArgs=(event,))

    def malformed_by_kind(self) -> dict[str, int]:
        """Refused messages by kind, all channels together."""
        kinds: Counter[str] = Counter()
        for (_, kind), count in self.malformed.items():
            kinds[kind] += count
        return dict(kinds)

    def status(self) -> dict[str, Any]:
        """What C{/health} shows under C{events}, up to what delivery counts."""
        return {
            "received": self.received,
            "routed": self.routed,
            "duplicates": self.duplicates,
            "redelivered": self.redelivered,
            "store_failures": self.failed,
            "malformed": self.malformed_by_kind(),
            "probes": sum(self.probes.values()),
            "shed": dict(self.shed),
            "in_flight": self.in_flight,
            "job_events_dropped": dict(self.refused),
        }

    def breakdown(self) -> dict[str, Any]:
        return {"received_by_channel": self.received_by_channel,
                "deadlettered": self.malformed, "probes": self.probes}

    def _tick_claimed(self, event: Event, mine: bool | Failure) -> None:
        if mine is True:
            self._stored(event.id, event)
        elif mine is False:
            self._stored(None, event)
        else:
            self._not_stored(mine)

    def _shed(self, channel: str, why: str) -> Deferred[Any]:
        first = not self.shed
        self.shed[channel] += 1
        if first or str(sum(self.shed.values())).strip("0") == "1":  # 1st, 10th, 100th...
            self._log.warn("overloaded ({why}): shedding ({total} shed so far, latest-only "
                           "ones first)", why=why, total=sum(self.shed.values()))
        return fail(Overloaded(f"{why}; {channel} shed"))

    def _stored(self, event_id: str | Refused | Redelivered | None,
                event: Event) -> str | Refused | Redelivered | None:
        self.in_flight -= 1
        if isinstance(event_id, Redelivered):
            # Stored before, perhaps never written to the store: again.
            self.redelivered += 1
            if self._on_stored is not None:
                event.id = event_id.id
                self._on_stored(event)
        elif event_id is None:
            self.duplicates += 1
        elif isinstance(event_id, Refused):
            # Progress or a result of a job that is unknown or already over.
            self.refused[event_id.reason] += 1
        else:
            self.routed += 1
            if self._on_stored is not None:
                event.id = event_id
                self._on_stored(event)
        return event_id

    def _not_stored(self, failure: Any) -> Any:
        self.in_flight -= 1
        self.failed += 1
        if str(self.failed).strip("0") == "1":  # the 1st, 10th, 100th...
            self._log.warn("could not store an event ({n} so far): {e}",
                           n=self.failed, e=failure.getErrorMessage())
        return failure

    def _reject(self, channel: str, raw: bytes, error: MalformedEvent) -> None:
        first = (channel, error.kind) not in self.malformed
        self.malformed[channel, error.kind] += 1
        if first:
            self._log.warn(
                "malformed message on {channel} ({kind}: {reason}); sample: {sample!r}; "
                "further ones of this kind are counted, not logged",
                channel=channel, kind=error.kind, reason=str(error), sample=raw[:SAMPLE_BYTES],
            )
        self._link.dead_letter(channel, raw, f"{error.kind}: {error}")
