"""
Who a client is, and what it may do. With auth on, C{hello} (and C{refresh})
carries a JWT: signed with the shared HS256 secret, or by a key of the
identity provider's JWKS (docs/security.md "Identity providers"). The
algorithm is pinned per key, so a token naming another one (or none) is
refused; C{sub} is the user id, C{exp} is required, C{aud}/C{iss} are
checked when configured, all with a small leeway. An optional claim narrows
what the user may subscribe to and submit (L{Permissions}). With auth off
(demo), the client names itself.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from twisted.internet.defer import Deferred, fail, succeed

from tickstock.domain.errors import BadRequest
from tickstock.domain.interfaces import IKeySet
from tickstock.domain.topics import TOPICS

MIN_SECRET_BYTES = 32
"""The shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size)."""

MAX_TOKEN = 8192
"""The longest token read: a provider's RS256 token with many claims is 1-3 KB."""

_USER = re.compile(r"^[A-Za-z0-9_.@\-]{1,64}\Z")
"""A name a client gives itself with auth off."""
_SUB = re.compile(r"^[A-Za-z0-9_.@+|:\-]{1,128}\Z")
"""A token's C{sub}: providers' ids look like C{auth0|5f7c}, UUIDs, e-mail addresses."""
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}\Z")


@dataclass(frozen=True)
class Permissions:
    """
    What a token's permissions claim allows; L{None} for a field: no limit.

    @ivar topics: the topics it may subscribe to.
    @ivar universes: with it, a subscription to a per-symbol topic must
        name one of these universes, and no symbols besides.
    @ivar backtests: whether it may submit and cancel backtests.
    """

    topics: frozenset[str] | None = None
    universes: frozenset[str] | None = None
    backtests: bool = True

    def refuses(self, topic: str, universe: str | None, symbols: frozenset[str] | None,
                ) -> str | None:
        """Why a subscription to C{topic} with this filter is refused, or L{None}."""
        if self.topics is not None and topic not in self.topics:
            return f"your token does not allow the topic {topic!r}"
        if self.universes is not None and TOPICS[topic].by_symbol:
            if universe is None or universe not in self.universes:
                allowed = ", ".join(sorted(self.universes)) or "none"
                return f"your token allows {topic} only by universe ({allowed})"
            if symbols:
                return "your token allows universes only, not symbols besides"
        return None


def parse_permissions(value: Any, claim: str) -> Permissions:
    """The claim's value as L{Permissions}; a malformed one refuses the token."""
    def names(field: str) -> frozenset[str] | None:
        if field not in value:
            return None
        items = value[field]
        if not (isinstance(items, list) and len(items) <= 1000
                and all(isinstance(i, str) and _NAME.match(i) for i in items)):
            raise BadRequest("unauthorized", f"invalid token: {claim}.{field} must be a "
                                             "list of names")
        return frozenset(items)

    if not isinstance(value, dict):
        raise BadRequest("unauthorized", f"invalid token: the {claim} claim must be an object")
    backtests = value.get("backtests", True)
    if not isinstance(backtests, bool):
        raise BadRequest("unauthorized", f"invalid token: {claim}.backtests must be true or "
                                         "false")
    return Permissions(names("topics"), names("universes"), backtests)


@dataclass(frozen=True)
class Identity:
    """
    An authenticated user, until when their token is accepted (L{None}:
    no token), and what it allows (L{None}: everything).
    """

    user: str
    expires_at: float | None = None
    permissions: Permissions | None = None


Authenticate = Callable[[dict[str, Any]], "Identity | Deferred[Identity]"]
"""Checks the credentials of a C{hello} (or C{refresh}): at once, or once
the keys it needs are fetched. A refusal is L{BadRequest} C{unauthorized}."""


def identify(authenticate: Authenticate, hello: dict[str, Any]) -> Deferred[Identity]:
    """C{authenticate(hello)} as a L{Deferred}, whether it answered at once or not."""
    try:
        answer = authenticate(hello)
    except Exception:
        return fail()
    return answer if isinstance(answer, Deferred) else succeed(answer)


def anonymous(hello: dict[str, Any]) -> Identity:
    """
    Auth off (demo): the client names itself with C{user} (or, as on REST
    where only a bearer token can be given, with C{token}), or gets a guest
    name. Never used when a secret is configured.
    """
    for name in (hello.get("user"), hello.get("token")):
        if isinstance(name, str) and _USER.match(name):
            return Identity(name)
    return Identity("guest-" + uuid.uuid4().hex[:8])


