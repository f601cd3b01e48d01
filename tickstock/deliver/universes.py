"""
Universe filters: C{{"universe": "<key>"}} in a subscription stands for the
symbols of that universe (C{cache_entries}, via the store), and keeps
standing for them as the producer changes the universe: a
C{tickstock.universe.updated} event re-reads the universes it names (all
that are in use, when it names none) and retargets their subscriptions, so
a newly added symbol's events arrive without a new subscribe.
"""

from __future__ import annotations

from typing import Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tickstock.deliver.broadcast import Broadcaster, Subscription
from tickstock.domain.errors import BadRequest
from tickstock.domain.events import Event
from tickstock.domain.interfaces import IReporting, IStore
from tickstock.store import StoreUnavailable

UPDATED_CHANNEL = "tickstock.universe.updated"
MEMBERSHIP_CHANNELS = frozenset({UPDATED_CHANNEL, "tickstock.cache.sync_complete",
                                 "tickstock.cache.ipo_assignment",
                                 "tickstock.cache.delisting_cleanup"})
"""The universe channels whose events may change which symbols a universe has."""


def named_universes(event: Event) -> set[str] | None:
    """The universe keys a universe event names, or L{None} if it names none."""
    data = event.data
    keys: set[str] = set()
    for field in ("universe", "key", "universe_key", "cache_key", "theme"):
        if isinstance(data.get(field), str):
            keys.add(data[field])
    for field in ("universes", "keys"):
        if isinstance(data.get(field), list):
            keys.update(key for key in data[field] if isinstance(key, str))
    return keys or None


@implementer(IReporting)
class Universes:
    """
    The universes this process's subscriptions use.

    @ivar refreshes: universe re-reads after an update event.
    """

    _log = Logger()

    def __init__(self, store: IStore, broadcaster: Broadcaster) -> None:
        self._store = store
        self._broadcaster = broadcaster
        self._subs: dict[str, dict[Subscription, frozenset[str] | None]] = {}
        self.refreshes = 0

    def status(self) -> dict[str, Any]:
        return {"universe_refreshes": self.refreshes}

    def resolve(self, key: str) -> Deferred[frozenset[str]]:
        """
        The symbols of universe C{key}. Fails with L{BadRequest}:
        C{unknown_universe}, or C{unavailable} when the store cannot answer.
        """
        def found(universe: dict[str, Any] | None) -> frozenset[str]:
            if universe is None:
                raise BadRequest("unknown_universe", f"no universe {key!r}")
            return frozenset(universe["symbols"])

        def failed(failure: Failure) -> NoReturn:
            failure.trap(StoreUnavailable)
            raise BadRequest("unavailable", "universes cannot be read now; try again")

        return self._store.universe(key).addCallbacks(found, failed)

    def track(self, sub: Subscription, explicit: frozenset[str] | None) -> None:
        """Keep C{sub} (whose filter names a universe) current; C{explicit}: its own symbols."""
        assert sub.filter.universe is not None
        self._subs.setdefault(sub.filter.universe, {})[sub] = explicit

    def untrack(self, sub: Subscription) -> None:
        key = sub.filter.universe
        if key is not None and key in self._subs:
            self._subs[key].pop(sub, None)
            if not self._subs[key]:
                del self._subs[key]

    def changed(self, event: Event) -> None:
        """A universe event arrived: re-read the universes it may have changed."""
        if event.channel not in MEMBERSHIP_CHANNELS:
            return
        named = named_universes(event)
        for key in list(self._subs if named is None else named & set(self._subs)):
            self.refreshes += 1
            self.resolve(key).addCallbacks(self._apply, self._refresh_failed,
                                           callbackArgs=(key,), errbackArgs=(key,))

    def _apply(self, symbols: frozenset[str], key: str) -> None:
        for sub, explicit in list(self._subs.get(key, {}).items()):
            self._broadcaster.retarget(sub, symbols | (explicit or frozenset()))

    def _refresh_failed(self, failure: Any, key: str) -> None:
        # The old symbols stay in force; the next update event tries again.
        self._log.warn("could not re-read universe {key}: {e}", key=key,
                       e=failure.getErrorMessage())
