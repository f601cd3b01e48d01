"""
What a backtest job is, independent of who runs it: its states, what each
of its events does to its record, and the patterns a job may ask for.
"""

from __future__ import annotations

from typing import Any

from tickstock.domain.events import Event

FINAL = ("completed", "failed", "cancelled")
ACTIVE = ("queued", "running")
JOB_PATTERNS = ("Doji", "Hammer", "Engulfing", "ShootingStar", "MorningStar",
                "EveningStar", "BullFlag", "HeadAndShoulders", "DoubleBottom", "Breakout")
"""The built-in simulator's pattern catalogue: the default C{--job-patterns}."""


def update_of(event: Event) -> tuple[str, float | None, Any, str | None] | None:
    """
    What a stored backtest event does to its job's record: C{(status,
    progress, results, error)}, or L{None} for an event of another topic.
    A progress event with status C{completed} leaves the job running: the
    job is complete when its result arrives.
    """
    if event.topic != "backtests":
        return None
    data = event.data
    if event.type == "backtest_result":
        return "completed", 1.0, data.get("results"), None
    status = data.get("status")
    if status in ("failed", "cancelled"):
        error = data.get("error") or data.get("message") or status
        return status, data.get("progress"), None, str(error)[:512]
    return "running", data.get("progress"), None, None


def outcome(event: Event) -> str | None:
    """The final status C{event} gives its job, or L{None} if it leaves it open."""
    update = update_of(event)
    return update[0] if update is not None and update[0] in FINAL else None
