"""
The seams between TickStock's parts. Each part is written and tested against
these, and L{tickstock.tap} is the only place that picks the concrete classes.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IEventSource(Interface):
    """
    Where the producer's messages come from: the embedded bus, or Redis.
    """

    def listen(receiver):  # type: ignore[no-untyped-def]
        """
        From now on, call C{receiver(channel: str, raw: bytes)} once for each
        producer message, in arrival order. The source does not parse.
        """

    def status():  # type: ignore[no-untyped-def]
        """
        The source's state for C{/ready}, as a JSON-able dict with at least
        C{"state"}; served from memory, never a live query.
        """

    ready = Attribute("True while messages can arrive.")


class IProducerLink(Interface):
    """
    TickStock's way back to the producer (backtest jobs, dead letters).
    """

    def publish(channel, payload):  # type: ignore[no-untyped-def]
        """
        Send C{payload} (bytes) on C{channel}. Returns a Deferred that fails
        at once, rather than waiting, when the link is down.
        """

    def dead_letter(channel, raw, reason):  # type: ignore[no-untyped-def]
        """
        Keep a malformed message (bounded, newest first) for an operator to
        inspect; never raises.
        """


class IEventSink(Interface):
    """
    Something validated events are routed to.
    """

    def deliver(event):  # type: ignore[no-untyped-def]
        """
        Take one L{tickstock.events.Event}. Must not raise and must not block:
        it is called on the reactor thread for every event.
        """


class IEventStore(IEventSink):
    """
    Event history: the embedded in-memory store, or PostgreSQL.
    """

    def recent(topic, limit):  # type: ignore[no-untyped-def]
        """
        A Deferred firing with up to C{limit} of the newest events of
        C{topic}, oldest first.
        """


class IClient(Interface):
    """
    One WebSocket connection, as the broadcaster sees it.
    """

    user = Attribute("The user id once the client said hello, else None.")

    def send(prepared, key=None):  # type: ignore[no-untyped-def]
        """
        Send one prepared event frame, or queue it while the client is not
        reading. C{key} is L{None} for must-deliver events: queued, and a
        client past its queue bound is closed with a code that tells it to
        resume, never waited for and never silently skipped. A latest-only
        event has a key (L{tickstock.events.Event.conflate_key}): a queued
        frame with the same key is replaced by the newer one.
        """

    def reply(message):  # type: ignore[no-untyped-def]
        """Send one control message (a JSON-able dict) to this client."""

    def close(code, reason):  # type: ignore[no-untyped-def]
        """Close the connection with a WebSocket close code and reason."""
