"""
The freshness canary: proof that producer messages still reach the router.

A connection to Redis can look healthy while nothing arrives on it (a
subscription silently lost, Redis dropping a slow subscriber, a consumer
group gone). So the daemon publishes a small message on a channel of its
own, through the same Redis path the producer's messages take (PUBLISH in
pub/sub mode, XADD in streams mode), and the source hands it back like any
other message. Only the round trip proves the path: while no canary has
come back within L{Canary.stale_after}, C{/ready} says not ready.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from tickstock.domain.interfaces import IComponent

CHANNEL_PREFIX = "tickstock.canary."
RETRY = 0.1
"""Seconds between canaries until one comes back (at start, and once stale):
readiness is proven within about a round trip, not an interval."""


def canary_channel(node: str) -> str:
    """This node's canary channel: only this node reads it."""
    return CHANNEL_PREFIX + node


@implementer(IComponent)
class Canary(Service):
    """
    Sends a canary every C{interval} seconds (every L{RETRY} while none is
    fresh) with C{send(channel, payload)}, and takes the source's messages
    on C{channel} out of the stream before the router sees them.

    @ivar round_trip: called with each round trip's seconds (a histogram).
    """

    def __init__(self, clock: IReactorTime, send: Callable[[str, bytes], Deferred[Any]],
                 channel: str, interval: float) -> None:
        self._clock = clock
        self._send = send
        self.channel = channel
        self.interval = interval
        self.stale_after = 3 * interval
        # Several daemons may share a channel name (the same --node-id in
        # pub/sub mode): each counts only its own canaries.
        self._nonce = os.urandom(6).hex()
        self._seq = 0
        self._call: IDelayedCall | None = None
        self.round_trip: Callable[[float], None] = lambda seconds: None
        self.last_arrival: float | None = None
        self.last_round_trip: float | None = None
        self.sent = 0
        self.returned = 0
        self.send_failures = 0

    @property
    def fresh(self) -> bool:
        return (self.last_arrival is not None
                and self._clock.seconds() - self.last_arrival <= self.stale_after)

    @property
    def ready(self) -> bool:
        return self.fresh

    def status(self) -> dict[str, Any]:
        age = None if self.last_arrival is None else self._clock.seconds() - self.last_arrival
        return {
            "state": "fresh" if self.fresh else "waiting" if self.last_arrival is None else "stale",
            "channel": self.channel, "interval_s": self.interval,
            "age_s": None if age is None else round(age, 3),
            "round_trip_ms": None if self.last_round_trip is None
            else round(self.last_round_trip * 1000, 3),
            "sent": self.sent, "returned": self.returned, "send_failures": self.send_failures,
        }

    def intercept(self, receiver: Callable[..., Deferred[Any] | None]
                  ) -> Callable[..., Deferred[Any] | None]:
        """The source's receiver: canaries are taken here, the rest go on."""
        channel = self.channel

        def receive(name: str, raw: bytes, key: object = None) -> Deferred[Any] | None:
            if name == channel:
                self.arrived(raw)
                return succeed(None)
            return receiver(name, raw, key)

        return receive

    def arrived(self, raw: bytes) -> None:
        try:
            message = orjson.loads(raw)
            ours = message["nonce"] == self._nonce
            sent = float(message["sent"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        if not ours:
            return
        now = self._clock.seconds()
        if sent <= now - self.stale_after:
            return  # an old one read again (a stream's backlog): proves nothing now
        was_fresh = self.fresh
        self.returned += 1
        self.last_arrival = now
        self.last_round_trip = max(0.0, now - sent)
        self.round_trip(self.last_round_trip)
        if not was_fresh:
            self._schedule(self.interval)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._beat()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._clock.callLater(delay, self._beat) if self.running else None

    def _beat(self) -> None:
        self._seq += 1
        payload = orjson.dumps({"nonce": self._nonce, "seq": self._seq,
                                "sent": self._clock.seconds()})
        self.sent += 1
        self._send(self.channel, payload).addErrback(self._failed)
        self._schedule(self.interval if self.fresh else RETRY)

    def _failed(self, failure: Any) -> None:
        self.send_failures += 1
