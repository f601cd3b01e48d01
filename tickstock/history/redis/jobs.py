"""
Backtest jobs in the history: a job's hash C{{u: owner, f: final status}},
opened here and read (and closed) by the ingest script, which stores a
job's events only while it is open and under its owner's stream.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from tickstock.connections.redis import RedisLink
from tickstock.history.redis.layout import JOB_PREFIX


class JobOwners:
    """Opens jobs: from then on their events are stored, for their owner."""

    def __init__(self, link: RedisLink, ttl: int) -> None:
        """@param ttl: seconds a job is remembered after its last event."""
        self._execute = link.execute
        self._ttl = ttl

    def own(self, job_id: str, user: str) -> Deferred[Any]:
        key = JOB_PREFIX + job_id
        return self._execute("HSET", key, "u", user).addCallback(
            lambda _: self._execute("EXPIRE", key, self._ttl))