class JWTAuthenticator:
    """
    Checks the token in C{hello}: by the key its C{kid} names in the JWKS,
    with that key's algorithm only, or, when it is HS256 and names no
    C{kid}, with the secret. A C{kid} not in the JWKS makes it fetch the
    document again (at most every so often, L{IKeySet.refetch}) before
    the token is refused. The secret never leaves this object.
    """

    def __init__(
        self, secret: bytes | None = None, algorithm: str = "HS256",
        audience: str | None = None, issuer: str | None = None,
        keys: IKeySet | None = None, leeway: float = 0.0,
        permissions_claim: str | None = None,
    ) -> None:
        if secret is None and keys is None:
            raise ValueError("a secret or a key set is needed")
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._algorithm = algorithm
        self._audience = audience
        self._issuer = issuer
        self._keys = keys
        self._leeway = leeway
        self._claim = permissions_claim

    def __repr__(self) -> str:
        kinds = [self._algorithm] if self._secret is not None else []
        return f"<JWTAuthenticator {' + '.join(kinds + (['JWKS'] if self._keys else []))}>"

    def __call__(self, hello: dict[str, Any]) -> Identity | Deferred[Identity]:
        token = hello.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            raise BadRequest("unauthorized", "hello needs a token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:
            raise BadRequest("unauthorized", f"invalid token: {error}") from None
        kid = header.get("kid")
        if self._keys is None or (self._secret is not None and kid is None
                                  and header.get("alg") == self._algorithm):
            return self._check(token, self._secret, [self._algorithm])
        found = self._keys.key(kid if isinstance(kid, str) else None)
        if found is not None:
            return self._check(token, found.key, [found.algorithm_name])
        if not isinstance(kid, str):
            raise BadRequest("unauthorized", "invalid token: it names no signing key (kid)")
        fetched = self._keys.refetch()
        if fetched is None:
            raise BadRequest("unauthorized", "invalid token: signed by an unknown key")

        def again(_: object) -> Identity:
            assert self._keys is not None
            key = self._keys.key(kid)
            if key is None:
                raise BadRequest("unauthorized", "invalid token: signed by an unknown key")
            return self._check(token, key.key, [key.algorithm_name])
        return fetched.addCallback(again)

    def _check(self, token: str, key: Any, algorithms: list[str]) -> Identity:
        require = (["exp", "sub"] + (["aud"] if self._audience else [])
                   + (["iss"] if self._issuer else []))
        try:
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=self._audience,
                issuer=self._issuer, leeway=self._leeway, options={"require": require},
            )
        except jwt.ExpiredSignatureError:
            raise BadRequest("unauthorized", "token expired") from None
        except jwt.InvalidTokenError as error:
            raise BadRequest("unauthorized", f"invalid token: {error}") from None
        user = claims["sub"]
        if not isinstance(user, str) or not _SUB.match(user):
            raise BadRequest("unauthorized", "invalid token: sub is not a user id")
        try:
            expires_at = float(claims["exp"]) + self._leeway
        except (OverflowError, TypeError, ValueError):
            raise BadRequest("unauthorized", "invalid token: exp is not a time") from None
        permissions = None
        if self._claim is not None and self._claim in claims:
            permissions = parse_permissions(claims[self._claim], self._claim)
        return Identity(user, expires_at, permissions)

    def mint(self, user: str, now: float, ttl: float, **claims: Any) -> str:
        """An HS256 token for C{user}, valid for C{ttl} seconds from C{now}."""
        if self._secret is None:
            raise ValueError("only a secret mints tokens")
        body: dict[str, Any] = {"sub": user, "iat": int(now), "exp": int(now + ttl), **claims}
        if self._audience:
            body["aud"] = self._audience
        if self._issuer:
            body["iss"] = self._issuer
        return jwt.encode(body, self._secret, algorithm=self._algorithm)


def allowed_universes(permissions: Permissions | None, keys: Iterable[str]) -> list[str]:
    """The universes of C{keys} that C{permissions} let a user see."""
    if permissions is None or permissions.universes is None:
        return list(keys)
    return [key for key in keys if key in permissions.universes]
