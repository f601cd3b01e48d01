"""Socket.IO session records in Redis, where every node of the deployment finds them."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from tickstock.connections.redis import RedisLink
from tickstock.domain.interfaces import IReporting, ISessionRecords

PREFIX = "tickstock:socketio:session:"


@implementer(ISessionRecords, IReporting)
class RedisSessionRecords:
    """One key per session, C{SET} with its time to live; read with C{GET}."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self.lost = 0  # records that could not be kept (Redis away)

    def keep(self, pid: str, record: bytes, ttl: float) -> None:
        d = self._link.execute("SET", PREFIX + pid, record, "PX", max(1, int(ttl * 1000)))
        d.addErrback(self._lost)

    def _lost(self, failure: Any) -> None:
        self.lost += 1

    def find(self, pid: str) -> Deferred[bytes | None]:
        def found(value: Any) -> bytes | None:
            return value.encode() if isinstance(value, str) else value

        return self._link.execute("GET", PREFIX + pid).addCallbacks(found, lambda _: None)

    def status(self) -> dict[str, Any]:
        return {"session_records_lost": self.lost}
