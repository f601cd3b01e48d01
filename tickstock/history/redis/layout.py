"""
Where the history lives in Redis and what its entries hold: the names every
part of the history (and every daemon on that Redis) must agree on.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tickstock.connections.redis import text
from tickstock.domain.events import Event, stored_event

PREFIX = "tickstock:history:"
LAST_KEY = PREFIX + "last"
SINCE_KEY = PREFIX + "since"
USER_PREFIX = "tickstock:user:"
JOB_PREFIX = "tickstock:jobstate:"
DEDUPE_KEY = "tickstock:dedupe"
"""The windows that remember producer event_ids (C{eid:<channel>}), pub/sub
messages stored (C{seen}) and claimed ticks (C{tick}): this hash holds each
one's bucket start times, and its buckets are sets named
C{tickstock:dedupe:<window>:<start ms>}."""
DIGEST_BYTES = 12
"""What a window remembers of a member: this many bytes of its SHA-1, so a
member costs Redis about 60 bytes however long the producer's ids are,
while a lookup among 2 x L{tickstock.history.DEDUPE_MAX} members matches a
wrong one with odds of about 2^-75."""
SEEN_TTL = 10.0
"""Seconds a pub/sub message's key is remembered (by the window C{seen}, see
scripts/windows.lua), at least: far longer than the time between two daemons
receiving the same message. A live tick's claim is remembered as long (the
window C{tick})."""


def digest(member: object) -> bytes:
    """What a dedupe window remembers of C{member} (L{DIGEST_BYTES})."""
    return hashlib.sha1(str(member).encode(), usedforsecurity=False).digest()[:DIGEST_BYTES]


def entry_event(entry: list[Any], topic: str) -> Event:
    """The event a stream entry C{[id, [field, value, ...]]} of C{topic} holds."""
    event_id, flat = entry
    fields = {text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    user = fields.get("u")
    return stored_event(text(event_id), text(fields["c"]), text(fields["t"]), fields["d"],
                        None if user is None else text(user), topic)
