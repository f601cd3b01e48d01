"""Errors that cross the parts: what a client is told when its request is refused."""

from __future__ import annotations


class BadRequest(ValueError):
    """A client request that is refused with C{{"op":"error","code":…}}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
