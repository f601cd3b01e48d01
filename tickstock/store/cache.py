"""
Caches for REST answers, behind L{ICache}: L{MemoryCache} for one process
(the embedded demo) and L{RedisCache}, shared by every node on one Redis.

Both version their entries with a generation: L{ICache.invalidate} moves
to a new generation, and an answer is stored under the generation that was
current when its lookup missed, so an answer computed from data older than
an invalidation is never served as fresh. Concurrent misses of the same key
and generation share one computation, so a popular query reaches the store
once per expiry rather than once per client.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.connections.redis import RedisLink
from tickstock.domain.interfaces import ICache

Compute = Callable[[], "Deferred[bytes]"]


class _Counted:
    """Hit and miss counters, and concurrent misses shared per key."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self._running: dict[Any, list[Deferred[bytes]]] = {}

    @property
    def ratio(self) -> float:
        """Hits over lookups; 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "ratio": round(self.ratio, 4)}

    def _compute_once(self, flight: Any, compute: Compute,
                      store: Callable[[bytes], None]) -> Deferred[bytes]:
        waiting = self._running.get(flight)
        if waiting is not None:
            mine: Deferred[bytes] = Deferred()
            waiting.append(mine)
            return mine
        waiting = self._running[flight] = []

        def done(result: bytes | Failure) -> bytes | Failure:
            del self._running[flight]
            if not isinstance(result, Failure):
                store(result)
            for other in waiting:
                other.callback(result)
            return result

        return maybeDeferred(compute).addBoth(done)


@implementer(ICache)
class MemoryCache(_Counted):
    """
    One process's cache, bounded to C{max_entries} (least recently stored
    dropped first).
    """

    def __init__(self, clock: IReactorTime, max_entries: int = 10_000) -> None:
        super().__init__()
        self._clock = clock
        self._max = max_entries
        self._generation = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def fetch(self, key: str, compute: Compute, ttl: float) -> Deferred[bytes]:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock.seconds():
            self.hits += 1
            return succeed(entry[1])
        self.misses += 1
        generation = self._generation

        def store(value: bytes) -> None:
            if ttl > 0 and generation == self._generation:
                self._entries[key] = (self._clock.seconds() + ttl, value)
                self._entries.move_to_end(key)
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)

        return self._compute_once((generation, key), compute, store)

    def invalidate(self) -> None:
        self._generation += 1
        self._entries.clear()


LOOKUP = """
local generation = redis.call('GET', KEYS[1]) or '0'
return {generation, redis.call('GET', ARGV[1] .. ':' .. generation .. ':' .. ARGV[2])}
"""
LOOKUP_SHA = hashlib.sha1(LOOKUP.encode(), usedforsecurity=False).hexdigest()


@implementer(ICache)
class RedisCache(_Counted):
    """
    A cache shared through Redis. C{prefix:gen} holds the generation
    (L{invalidate} INCRs it, so every node sees the invalidation with its
    next lookup); entries live under C{prefix:<gen>:<key>} with a PX expiry.
    A lookup is one round trip (a Lua script reads both). Redis down, or
    slower than C{timeout} seconds, is a miss: the request is answered from
    the store instead of failing or waiting.

    The generation key has no expiry: with an C{allkeys-*} eviction policy
    Redis could evict it and restart the count, so give Redis a
    C{volatile-*} policy (or none) when it holds this cache.

    @param link: the command connection (its C{execute} fails at once
        while Redis is down).
    """

    _log = Logger()

    def __init__(self, link: RedisLink, clock: IReactorTime, prefix: str = "tickstock:cache",
                 timeout: float = 0.5) -> None:
        super().__init__()
        self._link = link
        self._clock = clock
        self._prefix = prefix
        self._generation_key = f"{prefix}:gen"
        self._timeout = timeout
        self.errors = 0
        link.preload(LOOKUP)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "errors": self.errors}

    def fetch(self, key: str, compute: Compute, ttl: float) -> Deferred[bytes]:
        result: Deferred[bytes] = Deferred()

        def found(reply: Any) -> None:
            if result.called:
                return
            generation, value = _text(reply[0]), reply[1]
            if value is not None:
                self.hits += 1
                result.callback(value if isinstance(value, bytes) else value.encode())
                return
            self.misses += 1
            self._miss(key, generation, compute, ttl).chainDeferred(result)

        def failed(failure: Failure) -> None:
            if result.called:
                return
            self.errors += 1
            self.misses += 1
            # No generation known: compute, and store nothing.
            self._compute_once((None, key), compute, lambda _: None).chainDeferred(result)

        def slow() -> None:
            failed(Failure(TimeoutError(f"cache lookup took over {self._timeout}s")))

        timer = self._clock.callLater(self._timeout, slow)

        def settle(outcome: Any) -> Any:
            if timer.active():
                timer.cancel()
            return outcome

        self._lookup(key).addBoth(settle).addCallbacks(found, failed)
        return result

    def _lookup(self, key: str) -> Deferred[Any]:
        args = (1, self._generation_key, self._prefix, key)

        def not_loaded(failure: Failure) -> Any:
            if "NOSCRIPT" in failure.getErrorMessage():
                return self._link.execute("EVAL", LOOKUP, *args)
            return failure

        return self._link.execute("EVALSHA", LOOKUP_SHA, *args).addErrback(not_loaded)

    def _miss(self, key: str, generation: str, compute: Compute, ttl: float) -> Deferred[bytes]:
        def store(value: bytes) -> None:
            if ttl <= 0:
                return
            entry = f"{self._prefix}:{generation}:{key}"
            d = self._link.execute("SET", entry, value, "PX", max(1, int(ttl * 1000)))
            d.addErrback(self._not_stored)

        return self._compute_once((generation, key), compute, store)

    def _not_stored(self, failure: Failure) -> None:
        self.errors += 1

    def invalidate(self) -> Deferred[Any]:
        """
        Start a new generation. Returns a Deferred of the new generation
        for callers that want to know it reached Redis; it never fails
        (an invalidation Redis did not get is logged).
        """
        def lost(failure: Failure) -> None:
            self.errors += 1
            self._log.warn("cache invalidation did not reach Redis: {e}",
                           e=failure.getErrorMessage())

        return self._link.execute("INCR", self._generation_key).addErrback(lost)


def _text(value: bytes | str | int) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
