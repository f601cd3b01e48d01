"""Where Redis is: a plain address, or a master found through Sentinel."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class RedisAddress:
    """
    Where Redis is, parsed from a C{redis://} URL. With C{sentinels} the
    master is whatever they name C{master}, and C{host}/C{port} are unused.
    """

    host: str
    port: int
    db: int
    password: str | None = dataclasses.field(repr=False)
    username: str | None
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None

    def endpoint(self) -> str:
        """A Twisted client endpoint string for this address."""
        if self.sentinels:
            # Connecting to host/port would silently bypass Sentinel.
            raise ValueError(f"{self} has no fixed endpoint: ask its sentinels")
        host = self.host.replace(":", "\\:")
        return f"tcp:host={host}:port={self.port}"

    def __str__(self) -> str:
        # Never shows the password: this is what logs and /ready print.
        if self.sentinels:
            hosts = ",".join(
                f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                for host, port in self.sentinels
            )
            return f"redis+sentinel://{hosts}/{self.master}/{self.db}"
        return f"redis://{self.host}:{self.port}/{self.db}"
