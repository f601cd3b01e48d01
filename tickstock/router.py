"""
The router: the one place producer messages become events. It gives each
message an ordered id, validates it, sets aside what is malformed, and hands
the rest to the sinks (history store, broadcaster).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from tickstock.events import EventIds, MalformedEvent, parse_event
from tickstock.interfaces import IEventSink, IProducerLink

SAMPLE_BYTES = 200


class Router:
    """
    Receives C{(channel, raw)} from an L{IEventSource} and routes events.

    A malformed message is never fatal: it is counted by kind, logged the
    first time its kind is seen (with a sample, so a flood of the same fault
    does not flood the log), and kept in the bounded dead-letter list.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        sinks: Iterable[IEventSink],
        link: IProducerLink,
        dedupe_window: int = 100_000,
    ) -> None:
        self._clock = clock
        self._sinks = tuple(IEventSink(sink) for sink in sinks)
        self._link = IProducerLink(link)
        self._ids = EventIds()
        self._seen: dict[tuple[str, str], None] = {}
        self._dedupe_window = dedupe_window
        self.received = 0
        self.routed = 0
        self.duplicates = 0
        self.malformed: Counter[str] = Counter()

    def receive(self, channel: str, raw: bytes) -> None:
        """Route one producer message; never raises."""
        self.received += 1
        now = self._clock.seconds()
        try:
            event = parse_event(channel, raw, self._ids.next(now), now)
        except MalformedEvent as error:
            self._reject(channel, raw, error)
            return
        if self._is_duplicate(event.channel, event.data.get("event_id")):
            self.duplicates += 1
            return
        for sink in self._sinks:
            try:
                sink.deliver(event)
            except Exception:
                self._log.failure("sink {sink!r} failed on event {id}", sink=sink, id=event.id)
        self.routed += 1

    def _is_duplicate(self, channel: str, producer_id: str | None) -> bool:
        """
        A producer that retries re-sends the same C{event_id}: deliver it
        once. Remembers the last C{dedupe_window} ids (per channel), oldest
        forgotten first.
        """
        if producer_id is None or self._dedupe_window == 0:
            return False
        key = (channel, producer_id)
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > self._dedupe_window:
            del self._seen[next(iter(self._seen))]
        return False

    def _reject(self, channel: str, raw: bytes, error: MalformedEvent) -> None:
        first = error.kind not in self.malformed
        self.malformed[error.kind] += 1
        if first:
            self._log.warn(
                "malformed message on {channel} ({kind}: {reason}); sample: {sample!r}; "
                "further ones of this kind are counted, not logged",
                channel=channel, kind=error.kind, reason=str(error), sample=raw[:SAMPLE_BYTES],
            )
        self._link.dead_letter(channel, raw, f"{error.kind}: {error}")
