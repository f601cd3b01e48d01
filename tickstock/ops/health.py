"""
The daemon's reports: C{/health} (liveness and the counters an operator
looks at first), C{/ready} (each component's own status, L{IComponent}) and
what C{/metrics} shows beyond them. Read from the parts at each request, so
the delivery path pays nothing for them; the wiring (L{tickstock.tap}) only
says which parts there are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from tickstock.deliver.broadcast import Broadcaster
from tickstock.deliver.gateway import Gateway
from tickstock.deliver.overload import Overload
from tickstock.deliver.throttle import TickThrottle
from tickstock.deliver.universes import Universes
from tickstock.domain.interfaces import IComponent
from tickstock.ingest.router import Router
from tickstock.jobs.backtests import Jobs
from tickstock.store.persist import Persister
from tickstock.web.api import ApiResource
from tickstock.web.site import SecureSite
from tickstock.web.websocket import StreamFactory

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
    router: Router
    broadcaster: Broadcaster
    stream: StreamFactory
    site: SecureSite
    gateway: Gateway
    overload: Overload
    ticks: TickThrottle
    universes: Universes
    persister: Persister
    jobs: Jobs
    api: ApiResource

    def health(self) -> Report:
        """Liveness, with the counters an operator looks at first."""
        router, gateway, stream = self.router, self.gateway, self.stream
        return True, {
            "status": "ok",
            "auth": "token" if self.auth else "none",
            "pid": os.getpid(),
            "worker": self.worker,
            "uptime_s": round(self.clock.seconds() - self.started_at, 3),
            "clients": len(gateway.connections),
            "subscriptions": self.broadcaster.subscriptions,
            "events": {
                "received": router.received,
                "routed": router.routed,
                "duplicates": router.duplicates,
                "redelivered": router.redelivered,
                "store_failures": router.failed,
                "malformed": router.malformed_by_kind(),
                "probes": sum(router.probes.values()),
                "shed": dict(router.shed),
                "in_flight": router.in_flight,
                "job_events_dropped": dict(router.refused),
                "delivered": self.broadcaster.delivered,
                "unrouted_targeted": self.broadcaster.unrouted,
            },
            "handshakes_refused": {"origin": stream.refused_origins,
                                   "per_ip": stream.refused_per_ip},
            "http_refused": dict(self.site.refused),
            "slow_consumers_closed": gateway.slow_consumers_closed,
            "overload": {"behind": self.overload(), "late_events": self.overload.late,
                         "clients_backlogged": stream.backlogged,
                         "slow_consumers_closed": dict(gateway.slow_consumers)},
            "conflated": stream.conflated,
            "live_gaps_closed": gateway.live_gaps_closed,
            "heartbeat_timeouts": gateway.heartbeat_timeouts,
            "ticks_conflated": self.ticks.conflated,
            "universe_refreshes": self.universes.refreshes,
            "persist": self.persister.status(),
            "jobs": self.jobs.stats(),
            "api": self.api.stats(),
        }

    def readiness(self) -> Report:
        """Ready while every component is: producer messages can arrive (and be sent)."""
        components = {name: part.status() for name, part in self.components.items()}
        ok = all(part.ready for part in self.components.values())
        return ok, {"ready": ok, "mode": self.mode, "components": components}

    def extra(self) -> dict[str, Any]:
        """What C{/metrics} shows beyond the C{/health} body."""
        return {"subscriptions_by_topic": +self.broadcaster.by_topic,
                "received_by_channel": self.router.received_by_channel,
                "deadlettered": self.router.malformed,
                "probes": self.router.probes,
                "client_errors": self.gateway.errors, "catchups": self.gateway.catchups}
