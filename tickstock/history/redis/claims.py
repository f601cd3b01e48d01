"""
Live ticks are not stored: of the daemons that all receive a pub/sub tick,
the first to claim its key counts it (scripts/claim.lua).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from tickstock.connections.redis import RedisLink
from tickstock.history.redis.layout import SEEN_TTL, digest
from tickstock.history.redis.scripts import CLAIM, Script


class Claims:
    """The first daemon to claim a message's key counts it."""

    def __init__(self, link: RedisLink) -> None:
        self._claim = Script(link, CLAIM)

    def claim(self, keys: list[object]) -> Deferred[list[Any]]:
        """
        A claim is remembered for C{SEEN_TTL} seconds at least (see
        scripts/windows.lua), as long as L{tickstock.history.DEDUPE_MAX}
        claims at least.
        """
        return self._claim.run([], [int(SEEN_TTL * 1000), *map(digest, keys)])
