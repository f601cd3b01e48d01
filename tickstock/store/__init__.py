"""
The system of record: tick bars, event history and universes, kept in
PostgreSQL (L{postgres}) or, for the embedded demo, in memory (L{memory}),
behind L{tickstock.domain.interfaces.IStore}.
"""

from __future__ import annotations

from typing import Any

from tickstock.domain.events import Event

UNIVERSE_TYPES = ("etf_universe", "stock_universe")
"""The C{cache_entries.type} values that hold universes."""


class StoreUnavailable(Exception):
    """The store cannot answer now (down, reconnecting, or too slow): try later."""


def pattern_row(event: Event) -> dict[str, Any]:
    """The JSON shape of one stored pattern event in the REST API."""
    data = event.data
    return {
        "id": event.id,
        "symbol": event.symbol,
        "pattern": data.get("pattern"),
        "confidence": data.get("confidence"),
        "timestamp": data.get("timestamp"),
        "data": data,
    }
