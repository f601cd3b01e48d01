"""
The daemon's reports: C{/health} (liveness and the counters an operator
looks at first, each part's own L{IReporting} status placed in the body),
C{/ready} (each component's own status, L{IComponent}) and what C{/metrics}
shows beyond them (L{IMetered}). Read from the parts at each request, so
the delivery path pays nothing for them; the wiring (L{tickstock.tap}) only
says which parts there are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from tickstock.domain.interfaces import IComponent, IMetered, IReporting

Report = tuple[bool, dict[str, Any]]


@dataclass(frozen=True)
class Health:
    """
    @ivar components: what C{/ready} lists, in order; the daemon is ready
        while every one is.
    @ivar mode: the delivery mode C{/ready} names (C{pubsub} or C{streams}).
    """

    clock: IReactorTime
    started_at: float
    auth: bool
    worker: int | None
    mode: str
    components: Mapping[str, IComponent]
    router: IMetered
    broadcaster: IMetered
    stream: IReporting
    site: IReporting
    gateway: IMetered
    overload: IReporting
    ticks: IReporting
    universes: IReporting
    persister: IReporting
    jobs: IReporting
    api: IReporting
    socketio: IReporting

    def health(self) -> Report:
        """Liveness, with the counters an operator looks at first."""
        router, broadcaster = self.router.status(), self.broadcaster.status()
        gateway, stream = self.gateway.status(), self.stream.status()
        return True, {
            "status": "ok",
            "auth": "token" if self.auth else "none",
            "pid": os.getpid(),
            "worker": self.worker,
            "uptime_s": round(self.clock.seconds() - self.started_at, 3),
            "clients": gateway["clients"],
            "subscriptions": broadcaster["subscriptions"],
            "events": {**router, "delivered": broadcaster["delivered"],
                       "unrouted_targeted": broadcaster["unrouted_targeted"]},
            "handshakes_refused": stream["handshakes_refused"],
            "http_refused": self.site.status()["refused"],
            "slow_consumers_closed": gateway["slow_consumers_closed"],
            "overload": {**self.overload.status(),
                         "clients_backlogged": stream["clients_backlogged"],
                         "slow_consumers_closed": gateway["slow_consumers_by_why"]},
            "conflated": stream["conflated"],
            "live_gaps_closed": gateway["live_gaps_closed"],
            "heartbeat_timeouts": gateway["heartbeat_timeouts"],
            **self.ticks.status(),
            **self.universes.status(),
            "persist": self.persister.status(),
            "jobs": self.jobs.status(),
            "api": self.api.status(),
            "socketio": self.socketio.status(),
        }

    def readiness(self) -> Report:
        """Ready while every component is: producer messages can arrive (and be sent)."""
        components = {name: part.status() for name, part in self.components.items()}
        ok = all(part.ready for part in self.components.values())
        return ok, {"ready": ok, "mode": self.mode, "components": components}

    def extra(self) -> dict[str, Any]:
        """What C{/metrics} shows beyond the C{/health} body."""
        return {**self.broadcaster.breakdown(), **self.router.breakdown(),
                **self.gateway.breakdown()}
