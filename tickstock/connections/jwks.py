"""
An identity provider's signing keys: its JWKS document (RFC 7517), fetched
from an HTTPS URL with Twisted's Agent (never blocking the reactor) or read
from a file, kept in memory, and fetched again every C{--jwt-jwks-refresh}
seconds and when a token names a key not known (at most every
L{REFETCH_MIN}). If the provider cannot be reached the last good keys stay
in use, and C{/ready} and C{/metrics} say how old they are.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import jwt
import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from tickstock.domain.interfaces import IKeySet

REFETCH_MIN = 10.0
"""Seconds between two fetches caused by unknown keys: tokens naming made-up
keys must not make TickStock hammer the provider."""

RETRY = 10.0
"""Seconds before trying again after a failed fetch, however long the period."""

FETCH_TIMEOUT = 5.0
MAX_DOCUMENT = 1024 * 1024

SIGNING = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                     "ES256", "ES384", "ES512", "EdDSA"})
"""The algorithms a JWKS key may verify with: public-key ones only (a shared
secret in a published document would be no secret)."""

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def check_source(source: str) -> str | None:
    """Why C{source} cannot be a JWKS location, or L{None}: HTTPS, HTTP on loopback, or a path."""
    parts = urlsplit(source)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http":
        if parts.hostname in LOOPBACK:
            return None
        return "must be https:// (plain http only on loopback)"
    if parts.scheme and len(parts.scheme) > 1:
        return f"{parts.scheme}:// is not supported; use https:// or a file path"
    return None


def parse_jwks(document: bytes) -> dict[str | None, jwt.PyJWK]:
    """The usable signing keys of a JWKS document, by C{kid}; ValueError if it has none."""
    try:
        parsed = orjson.loads(document)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from None
    entries = parsed.get("keys") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str | None, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        if key.algorithm_name in SIGNING:
            keys[kid] = key
    if not keys:
        raise ValueError("no usable signing key (RS*, PS*, ES*, EdDSA)")
    return keys


class _Body(Protocol):
    """Collects a response body of at most L{MAX_DOCUMENT} bytes."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_DOCUMENT:
            self.transport.stopProducing()  # type: ignore[union-attr]
            if not self.done.called:
                self.done.errback(ValueError(f"the document is over {MAX_DOCUMENT} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


@implementer(IKeySet)
class JWKS(Service):
    """The keys at C{source}, fetched at start and then kept fresh."""

    _log = Logger()

    def __init__(self, reactor: Any, source: str, period: float,
                 agent: Any | None = None) -> None:
        """
        @param source: an C{https://} URL (C{http://} on loopback), or a path.
        @param period: seconds between two scheduled fetches.
        @param agent: makes the HTTP requests (an C{IAgent}); Twisted's by default.
        """
        self._clock: IReactorTime = reactor
        self._source = source
        self._period = period
        self._url = urlsplit(source).scheme in ("http", "https")
        self._agent = agent if agent is not None or not self._url else Agent(reactor)
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetching: Deferred[Any] | None = None
        self._waiting: list[Deferred[None]] = []
        self._next: IDelayedCall | None = None
        self._asked_at: float | None = None  # the last fetch an unknown key caused
        self.fetched_at: float | None = None  # the last good fetch
        self.fetches = 0
        self.failures = 0
        self.refetches = 0
        self.error: str | None = None

    # IKeySet

    @property
    def ready(self) -> bool:
        return bool(self._keys)

    def status(self) -> dict[str, Any]:
        if not self._keys:
            state = "empty"
        else:
            state = "stale" if self.error is not None else "fresh"
        age = None if self.fetched_at is None else round(
            self._clock.seconds() - self.fetched_at, 3)
        return {"state": state, "keys": len(self._keys), "age_s": age,
                "fetches": self.fetches, "failures": self.failures,
                "refetches": self.refetches, "error": self.error}

    def key(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def refetch(self) -> Deferred[None] | None:
        now = self._clock.seconds()
        if self._fetching is None and self._asked_at is not None \
                and now - self._asked_at < REFETCH_MIN:
            return None
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        if self._fetching is None:
            self._asked_at = now
            self.refetches += 1
            self._fetch()
        return waiter

    # The service

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._fetch()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._fetching is not None:
            self._fetching.cancel()

    def _fetch(self) -> None:
        if self._fetching is not None:
            return
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        self.fetches += 1
        d: Deferred[Any] = self._document()
        self._fetching = d
        d.addCallback(parse_jwks).addCallbacks(self._fetched, self._failed).addBoth(self._done)

    def _document(self) -> Deferred[bytes]:
        if not self._url:
            try:
                with open(self._source, "rb") as handle:  # local and small: read at once
                    document = handle.read(MAX_DOCUMENT + 1)
            except OSError as error:
                return fail(ValueError(f"cannot read it: {error.strerror}"))
            if len(document) > MAX_DOCUMENT:
                return fail(ValueError(f"the document is over {MAX_DOCUMENT} bytes"))
            return succeed(document)
        assert self._agent is not None
        d: Deferred[Any] = self._agent.request(b"GET", self._source.encode("ascii"),
                                Headers({b"accept": [b"application/json"]}))

        def body(response: IResponse) -> Deferred[bytes]:
            done: Deferred[bytes] = Deferred()
            response.deliverBody(_Body(done))
            if response.code != 200:
                done.addErrback(lambda _: None)  # read and dropped
                raise ValueError(f"HTTP {response.code}")
            return done
        d.addCallback(body)
        return d.addTimeout(FETCH_TIMEOUT, self._clock)

    def _fetched(self, keys: dict[str | None, jwt.PyJWK]) -> None:
        added = set(keys) - set(self._keys)
        dropped = set(self._keys) - set(keys)
        if added or dropped or self.error is not None:
            self._log.info("JWKS: {n} signing keys (new: {added}; dropped: {dropped})",
                           n=len(keys), added=sorted(map(str, added)) or "none",
                           dropped=sorted(map(str, dropped)) or "none")
        self._keys = keys
        self.fetched_at = self._clock.seconds()
        self.error = None

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return  # stopped while fetching: nothing to report
        self.failures += 1
        why = failure.getErrorMessage() or repr(failure.value)
        if self.error is None:
            self._log.warn("JWKS: cannot fetch {source}: {why}; {keeping}",
                           source=self._source, why=why,
                           keeping=f"keeping the {len(self._keys)} keys fetched before"
                           if self._keys else "no key to verify tokens with yet")
        self.error = why

    def _done(self, _: object) -> None:
        self._fetching = None
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)
        if self.running:
            delay = self._period if self.error is None else min(self._period, RETRY)
            self._next = self._clock.callLater(delay, self._fetch)
