"""Socket.IO session records in this process (the embedded demo): lost on restart, by design."""

from __future__ import annotations

import heapq
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from tickstock.domain.interfaces import IReporting, ISessionRecords


@implementer(ISessionRecords, IReporting)
class MemorySessionRecords:
    """Records in a dict, each dropped once its time is up (checked as records are kept)."""


    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._records: dict[str, tuple[float, bytes]] = {}
        self._expiries: list[tuple[float, str]] = []

    def keep(self, pid: str, record: bytes, ttl: float) -> None:
        now = self._clock.seconds()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, old = heapq.heappop(expiries)
            kept = self._records.get(old)
            if kept is not None and kept[0] <= now:
                del self._records[old]
        self._records[pid] = (now + ttl, record)
        heapq.heappush(expiries, (now + ttl, pid))

    def find(self, pid: str) -> Deferred[bytes | None]:
        kept = self._records.get(pid)
        if kept is None or kept[0] <= self._clock.seconds():
            return succeed(None)
        return succeed(kept[1])

    def status(self) -> dict[str, Any]:
        return {"sessions_kept": len(self._records)}
