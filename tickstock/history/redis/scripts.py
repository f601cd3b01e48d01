"""
The history's Lua scripts, read from C{scripts/*.lua} once, at import, and
run by SHA. Shared fragments (C{idlt}, C{trim}, C{windows}) are prepended to
the scripts that use them, and C{@NAME@} stands for a value Python owns,
so both sides agree on it.
"""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from typing import Any

from twisted.internet.defer import Deferred

from tickstock.connections.redis import RedisLink
from tickstock.domain.events import ID_STRIDE
from tickstock.domain.stored import STORED_SUFFIX
from tickstock.history import BOOKMARK_EVERY, DEDUPE_MAX
from tickstock.history.redis.layout import DEDUPE_KEY

DROPS_KEPT = 1000
"""Trimming records kept per stream (C{<stream>:drops}, see trim.lua)."""

_VALUES = {
    "BATCH": str(BOOKMARK_EVERY),
    "KEPT": str(DROPS_KEPT),
    "DEDUPE": DEDUPE_KEY,
    "CAP": str(DEDUPE_MAX),
    "STRIDE": str(ID_STRIDE),
    "STORED": STORED_SUFFIX,
}


def _script(*names: str) -> str:
    """The files C{names} joined, each after a newline, values filled in."""
    folder = files(__package__).joinpath("scripts")
    source = "".join("\n" + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
                     for name in names)
    return re.sub(r"@([A-Z]+)@", lambda m: _VALUES[m[1]], source)


INGEST = _script("idlt", "trim", "windows", "ingest")
REPLAY = _script("replay")
CLAIM = _script("windows", "claim")
MARKS = _script("marks")
ADVANCE = _script("idlt", "advance")
CURRENT = _script("current")


def sha(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


MARKS_SHA = sha(MARKS)


class Script:
    """
    A Lua script run by SHA; the link loads it first on every connection.
    Should Redis answer NOSCRIPT anyway (its script cache was flushed), the
    call fails and the link reconnects, which loads it again: an EVAL
    fallback would let later calls already in flight overtake this one.
    """

    def __init__(self, link: RedisLink, source: str) -> None:
        self._link = link
        self.sha = sha(source)
        link.preload(source)

    def run(self, keys: list[str], args: list[Any]) -> Deferred[Any]:
        def reload(failure: Any) -> Any:
            if "NOSCRIPT" in failure.getErrorMessage():
                self._link.drop()
            return failure

        return self._link.execute("EVALSHA", self.sha, len(keys), *keys, *args).addErrback(reload)
