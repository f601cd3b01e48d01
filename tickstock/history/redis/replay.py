"""
What a reconnecting client is replayed from: a topic's stream after its
resume id, or a user's own stream after what already reached them (the
per-user delivered pointer, which only moves forward).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from tickstock.connections.redis import RedisLink, text
from tickstock.domain.events import id_key
from tickstock.domain.stored import Replay
from tickstock.domain.topics import BACKTESTS
from tickstock.history import missed
from tickstock.history.redis.layout import PREFIX, SINCE_KEY, USER_PREFIX, entry_event
from tickstock.history.redis.scripts import ADVANCE, REPLAY, Script


def _pointer(user: str) -> str:
    return f"{USER_PREFIX}{user}:delivered"


class Replays:
    """Replays (scripts/replay.lua) and the delivered pointer (scripts/advance.lua)."""

    def __init__(self, link: RedisLink, user_ttl: int) -> None:
        """@param user_ttl: seconds a user's delivered pointer outlives its last move."""
        self._replay = Script(link, REPLAY)
        self._advance = Script(link, ADVANCE)
        self._user_ttl = user_ttl

    def replay(self, topic: str, after: str | None, user: str | None) -> Deferred[Replay]:
        if topic == BACKTESTS:
            assert user is not None
            stream, pointer = USER_PREFIX + user, _pointer(user)
        else:
            assert after is not None
            stream, pointer = PREFIX + topic, ""
        d = self._replay.run([stream, SINCE_KEY, pointer], [after or ""])

        def done(reply: list[Any]) -> Replay:
            start, entries, last_dropped, dropped, through, since = reply
            start, last_dropped, since = text(start), text(last_dropped), text(since)
            events = [entry_event(entry, topic) for entry in entries]
            gap = missed(start, None if last_dropped == "0-0" else last_dropped,
                         int(dropped), int(through))
            if gap is None and after is not None and since and id_key(after) < id_key(since):
                # Redis lost the history this id came from (a restart
                # without persistence): what happened in between is unknown.
                gap = {"from": after, "to": None, "count": None, "reason": "history was reset"}
            return Replay(events, gap)

        return d.addCallback(done)

    def delivered(self, user: str, event_id: str) -> None:
        # Only forward: another node, or a tail that is behind, may report
        # an older event later.
        self._advance.run([_pointer(user)], [event_id, self._user_ttl]).addErrback(lambda _: None)
