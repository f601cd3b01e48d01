"""
Token buckets: C{rate} requests a second on average, C{burst} at once. One
bucket per key (a connection, a user); memory stays bounded because full
buckets (idle keys) are forgotten when there are too many.
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime


class RateLimit:
    """Token buckets by key, refilled continuously from C{clock}."""

    def __init__(self, clock: IReactorTime, rate: float, burst: float,
                 max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: dict[Hashable, list[float]] = {}
        self.refused = 0

    def take(self, key: Hashable) -> float:
        """
        Spend one token of C{key}'s bucket: 0.0 when there was one, else
        how many seconds until there will be (nothing is spent then).
        """
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._forget_full(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return 0.0
        bucket[0] = tokens
        self.refused += 1
        return (1 - tokens) / self.rate

    def forget(self, key: Hashable) -> None:
        self._buckets.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        refill = self.burst / self.rate
        for key, (tokens, stamp) in list(self._buckets.items()):
            if tokens + (now - stamp) * self.rate >= self.burst or now - stamp >= refill:
                del self._buckets[key]
