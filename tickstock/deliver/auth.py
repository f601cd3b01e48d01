"""
Who a client is. With auth on, C{hello} carries a JWT: HS256 by default and
pinned (a token naming another algorithm, or none, is refused), C{sub} is the
user id, C{exp} is required and checked, and C{aud}/C{iss} are checked when
configured. With auth off (demo), the client names itself.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from tickstock.domain.errors import BadRequest

MIN_SECRET_BYTES = 32
"""The shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size)."""

_USER = re.compile(r"^[A-Za-z0-9_.@\-]{1,64}\Z")


@dataclass(frozen=True)
class Identity:
    """An authenticated user, and when their token stops being valid."""

    user: str
    expires_at: float | None = None


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
    """Checks the token in C{hello}; the secret never leaves this object."""

    def __init__(
        self, secret: bytes, algorithm: str = "HS256",
        audience: str | None = None, issuer: str | None = None,
    ) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._algorithm = algorithm
        self._audience = audience
        self._issuer = issuer

    def __repr__(self) -> str:
        return f"<JWTAuthenticator {self._algorithm}>"

    def __call__(self, hello: dict[str, Any]) -> Identity:
        token = hello.get("token")
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise BadRequest("unauthorized", "hello needs a token")
        require = (["exp", "sub"] + (["aud"] if self._audience else [])
                   + (["iss"] if self._issuer else []))
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[self._algorithm],
                audience=self._audience, issuer=self._issuer,
                options={"require": require},
            )
        except jwt.ExpiredSignatureError:
            raise BadRequest("unauthorized", "token expired") from None
        except jwt.InvalidTokenError as error:
            raise BadRequest("unauthorized", f"invalid token: {error}") from None
        user = claims["sub"]
        if not isinstance(user, str) or not _USER.match(user):
            raise BadRequest("unauthorized", "invalid token: sub is not a user id")
        try:
            expires_at = float(claims["exp"])
        except (OverflowError, TypeError, ValueError):
            raise BadRequest("unauthorized", "invalid token: exp is not a time") from None
        return Identity(user, expires_at)

    def mint(self, user: str, now: float, ttl: float) -> str:
        """A token for C{user}, valid for C{ttl} seconds from C{now}."""
        claims: dict[str, Any] = {"sub": user, "iat": int(now), "exp": int(now + ttl)}
        if self._audience:
            claims["aud"] = self._audience
        if self._issuer:
            claims["iss"] = self._issuer
        return jwt.encode(claims, self._secret, algorithm=self._algorithm)
