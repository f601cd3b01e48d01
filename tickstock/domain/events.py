"""
The canonical event, and the ordered ids TickStock gives each event on
arrival.

An L{Event} is made once, at the boundary (L{tickstock.ingest.normalize}), so
everything past it (routing, storage, the wire) can trust it. Unknown extra
fields are kept and passed on, as the contract requires.
"""

from __future__ import annotations

import re
import reprlib
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from tickstock.domain.topics import DEFAULT_REGISTRY, TOPICS

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

class MalformedEvent(ValueError):
    """
    A producer message TickStock cannot accept.

    @ivar kind: a short, stable name for the problem (C{not_json},
        C{missing_field}, ...), used to count and to log once per kind.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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
    @ivar latest: for a latest-only event, the key a newer event supersedes
        it by (its topic and the values of its channel's C{latest_by}:
        symbol, job or service); L{None} for must-deliver.
    @ivar snapshot: sent as a new subscription's current value (L{as_snapshot}).
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
    latest: tuple[Any, ...] | None = None
    snapshot: bool = False
    _tail: bytes | None = field(default=None, repr=False)

    @property
    def conflate_key(self) -> tuple[Any, ...] | None:
        return self.latest

    @property
    def wire_tail(self) -> bytes:
        if self._tail is None:
            self._tail = (
                b',"id":' + orjson.dumps(self.id)
                + b',"type":' + orjson.dumps(self.type)
                + b',"data":' + orjson.dumps(self.data)
                + (b',"snapshot":true}' if self.snapshot else b"}")
            )
        return self._tail

    def as_snapshot(self) -> Event:
        """
        This latest-only event as the current value a new subscription gets
        first: its frames say C{"snapshot":true}, and its id is no resume
        point (it may be older than events the subscriber never had).
        """
        return replace(self, snapshot=True, _tail=None)

    def frame(self, sub_id: str) -> bytes:
        """The JSON text of the C{event} message for subscription C{sub_id}."""
        return b'{"op":"event","sub":' + orjson.dumps(sub_id) + self.wire_tail


def depth(value: Any) -> int:
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
                 user: str | None, topic: str | None = None) -> Event:
    """
    Rebuild an event kept by the history or a store. It was normalized when
    it was stored, so only its shape is restored here.

    @param topic: the event's topic where the record keeps it; else the
        topic of the default channel of that name.
    """
    channel = DEFAULT_REGISTRY.get(channel_name)
    if topic is None:
        if channel is None:
            raise ValueError(f"no topic known for channel {channel_name!r}")
        topic = channel.topic
    data = orjson.loads(raw)
    kind = TOPICS[topic]
    latest_by = channel.latest_by if channel is not None and channel.topic == topic else ()
    return Event(
        id=event_id,
        channel=channel_name,
        topic=topic,
        type=event_type,
        data=data,
        symbol=data.get("symbol") if kind.by_symbol else None,
        job_id=data.get("job_id") if kind.targeted else None,
        user=user,
        size=len(raw),
        latest=(topic, *(data.get(f) for f in latest_by)) if latest_by else None,
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
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{MAX_SEQ}"


MAX_SEQ = 2**63 - 1
"""The greatest sequence number an id may have (C{events.id_seq} is a bigint)."""
