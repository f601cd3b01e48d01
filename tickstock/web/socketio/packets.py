"""
The Engine.IO v4 and Socket.IO v5 wire formats (docs/socketio.md), and the
frames TickStock's events take on them. Pure functions: no I/O, no state.

An Engine.IO packet is one type digit and its data; over HTTP long-polling
several are joined by U+001E. A Socket.IO packet rides in an Engine.IO
C{message} (C{4}) packet as C{<type>[<attachments>-][<nsp>,][<ack id>][<JSON>]}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from tickstock.domain.events import Event

# Engine.IO packet types.
OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP = (b"0", b"1", b"2", b"3", b"4", b"5", b"6")
SEPARATOR = b"\x1e"

# Socket.IO packet types.
CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR, BINARY_EVENT, BINARY_ACK = range(7)

MAX_ACK_ID = 2**31 - 1
"""Acknowledgement ids past this are refused: they are a counter on the client."""

LEGACY_EVENTS = {"patterns": "pattern_alert", "ticks": "tick_data", "health": "system_health"}
"""The event name each topic's events had on the original system's Socket.IO."""


class BadPacket(ValueError):
    """A packet that does not follow the protocol: the session is closed."""


class BinaryPacket(BadPacket):
    """A packet with binary attachments: refused, the session stays."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One Socket.IO packet from a client."""

    type: int
    namespace: str
    ack: int | None
    data: Any


def decode(text: bytes) -> Packet:
    """
    Read the Socket.IO packet in an Engine.IO message.

    @raise BadPacket: saying what is wrong. Binary packets (attachments)
        are refused: TickStock's messages are JSON.
    """
    if not text or not 48 <= text[0] <= 54:
        raise BadPacket("not a Socket.IO packet")
    kind = text[0] - 48
    if kind in (BINARY_EVENT, BINARY_ACK):
        raise BinaryPacket("binary attachments are not accepted; send JSON")
    i, end = 1, len(text)
    namespace = "/"
    if i < end and text[i] == 47:  # "/"
        comma = text.find(b",", i)
        stop = end if comma < 0 else comma
        namespace = text[i:stop].decode("utf-8", "replace")
        i = stop + 1
    digits = i
    while i < end and 48 <= text[i] <= 57:
        i += 1
    ack = None
    if i > digits:
        if i - digits > 10 or int(text[digits:i]) > MAX_ACK_ID:
            raise BadPacket("acknowledgement id out of range")
        ack = int(text[digits:i])
    data = None
    if i < end:
        try:
            data = orjson.loads(text[i:])
        except orjson.JSONDecodeError:
            raise BadPacket("packet data is not JSON") from None
    if kind in (EVENT, ACK) and not (isinstance(data, list) and (kind == ACK or data)):
        raise BadPacket("an event's data must be a list starting with its name")
    if kind == EVENT and not isinstance(data[0], str):  # type: ignore[index]
        raise BadPacket("an event's name must be a string")
    return Packet(kind, namespace, ack, data)


def message(kind: int, data: Any = None, ack: int | None = None) -> bytes:
    """The Engine.IO message carrying a Socket.IO packet for the default namespace."""
    head = b"4%d" % kind if ack is None else b"4%d%d" % (kind, ack)
    return head if data is None else head + orjson.dumps(data)


def emit(name: str, payload: Any, offset: str | None = None) -> bytes:
    """An EVENT packet; C{offset} last, where a recovering client reads it from."""
    args = [name, payload] if offset is None else [name, payload, offset]
    return message(EVENT, args)


def event_name(event: Event) -> str:
    """The original system's name for C{event}'s Socket.IO event."""
    if event.topic == "backtests":
        return "backtest_result" if event.type == "backtest_result" else "backtest_progress"
    return LEGACY_EVENTS.get(event.topic, event.topic)


def legacy_frame(event: Event, offset: bool = True) -> bytes:
    """
    C{event} as the original system emitted it, C{{type, event: {event_type,
    source, timestamp, data, channel}}}, with TickStock's C{id} beside
    C{type}; with C{offset}, the id again as the last argument, the offset
    a recovering client resumes from.
    """
    name = event_name(event)
    data = event.data
    body: dict[str, Any] = {
        "type": name,
        "id": event.id,
        "event": {
            "event_type": event.type,
            "source": data.get("source", "tickstock"),
            "timestamp": data.get("timestamp", event.received_at),
            "data": data,
            "channel": event.channel,
        },
    }
    if event.snapshot:
        body["snapshot"] = True
    head = b'42["' + name.encode() + b'",' + orjson.dumps(body)
    return head + _offset(event, offset)


def native_frame(event: Event, sub_id: str, offset: bool = True) -> bytes:
    """C{event} as an C{event} event whose payload is the C{/ws} frame (offset: L{legacy_frame})."""
    return b'42["event",' + event.frame(sub_id) + _offset(event, offset)


def _offset(event: Event, offset: bool) -> bytes:
    """
    The end of an event's arguments: its id as the offset, or nothing. A
    tick has none: ticks are paced per symbol, so one can come after newer
    events, and its id would take the client's offset back (a recovery
    would then send those again); nor has a snapshot (L{Event.as_snapshot}).
    """
    if offset and event.topic != "ticks" and not event.snapshot:
        return b',"' + event.id.encode() + b'"]'
    return b"]"
